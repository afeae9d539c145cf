"""The README quickstart, run N times against a fresh `reranker serve` while busy loops hold the CPUs.

Prints one line per run (variant, whether the order differs from the upstream's) and the count of
runs after the first that were VARIANT_RERANKED with a reordered list. `--no-upsert` drops the
quickstart's UpsertItems call: every text is then new to the first Rerank, which has 200 ms to
encode it (what the late encodes are for). Uses the server's defaults (the packaged MiniLM).

    PYTHONPATH=$PWD .venv/bin/python experiments/quickstart_under_load.py --runs 10 --busy 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- doc-test: readme-quickstart -->\n```python\n(.*?)```", re.S)


def quickstart_code(address: str, upsert: bool) -> str:
    code = BLOCK.search((REPO / "README.md").read_text(encoding="utf-8")).group(1)  # type: ignore[union-attr]
    if not upsert:
        code = "\n".join(line for line in code.splitlines() if not line.startswith("stub.UpsertItems("))
    return code.replace("127.0.0.1:50051", address)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, timeout_s: float = 600.0) -> None:
    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            with contextlib.suppress(grpc.RpcError):
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.5)
    raise SystemExit("the server did not become SERVING")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--busy", type=int, default=2, help="busy loops started once the server is SERVING")
    parser.add_argument("--no-upsert", action="store_true", help="leave out the quickstart's UpsertItems")
    parser.add_argument("--pause-s", type=float, default=1.0, help="between runs (a person re-running it)")
    args = parser.parse_args()
    address = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "reranker", "serve", f"--address={address}", "--metrics-address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    busy: list[subprocess.Popen[bytes]] = []
    try:
        wait_serving(address)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        time.sleep(1.0)
        code = quickstart_code(address, upsert=not args.no_upsert)
        good = 0
        for run in range(1, args.runs + 1):
            out = io.StringIO()
            started = time.monotonic()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(code, "<quickstart>", "exec"), {})  # noqa: S102
                lines = out.getvalue().splitlines()
                variant = lines[0].split()[0]
                reordered = lines[1].split(":", 1)[1] != lines[2].split(":", 1)[1]
                result = f"{' '.join(lines[0].split())} reordered={reordered}"
            except grpc.RpcError as exc:
                variant, reordered, result = "ERROR", False, f"ERROR {exc.code().name}"  # type: ignore[attr-defined]
            if run > 1 and variant == "VARIANT_RERANKED" and reordered:
                good += 1
            print(f"run {run}: {result} ({time.monotonic() - started:.2f} s)", flush=True)
            time.sleep(args.pause_s)
        print(f"runs after the first reranked and reordered: {good} of {args.runs - 1}"
              f" (busy loops: {args.busy}, upsert: {not args.no_upsert})")
    finally:
        for process in [*busy, server]:
            process.terminate()
        for process in [*busy, server]:
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
