"""Generate the Python code for ``protos/fedfer/v1/*.proto`` (messages, gRPC stubs and ``.pyi`` stubs).

A development tool, not part of the distribution: run ``python protos/generate.py`` (``make protos``) to
rewrite the committed output, or ``python protos/generate.py --check`` to exit non-zero when the committed
output is stale. ``protoc`` runs with ``protos/`` as include path, so the Python package is the proto package,
``fedfer.v1`` (generated imports read ``from fedfer.v1 import ...``; pyproject.toml maps ``fedfer.v1`` to
``protos/fedfer/v1``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # the include path: protos/
PROTO_DIR = Path("fedfer") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """Return the ``.proto`` files, relative to ``protos/``, in a stable order."""
    return sorted(p.relative_to(ROOT) for p in (ROOT / PROTO_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every proto file, writing the output tree under ``out_root``.

    Args:
        out_root: directory that plays the role of ``protos/`` for the output.

    Returns:
        The generated files, relative to ``out_root``.

    Raises:
        RuntimeError: protoc failed.
    """
    from grpc_tools import protoc  # dev dependency: imported only when generating

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(ROOT / p) for p in proto_files()),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    return sorted(p.relative_to(out_root) for p in (out_root / PROTO_DIR).iterdir() if _is_generated(p))


def _is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def stale_files() -> list[str]:
    """Return the generated files that are missing, extra or different from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p: (Path(tmp) / p).read_bytes() for p in generate(Path(tmp))}
    committed = {
        p.relative_to(ROOT): p.read_bytes() for p in (ROOT / PROTO_DIR).iterdir() if _is_generated(p)
    }
    names = sorted(set(fresh) | set(committed))
    return [str(n) for n in names if fresh.get(n) != committed.get(n)]


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the committed output, or with ``--check`` report whether it is stale."""
    parser = argparse.ArgumentParser(prog="python protos/generate.py", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed output is stale")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for rel in generate(Path(tmp)):
            shutil.copyfile(Path(tmp) / rel, ROOT / rel)
    for old in (ROOT / PROTO_DIR).iterdir():
        if _is_generated(old) and not (ROOT / PROTO_DIR / (old.name.split("_pb2")[0] + ".proto")).exists():
            old.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
