"""Smoke tests of the profile-layout measurements (`reranker bench profile-bytes`, experiments/compact_profile_fidelity.py) (small runs; no size or timing targets here:
tests/test_compact_profiles.py holds the layout's own assertions)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA


def _script(name: str, *args: str, timeout: float = 300) -> str:
    """experiments/<name>, or `reranker bench <name>` for a name without .py."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [str(REPO / "experiments" / name)] if name.endswith(".py") else ["-m", "reranker", "bench", name]
    done = subprocess.run([sys.executable, *command, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _rows(out: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell(s): {"full": [cells...]} / {"compact 20": [...]}."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("|---") and len(cells) > 3:
            rows[cells[0] if not cells[1].isdigit() else f"{cells[0]} {cells[1]}"] = cells
    return rows


needs_ml100k = pytest.mark.skipif(not (SHARED_DATA / "ml-100k" / "ml-100k.inter").is_file(), reason="no ml-100k")


@needs_ml100k
def test_fidelity_self_check_of_one_layout_against_itself_is_exact() -> None:
    out = _script("compact_profile_fidelity.py", "--encoder", "fake", "--users", "25", "--layouts", "compact,compact",
                  "--item-cache-size", "0")
    row = _rows(out)["compact"]
    assert row[1] == "0.00e+00" and row[3] == "0.00e+00", row  # final and semantic scores
    assert row[4].startswith("25/25") and row[5].startswith("25/25"), row
    assert "+0.0000 [+0.0000, +0.0000]" in row[9]
    assert "met (largest difference 0.00e+00" in out


@needs_ml100k
def test_fidelity_compares_compact_and_a_compact_service_that_lost_history_vectors() -> None:
    out = _script("compact_profile_fidelity.py", "--encoder", "fake", "--users", "25", "--item-cache-size", "150")
    rows = _rows(out)
    assert {"compact", "compact, item cache 150"} <= rows.keys(), out
    assert float(rows["compact"][1]) < 1e-3, rows["compact"]
    missing = rows["compact, item cache 150"][10]
    assert int(missing.split("/")[0].replace(",", "")) > 0, missing  # the degraded path really ran
    assert "0 texts encoded outside the table" in out


def test_profile_bytes_in_process_measures_the_layout() -> None:
    out = _script("profile-bytes", "--users", "30", "--events", "20", "--no-redis")
    rows = _rows(out)
    compact = float(rows["compact 20"][2].replace(",", ""))
    assert 0 < compact < 20 * 384 * 4 / 5, out  # tracemalloc growth per user: far below copying 20 vectors
    assert float(rows["compact 20"][3].replace(",", "")) > 0  # held_bytes
    assert rows["compact 20"][4] == "not run" and "in process" in rows["compact 20"][6]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_profile_bytes_measures_redis_in_a_throwaway_server() -> None:
    out = _script("profile-bytes", "--users", "20", "--events", "5")
    for layout in ("compact",):
        cells = _rows(out)[f"{layout} 5"]
        assert all(re.fullmatch(r"[\d,]+", c) and float(c.replace(",", "")) > 0 for c in cells[2:6]), cells
