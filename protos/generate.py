"""Generate the Python code for ``protos/fedfer/v1/*.proto`` (messages, gRPC stubs and ``.pyi`` stubs).

Run ``python -m protos.generate`` from the repository root to rewrite the committed output, or
``python -m protos.generate --check`` to exit non-zero when the committed output is stale. ``protoc`` runs
with the repository root as include path, so generated imports read ``from protos.fedfer.v1 import ...``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = Path("protos") / "fedfer" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """Return the ``.proto`` files, relative to the repository root, in a stable order."""
    return sorted(p.relative_to(REPO) for p in (REPO / PROTO_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every proto file, writing the output tree under ``out_root``.

    Args:
        out_root: directory that plays the role of the repository root for the output.

    Returns:
        The generated files, relative to ``out_root``.

    Raises:
        RuntimeError: protoc failed.
    """
    from grpc_tools import protoc  # dev dependency: imported only when generating

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(REPO / p) for p in proto_files()),
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
        p.relative_to(REPO): p.read_bytes() for p in (REPO / PROTO_DIR).iterdir() if _is_generated(p)
    }
    names = sorted(set(fresh) | set(committed))
    return [str(n) for n in names if fresh.get(n) != committed.get(n)]


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the committed output, or with ``--check`` report whether it is stale."""
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed output is stale")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for rel in generate(Path(tmp)):
            shutil.copyfile(Path(tmp) / rel, REPO / rel)
    for old in (REPO / PROTO_DIR).iterdir():
        if _is_generated(old) and not (REPO / PROTO_DIR / (old.name.split("_pb2")[0] + ".proto")).exists():
            old.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
