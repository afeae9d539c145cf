"""A second replica on a shared catalog: time to warm Reranks, and what the catalog costs in RSS.

    reranker bench catalog --items 100000 --dim 384

Writes a catalog of --items random unit vectors (the fake encoder's model version, so a
`--encoder fake` server accepts it; the point is memory and start-up, not the vectors), then starts
--replicas `reranker serve` processes on it one after the other (warm-up off: nothing is encoded).
For each: seconds from spawn to SERVING, and from SERVING to the first Rerank of 100 catalog items
answered with zero texts encoded; then Reranks over every catalog item (all pages touched) and the
process's RssAnon (private) and RssFile (file pages, shared by all replicas mapping the file)
before and after, from /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from reranker.model.catalog import write_catalog
from reranker.model.encoder import FakeEncoder
from reranker.tools.harness import REPO, child_env, proc_memory, wait_serving
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc


def rss(pid: int) -> dict[str, int]:
    return proc_memory(pid, smaps=True)


def start(catalog: Path | None, dim: int) -> tuple[subprocess.Popen[str], int, float]:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "reranker", "serve", "--encoder", "fake", "--fake-dim", str(dim), "--address",
         "127.0.0.1:0", "--metrics-address", "", "--catalog-path", str(catalog or ""), "--no-warmup",
         "--grace-seconds", "1"],
        cwd=REPO, env=child_env(), stderr=subprocess.PIPE, text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if m := re.search(r"listening on \S+ \(port (\d+)[,)]", line):
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, int(m.group(1)), started
    raise RuntimeError(f"server exited with {process.wait()}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reranker bench catalog", description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--replicas", type=int, default=2)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="catalog-"))
    path = tmp / "catalog.bin"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"item-{i}" for i in range(args.items)]
    texts = [f"text of item {i}" for i in range(args.items)]
    t = time.perf_counter()
    m = write_catalog(path, ids, texts, vectors, model_version=FakeEncoder.version, dtype=args.dtype)
    size = path.stat().st_size
    print(f"catalog: {m.count} items x {m.dim} {m.dtype}, {size / 2**20:.1f} MiB, written in {time.perf_counter() - t:.1f} s")
    del vectors
    processes = []
    try:
        baseline, port, _ = start(None, args.dim)  # the same server without a catalog
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_serving(f"127.0.0.1:{port}", 600.0, baseline, poll_s=0.01)
        pb_grpc.RerankerServiceStub(channel).Rerank(pb.RerankRequest(user_id="u", candidates=[
            pb.Candidate(item_id=f"item-{i}", score=1.0) for i in range(100)]))
        base = rss(baseline.pid)
        print(f"baseline (no catalog): RssAnon {base['RssAnon'] / 2**20:.1f} MiB, RssFile {base['RssFile'] / 2**20:.1f} MiB")
        channel.close()
        baseline.send_signal(signal.SIGTERM)
        baseline.wait(30)
        for replica in range(args.replicas):
            process, port, spawned = start(path, args.dim)
            processes.append(process)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            wait_serving(f"127.0.0.1:{port}", 600.0, process, poll_s=0.01)
            healthy = time.perf_counter()
            stub = pb_grpc.RerankerServiceStub(channel)
            stub.RecordEvents(pb.RecordEventsRequest(events=[
                pb.Event(user_id="u", item_id=f"item-{i}", type=pb.EVENT_TYPE_CLICK, event_id=f"e{i}") for i in range(20)]))
            first = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[
                pb.Candidate(item_id=f"item-{i}", score=1.0, text=f"text of item {i}") for i in range(100, 200)]))
            warm = time.perf_counter()
            before = rss(process.pid)
            for start_id in range(0, args.items, 500):
                stub.Rerank(pb.RerankRequest(user_id="u", candidates=[
                    pb.Candidate(item_id=f"item-{i}", score=1.0) for i in range(start_id, min(args.items, start_id + 500))]))
            after = rss(process.pid)
            profile = stub.GetUserProfile(pb.GetUserProfileRequest(user_id="u"))
            print(f"replica {replica + 1}: SERVING {healthy - spawned:.2f} s after spawn; first Rerank of 100 catalog "
                  f"items {1000 * (warm - healthy):.0f} ms after SERVING (personalized: {first.variant}, profile of "
                  f"{profile.event_count} events, encoder never called: warm-up off, all items from the catalog)")
            print(f"  RSS after the first Rerank: RssAnon {before['RssAnon'] / 2**20:.1f} MiB, RssFile "
                  f"{before['RssFile'] / 2**20:.1f} MiB; after Reranks over all {args.items} items: RssAnon "
                  f"{after['RssAnon'] / 2**20:.1f} MiB (+{(after['RssAnon'] - before['RssAnon']) / 2**20:.1f}), RssFile "
                  f"{after['RssFile'] / 2**20:.1f} MiB (+{(after['RssFile'] - before['RssFile']) / 2**20:.1f}; the "
                  f"catalog file is {size / 2**20:.1f} MiB, shared)")
            print(f"  smaps: Pss {after['Pss'] / 2**20:.1f} MiB, Shared_Clean {after['Shared_Clean'] / 2**20:.1f} MiB, "
                  f"Private_Clean {after['Private_Clean'] / 2**20:.1f} MiB, Shared_Dirty {after['Shared_Dirty'] / 2**20:.1f} "
                  f"MiB (file pages another replica also maps are Shared_* and count 1/N in Pss; the served copy's "
                  f"pages are dirty until the kernel writes them back)")
            channel.close()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        shutil.rmtree(tmp)  # the catalog and the replicas' served copy of it
    return 0


if __name__ == "__main__":
    sys.exit(main())
