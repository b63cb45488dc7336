"""Generate the Python gRPC code from proto/adapterserve/v1/*.proto.

    python proto/generate.py            # writes clients/python/adapterserve/v1/*_pb2*.py(i)
    python proto/generate.py --out DIR  # writes DIR/adapterserve/v1/... instead (used by the test
                                        # that checks the committed files are current)

The generated modules are committed and never edited by hand. The include root is `proto/`, so the
modules import each other as `adapterserve.v1.<name>_pb2`, which is where the SDK package puts them.
Needs grpcio-tools (a dev dependency); the generated code needs only grpcio and protobuf.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PACKAGE_DIR = Path("adapterserve") / "v1"
# Where `python proto/generate.py` writes: the SDK package root (the folder holding adapterserve/).
DEFAULT_OUT = REPO_ROOT / "clients" / "python"


def proto_files() -> list[Path]:
    """The .proto sources, relative to PROTO_ROOT, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generated_names() -> list[str]:
    """File names that generation produces in adapterserve/v1/ for the current sources."""
    names: list[str] = []
    for proto in proto_files():
        stem = proto.stem
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return sorted(names)


def generate(out_root: Path = DEFAULT_OUT) -> list[Path]:
    """Run protoc (from grpc_tools) on every proto; return the written files under out_root/adapterserve/v1."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(PROTO_ROOT / p) for p in proto_files()],
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
    return [out_root / PACKAGE_DIR / name for name in generated_names()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="root that receives adapterserve/v1/")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
