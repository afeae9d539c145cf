"""Measure the resident memory of a real `reranker serve` process with the packaged model.

Starts the server as a subprocess (real model unless --encoder fake), waits for SERVING, sends
Rerank traffic built from the MovieLens-100k titles (every request brings new, uncached texts
until the catalogue is exhausted, then the cache is hot), and prints RSS and peak RSS (VmHWM)
read from /proc after load, after warm-up and after the traffic. These numbers size the
Kubernetes requests/limits in k8s/base. Linux only.

    python scripts/measure_memory.py --requests 300 --candidates 100
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reranker.v1 import reranker_pb2 as pb  # noqa: E402
from reranker.v1 import reranker_pb2_grpc as pb_grpc  # noqa: E402

ITEMS = ROOT.parent / "shared" / "data" / "ml-100k" / "ml-100k.item"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024.0
    return values["VmRSS"], values["VmHWM"]


def titles() -> list[str]:
    if not ITEMS.is_file():
        return [f"synthetic item number {i} with a few words of text" for i in range(1682)]
    rows = ITEMS.read_text(encoding="utf-8").splitlines()[1:]
    return [" ".join(r.split("\t")[1:]) for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--users", type=int, default=50, help="distinct users the requests cycle through")
    parser.add_argument("--encoder", default="transformer")
    parser.add_argument("--extra", nargs="*", default=[], help="extra `reranker serve` flags")
    opts = parser.parse_args()

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "reranker", "serve", f"--address=127.0.0.1:{port}", "--metrics-address=",
           f"--encoder={opts.encoder}", *opts.extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        started = time.monotonic()
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() - started > 180:
                print("server did not become ready", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"ready after {time.monotonic() - started:.1f} s")
        rss, hwm = memory_mib(proc.pid)
        print(f"after load+warm-up: rss={rss:.0f} MiB peak={hwm:.0f} MiB")
        stub = pb_grpc.RerankerServiceStub(channel)
        texts = titles()
        t0 = time.monotonic()
        for r in range(opts.requests):
            user = f"user-{r % opts.users}"
            base = (r * opts.candidates) % len(texts)
            cands = [
                pb.Candidate(item_id=str((base + i) % len(texts)), score=1.0 / (i + 1), text=texts[(base + i) % len(texts)])
                for i in range(opts.candidates)
            ]
            events = [pb.Event(user_id=user, item_id=cands[0].item_id, type=pb.EVENT_TYPE_CLICK, text=cands[0].text)]
            stub.Rerank(pb.RerankRequest(user_id=user, candidates=cands, context_events=events), timeout=30)
            if r % 100 == 99:
                rss, hwm = memory_mib(proc.pid)
                print(f"after {r + 1} requests: rss={rss:.0f} MiB peak={hwm:.0f} MiB")
        elapsed = time.monotonic() - t0
        rss, hwm = memory_mib(proc.pid)
        print(f"(users={opts.users}, candidates/request={opts.candidates}, catalogue={len(texts)} texts)")
        print(f"after traffic: rss={rss:.0f} MiB peak={hwm:.0f} MiB ({opts.requests} requests in {elapsed:.1f} s)")
        channel.close()
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
