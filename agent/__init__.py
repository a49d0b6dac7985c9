"""The fedfer edge agent: capture, faces, features, encrypted cache, personalization, federation client,
supervisor, control plane and CLI."""

__all__: list[str] = []
