"""Generate the Python protobuf/gRPC code for protos/ into the reranker package.

Run after editing a .proto file:  python scripts/gen_protos.py
The generated files are committed; tests/test_protos.py fails when they are stale.
Because the proto package is `reranker.v1`, the code lands in `reranker/v1/` and protoc's own
imports (`from reranker.v1 import reranker_pb2`) resolve inside this package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Generate code for every .proto under protos/ into out_dir; return the files written."""
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for proto in protos:
        stem = proto.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            written.append(out_dir / f"{stem}{suffix}")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    opts = parser.parse_args()
    for path in generate(opts.out):
        print(path.relative_to(opts.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
