"""Protocol buffer package ``fedfer`` (versioned sub-packages hold the definitions)."""

__all__: list[str] = []
