"""The chaos soak in a short form: every fault kind once, against real processes (serve, consume,
two redis-servers, files, signals). `reranker soak --chaos --duration 600` is the long form."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reranker.tools.chaos import FAULTS, ChaosSoak


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (scripts/ensure-redis.sh)")
def test_nothing_acknowledged_is_lost_and_nothing_dies_under_injected_faults(tmp_path: Path) -> None:
    soak = ChaosSoak(tmp_path, duration_s=45.0, faults=len(FAULTS), seed=7, log=print)
    try:
        report = soak.run()
    finally:
        soak.close()
    print(report.summary())
    assert sum(report.faults.values()) == len(FAULTS) and set(report.faults) == set(FAULTS)
    assert report.rpc_events_acked > 100 and report.stream_events_added > 100 and report.stream_refusals_added > 0
    assert report.rerank_outcomes["VARIANT_RERANKED"] > 0
    assert report.passed, report.problems
