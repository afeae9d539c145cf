"""Benchmarks of learning from live traffic; they print JSON, nothing is asserted.

  swap: 8 concurrent clients against `reranker serve` (fake encoder, a head with ml-100k-sized
        tables); p99 latency in a steady phase, then in a phase where a new head file is renamed
        into place every --swap-every seconds (the server reloads it), then steady again; failed
        RPCs counted in each phase.
  cpu:  server CPU time per request (utime + stime of the server process / requests) with the
        training log off and on (training_log_sample=1.0), alternated --rounds times in one run;
        and, less noisy, the writer thread's own CPU (reranker_training_log_cpu_seconds) per request
        as a share of the server's CPU per request with the log off. The request path's part (one
        deque append per list or event batch) is not in the writer's counter; it is in the first.

    reranker bench learning swap
    reranker bench learning cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reranker.model.encoder import FakeEncoder
from reranker.ranking import head as ranking_head
from reranker.tools.harness import ServerProcess, free_port
from reranker.tools.loadtest import Workload, run_load, warm_up


DIM = 384


def synthetic_head(seed: int, items: int = 1700, k: int = 50, factors: int = 32) -> ranking_head.RankingHead:
    """A head the size of an ml-100k one (1.7k items, 50 neighbours per item, 32 ALS factors)."""
    rng = np.random.default_rng(seed)
    f = len(ranking_head.FEATURES)
    ids = tuple(f"item-{i}" for i in range(items))

    def table() -> ranking_head.NeighbourTable:
        indptr = np.arange(0, (items + 1) * k, k, dtype=np.int64)
        return ranking_head.NeighbourTable(indptr, rng.integers(0, items, items * k).astype(np.int32),
                                           rng.random(items * k).astype(np.float32))

    graph = ranking_head.ItemGraph(ids, table(), table(), rng.normal(size=(items, factors)).astype(np.float32))
    return ranking_head.RankingHead(
        weights=rng.normal(size=f), mean=np.zeros(f), std=np.ones(f),
        adapter_down=rng.normal(scale=0.01, size=(DIM, 16)).astype(np.float32),
        adapter_up=rng.normal(scale=0.01, size=(16, DIM)).astype(np.float32),
        prior=np.zeros(DIM, dtype=np.float32), popularity={i: float(rng.random()) for i in ids},
        encoder_version=FakeEncoder.version, graph=graph,
    )


def publish(head: ranking_head.RankingHead, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    head.save(tmp)
    os.replace(tmp, path)


def phase(target: str, workload: Workload, label: str, during: object = None) -> dict[str, object]:
    report = run_load(target, workload, on_tick=during, tick_s=0.05)
    out = {"phase": label, **report.summary(), "failed_rpcs": report.error_count}
    return out


def bench_swap(args: argparse.Namespace) -> dict[str, object]:
    workload = Workload(clients=8, duration_s=args.duration, candidates=args.candidates, catalog=1700, users=300,
                        new_item_fraction=0.0, record_every=10**9, warmup_events_per_user=20)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "head.npz"
        heads = [synthetic_head(0), synthetic_head(1)]
        publish(heads[0], path)
        server_args = ["--encoder", "fake", "--head-path", str(path), "--head-reload-seconds", "0.05",
                       "--metrics-address", "", "--access-log-sample", "0"]
        with ServerProcess(server_args) as server:
            server.wait_serving()
            warm_up(server.target, workload)
            run_load(server.target, Workload(**{**workload.__dict__, "duration_s": 2.0}))  # warm every path
            phases = [phase(server.target, workload, "steady")]
            swaps = [0]
            last = [time.monotonic()]

            def swap(_elapsed: float) -> None:
                if time.monotonic() - last[0] >= args.swap_every:
                    swaps[0] += 1
                    publish(heads[swaps[0] % 2], path)
                    last[0] = time.monotonic()

            phases.append({**phase(server.target, workload, "swapping", swap), "swaps": swaps[0]})
            phases.append(phase(server.target, workload, "steady again"))
            reloads = sum("now serves" in line for line in server.log.splitlines())
    steady = max(float(phases[0]["p99_ms"]), float(phases[2]["p99_ms"]))  # type: ignore[arg-type]
    return {
        "benchmark": "hot swap", "clients": 8, "candidates": args.candidates, "phases": phases,
        "reloads_logged": reloads, "p99_swap_over_steady": round(float(phases[1]["p99_ms"]) / steady, 2),  # type: ignore[arg-type]
    }


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _writer_cpu_seconds(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("reranker_training_log_cpu_seconds_total "):
            return float(line.split()[1])
    return 0.0


def bench_cpu(args: argparse.Namespace) -> dict[str, object]:
    workload = Workload(clients=4, duration_s=args.duration, candidates=args.candidates, catalog=1700, users=300,
                        new_item_fraction=0.0, record_every=5, warmup_events_per_user=20)
    runs: dict[str, list[float]] = {"off": [], "on": []}
    writer: list[float] = []  # CPU of the writer thread per request, from the server's own counter
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mode in ("off", "on"):
                extra = ["--training-log-dir", str(Path(tmp) / f"log-{round_}"), "--training-log-sample", "1.0"] if mode == "on" else []
                port = free_port()
                server_args = ["--encoder", "fake", "--metrics-address", f"127.0.0.1:{port}", "--access-log-sample", "0", *extra]
                with ServerProcess(server_args) as server:
                    server.wait_serving()
                    warm_up(server.target, workload)
                    run_load(server.target, Workload(**{**workload.__dict__, "duration_s": 1.0}))
                    before, writer_before = _cpu_seconds(server.proc.pid), _writer_cpu_seconds(port)
                    report = run_load(server.target, workload)
                    time.sleep(1.5)  # the writer drains its queue
                    used, writer_used = _cpu_seconds(server.proc.pid) - before, _writer_cpu_seconds(port) - writer_before
                runs[mode].append(1e6 * used / max(1, report.requests))
                if mode == "on":
                    writer.append(1e6 * writer_used / max(1, report.requests))
        logged = sum(1 for _ in Path(tmp).rglob("served-*.tsv"))
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    return {
        "benchmark": "training log cpu", "candidates": args.candidates, "rounds": args.rounds,
        "server_cpu_us_per_request": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "median_off_us": round(off, 1), "median_on_us": round(on, 1),
        "added_percent": round(100.0 * (on - off) / off, 1), "served_files": logged,
        "writer_thread_cpu_us_per_request": [round(x, 1) for x in writer],
        "writer_thread_percent_of_off": round(100.0 * statistics.median(writer) / off, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reranker bench learning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("swap", "cpu"))
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per phase / run")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--swap-every", type=float, default=0.5, help="seconds between head files (swap)")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs (cpu)")
    args = parser.parse_args(argv)
    result = bench_swap(args) if args.which == "swap" else bench_cpu(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
