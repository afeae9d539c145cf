"""Measure the resident memory of a real `reranker serve` process with the packaged model.

Starts the server as a subprocess (real model unless --encoder fake), waits for SERVING, sends
Rerank traffic built from the MovieLens-100k titles (every request brings new, uncached texts
until the catalogue is exhausted, then the cache is hot), and prints RSS and peak RSS (VmHWM)
read from /proc after load, after warm-up and after the traffic. These numbers size the
Kubernetes requests/limits in k8s/base. Linux only.

    reranker bench server-memory --requests 300 --candidates 100
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc

from reranker.tools.harness import SHARED_DATA, child_env, free_port, proc_memory, wait_serving
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc


ITEMS = SHARED_DATA / "ml-100k" / "ml-100k.item"


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    values = proc_memory(pid)
    return values["VmRSS"] / 2**20, values["VmHWM"] / 2**20


def titles() -> list[str]:
    if not ITEMS.is_file():
        return [f"synthetic item number {i} with a few words of text" for i in range(1682)]
    rows = ITEMS.read_text(encoding="utf-8").splitlines()[1:]
    return [" ".join(r.split("\t")[1:]) for r in rows]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reranker bench server-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--users", type=int, default=50, help="distinct users the requests cycle through")
    parser.add_argument("--encoder", default="transformer")
    parser.add_argument("--extra", nargs="*", default=[], help="extra `reranker serve` flags")
    opts = parser.parse_args(argv)

    port = free_port()
    env = child_env()
    cmd = [sys.executable, "-m", "reranker", "serve", f"--address=127.0.0.1:{port}", "--metrics-address=",
           f"--encoder={opts.encoder}", *opts.extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        try:
            wait_serving(f"127.0.0.1:{port}", 180.0, proc)
        except RuntimeError:
            print("server did not become ready", file=sys.stderr)
            return 1
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
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
