"""Protocol buffer definitions (``protos/fedfer/v1/*.proto``) and their committed generated Python."""

__all__: list[str] = []
