"""``fedfer.v1`` protocol buffers and their generated Python (``python protos/generate.py`` rewrites them)."""

__all__: list[str] = []
