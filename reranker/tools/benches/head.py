"""Benchmark: per-request cost of the ranking head's features + score, against the fixed blend.

    reranker bench head [--head head.npz] [--candidates 100] [--history 50] [--repeat 500]

Prints latency percentiles in milliseconds; no assertions (numbers depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from reranker.ranking import head as ranking_head
from reranker.ranking import scoring


def percentiles(samples: list[float]) -> str:
    ms = np.array(samples) * 1000.0
    return " ".join(f"p{q}={np.percentile(ms, q):.3f}" for q in (50, 90, 99))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reranker bench head", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="", help="a trained artefact; default: a random rank-64 head, d=384")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=500)
    parser.add_argument("--blas-threads", choices=("default", "1"), default="1",
                        help="1 = what the server does (scoring.single_threaded_blas at load)")
    args = parser.parse_args(argv)
    if args.blas_threads == "1":
        scoring.single_threaded_blas()
    rng = np.random.default_rng(0)
    if args.head:
        head = ranking_head.load(args.head)
    else:
        f, d, r = len(ranking_head.FEATURES), 384, 64
        head = ranking_head.RankingHead(
            weights=rng.normal(size=f), mean=np.zeros(f), std=np.ones(f),
            adapter_down=rng.normal(0, 0.05, (d, r)).astype(np.float32),
            adapter_up=rng.normal(0, 0.05, (r, d)).astype(np.float32),
            prior=np.zeros(d, dtype=np.float32), popularity={}, encoder_version="bench",
        )
    d = head.dim
    items = scoring.l2_normalize(rng.normal(size=(args.candidates, d)))
    history = scoring.l2_normalize(rng.normal(size=(args.history, d)))
    user = scoring.l2_normalize(history.mean(axis=0))
    # Ids the collaborative tables know (a trained head), so covisit/transition do their real lookups.
    known = list(head.graph.ids) or [str(i) for i in range(max(args.candidates, args.history))]
    picked = rng.choice(len(known), size=args.candidates + args.history, replace=len(known) < args.candidates + args.history)
    ids = [known[j] for j in picked[: args.candidates]]
    history_ids = [known[j] for j in picked[args.candidates :]]
    upstream = rng.normal(size=args.candidates)
    has_vector = np.ones(args.candidates, dtype=bool)
    timings: dict[str, list[float]] = {"fixed blend": [], "head": []}
    for _ in range(args.repeat):
        t = time.perf_counter()
        scoring.rank(upstream, items, has_vector, user, weight=0.5)
        timings["fixed blend"].append(time.perf_counter() - t)
        t = time.perf_counter()
        head.rank(ids, upstream, items, has_vector, user, history, history_ids)
        timings["head"].append(time.perf_counter() - t)
    print(f"candidates={args.candidates} history={args.history} d={d} repeat={args.repeat} blas_threads={args.blas_threads}")
    for name, samples in timings.items():
        print(f"{name:<12} {percentiles(samples)} ms")


if __name__ == "__main__":
    main()
