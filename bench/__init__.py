"""Benchmarks that print one JSON object each (``fedfer-bench NAME ...``)."""

__all__: list[str] = []
