"""Generate Python code (and mypy stubs) for every .proto under protos/ into gen/.

The generated tree is disposable: `make gen` recreates it from scratch so that a
renamed or deleted proto never leaves a stale module behind.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "gen"


def main() -> int:
    # --runtime-only: just the Python modules (container builds need no mypy stubs).
    stubs = "--runtime-only" not in sys.argv[1:]
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    if not files:
        print("no .proto files under protos/", file=sys.stderr)
        return 1
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    well_known = Path(protoc.__file__).parent / "_proto"
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        *([f"--mypy_out=quiet:{OUT}", f"--mypy_grpc_out=quiet:{OUT}"] if stubs else []),
        *files,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    # Regular packages (not namespace packages) so mypy and importlib agree.
    for directory in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        if directory != OUT:
            (directory / "__init__.py").touch()
    if stubs:
        (OUT / "securemsg" / "py.typed").touch()
    print(f"generated {len(files)} proto files into gen/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
