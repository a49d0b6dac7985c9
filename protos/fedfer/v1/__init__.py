"""``fedfer.v1`` protocol buffers and their generated Python (``python -m protos.generate`` rewrites them)."""

__all__: list[str] = []
