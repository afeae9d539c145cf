"""`reranker learn bench`: the online gate's error rates and speed on generated traffic (simulate.py).

Each run starts a fresh fleet whose main arm serves zero-shot (quality q), gives the learner one
candidate (`--candidate`, no offline gate) and serves traffic in steps of `look` lists, with one
learner look after each, until the learner decides or `max_lists` lists were served:
- `aa`: the candidate is exactly as good as main (quality q): any promotion is a false one;
- `worse`: the candidate is 10% worse (0.9 q): it should be rolled back;
- `better`: 10% better (1.1 q): it should be promoted.
It prints per kind the decisions counted over the runs and the median lists to a decision (all
lists served from the canary's publication to the decision, and the canary's judged lists).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from reranker.config import Settings
from reranker.learner.learner import Learner
from reranker.learning.simulate import Traffic, toy_head

KINDS = {"aa": 1.0, "worse": 0.9, "better": 1.1}


def bench_settings(root: Path, **overrides: Any) -> Settings:
    base = Settings(
        encoder="fake", experiment_arms=f"canary=20:{root / 'heads' / 'canary.npz'},main=70:{root / 'heads' / 'main.npz'}",
        learn_log_root=str(root / "logs"), learn_history_path=str(root / "history.jsonl"),
        online_metrics_window_seconds=3600.0, learn_min_lists=500, learn_max_canary_lists=5000,
        learn_retrain_lists=10**9,
    )
    return dataclasses.replace(base, **overrides)


def one_run(kind: str, seed: int, *, quality: float = 0.5, look: int = 500, max_lists: int = 60_000,
            factor: float | None = None, **overrides: Any) -> dict[str, Any]:
    """One run of `kind` (or of a candidate `factor` x as good as main); its decision and how many lists it took."""
    with tempfile.TemporaryDirectory(prefix="reranker-learn-bench-") as tmp:
        root = Path(tmp)
        settings = bench_settings(root, **overrides)
        candidate = toy_head(seed + 1)
        traffic = Traffic(settings, root / "logs", {None: quality, candidate.version: quality * (factor or KINDS[kind])}, seed=seed)
        learner = Learner(settings, candidate=candidate)
        learner.tick()  # publishes the candidate to the canary arm
        decision: dict[str, Any] | None = None
        try:
            while traffic.served < max_lists:
                traffic.serve(look)
                decision = learner.tick()
                if decision is not None:
                    break
        finally:
            traffic.close()
        online = (decision or {}).get("online") or {}
        return {"kind": kind, "seed": seed, "decision": decision["decision"] if decision else "none",
                "lists": traffic.served, "canary_lists": online.get("lists", {}).get("canary", 0)}


def run(kinds: list[str], runs: int, seed: int = 0, **options: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in kinds:
        results = [one_run(kind, seed + r, **options) for r in range(runs)]
        decided = [r for r in results if r["decision"] != "none"]
        out[kind] = {
            "runs": runs,
            "decisions": dict(Counter(r["decision"] for r in results)),
            "median_lists_to_decision": statistics.median(r["lists"] for r in decided) if decided else None,
            "median_canary_lists_to_decision": statistics.median(r["canary_lists"] for r in decided) if decided else None,
        }
    return out
