"""Thread sizing for a CPU-limited sidecar: the cgroup v2 quota caps torch's intra-op threads."""

from __future__ import annotations

import os

from reranker.model.encoder import available_cpus


def test_cgroup_quota_caps_the_cpu_count(tmp_path) -> None:
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 threads
    assert available_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU -> still one thread
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").unlink()
    assert available_cpus(tmp_path) == affinity
