"""`reranker bench` smoke tests: each mode runs briefly and prints its fields (no timing assertions)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from reranker.tools.bench import load_texts, percentiles_ms
from conftest import REPO, SHARED_DATA


def _bench(*args: str, timeout: float = 120) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "reranker", "bench", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


@pytest.mark.parametrize("echo_kind", ["threads", "asyncio"])
def test_rerank_mode_reports_latency_and_the_echo_ratio(echo_kind: str) -> None:
    out = _bench(
        "rerank", "--server-args", "--encoder fake --log-level WARNING", "--candidates", "50",
        "--concurrency", "2", "--duration", "1", "--warmup", "0.3", "--pool", "100", "--users", "3",
        "--echo-kind", echo_kind,
    )
    assert f"echo={echo_kind}" in out
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    for label in ("rerank", "echo"):
        fields = _fields(lines[label])
        assert {"requests", "errors", "qps", "p50_ms", "p90_ms", "p99_ms", "p999_ms"} <= fields.keys()
        assert int(fields["requests"]) > 0 and fields["errors"] == "0"
    assert _fields(lines["rerank"])["fallbacks"] == "0"
    assert {"p50", "p99", "qps"} <= _fields(lines["ratio rerank/echo"]).keys()


@pytest.mark.parametrize("hit_ratio", ["1", "0.5"])
def test_packed_form_writes_every_figure_to_json(tmp_path, hit_ratio: str) -> None:
    path = tmp_path / "bench.json"
    out = _bench(
        "rerank", "--server-args", "--encoder fake --log-level WARNING", "--candidates", "30", "--form", "packed",
        "--concurrency", "2", "--duration", "0.6", "--warmup", "0.2", "--pool", "60", "--users", "3",
        "--hit-ratio", hit_ratio, "--echo-kind", "asyncio", "--rounds", "2", "--json", str(path),
    )
    assert "form=packed" in out
    report = json.loads(path.read_text())
    assert report["config"]["form"] == "packed" and report["config"]["echo"] == "asyncio"
    for server in ("rerank", "echo"):
        figures = report[server]
        assert figures["requests"] > 0 and figures["errors"] == 0 and figures["fallbacks"] == 0
        assert figures["qps"] > 0 and figures["server_cpu_us_per_request"] > 0
        assert 0 < figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"] <= figures["p999_ms"]
    ratio = report["ratio"]
    assert ratio["p50_ms"] == pytest.approx(report["rerank"]["p50_ms"] / report["echo"]["p50_ms"])
    assert ratio["server_cpu_us_per_request"] > 0 and ratio["qps"] > 0


def test_rerank_mode_cold_path_encodes_unseen_items() -> None:
    out = _bench(
        "rerank", "--server-args", "--encoder fake --log-level WARNING", "--candidates", "20", "--hit-ratio", "0",
        "--concurrency", "2", "--duration", "0.5", "--warmup", "0", "--pool", "20", "--users", "2", "--no-echo",
    )
    assert "hit_ratio=0.00" in out
    fields = _fields(next(line for line in out.splitlines() if line.startswith("rerank:")))
    assert int(fields["requests"]) > 0 and fields["errors"] == "0" and fields["fallbacks"] == "0"


def test_encoder_and_memory_modes_print_their_numbers() -> None:
    out = _bench("encoder", "--encoder", "fake", "--texts", "64", "--repeats", "1", "--reference", "none")
    assert float(_fields(next(line for line in out.splitlines() if line.startswith("ours:")))["texts_per_s"]) > 0
    out = _bench("memory", "--encoder", "fake", "--fake-dim", "32", "--items", "5000")
    fields = _fields(out.splitlines()[-1])
    assert {"model_loaded", "with_items", "items_delta", "vector_matrix"} <= fields.keys()
    assert "items=5000" in out


def test_bench_texts_come_from_recbole_item_files_or_are_synthetic(tmp_path) -> None:
    path = SHARED_DATA / "ml-100k" / "ml-100k.item"
    if path.is_file():
        assert load_texts(str(path), 3) == ["Toy Story", "GoldenEye", "Four Rooms"]
    plain = tmp_path / "t.txt"
    plain.write_text("one\n\ntwo\n")
    assert load_texts(str(plain), 0) == ["one", "two"]
    assert len(set(load_texts("", 50))) == 50
    assert percentiles_ms([0.001] * 10)["p99"] == 1.0


def test_every_bench_tool_is_a_command_with_its_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """`reranker bench <name> --help` for each tool of reranker.tools.benches: its module imports and
    its own parser answers under the command's name."""
    from reranker.cli import main
    from reranker.tools.benches import BENCHES

    for name in BENCHES:
        with pytest.raises(SystemExit) as exited:
            main(["bench", name, "--help"])
        assert exited.value.code == 0, name
        assert f"usage: reranker bench {name}" in capsys.readouterr().out, name


def test_the_head_tool_prints_its_latencies() -> None:
    out = _bench("head", "--candidates", "10", "--history", "5", "--repeat", "5")
    assert "fixed blend" in out and "head" in out and "p50=" in out


def test_harness_reads_this_process_memory_and_finds_a_free_port() -> None:
    from reranker.tools.harness import free_port, proc_memory, rss_bytes

    memory = proc_memory()
    assert memory["VmRSS"] > 1 << 20 and memory["VmHWM"] >= memory["VmRSS"] and (rss_bytes() or 0) > 0
    assert 0 < free_port() < 65536


def test_rerank_breakdown_accounts_for_the_server_cpu_by_stage(tmp_path) -> None:
    """--breakdown: every named row and every pipeline stage appears, the timed stages add up to no
    more than the server process's CPU, and the scoring floor is measured in the same run."""
    from reranker.pipeline import stages
    from reranker.tools import stagecpu

    path = tmp_path / "bench.json"
    out = _bench(
        "rerank", "--server-args", f"--encoder fake --fake-dim 32 --log-level WARNING --training-log-dir {tmp_path / 'log'}"
        " --training-log-sample 1", "--candidates", "40", "--form", "packed", "--concurrency", "1", "--duration", "1",
        "--warmup", "0.3", "--pool", "80", "--users", "3", "--rounds", "2", "--echo-kind", "asyncio",
        "--breakdown", "--json", str(path),
    )
    report = json.loads(path.read_text())["breakdown"]
    rows = report["rows"]
    assert list(rows)[: len(stagecpu.ROW_ORDER)] == list(stagecpu.ROW_ORDER)
    assert stagecpu.TIMERS in rows
    for row in rows:
        assert row in out  # printed as a table too
    # Each stage of the real pipeline was timed, under its own name, and in a row.
    names = [s.__name__ for s in (*stages.GATES, *stages.STAGES)]
    assert set(names) <= set(report["stages_us"])
    assert all(report["stages_us"][n] > 0 for n in names)
    measured = {row: us for row, us in rows.items() if row != stagecpu.TRANSPORT}
    for row in (stagecpu.DECODE, stagecpu.VECTORS, stagecpu.USER, stagecpu.SCORING, stagecpu.ORDERING,
                stagecpu.ENCODE, stagecpu.OBSERVE, stagecpu.TRAINING, stagecpu.GLUE):
        assert measured[row] > 0, row
    # What the timers saw inside the process is part of the process's CPU: the rest is transport.
    assert 0 < sum(measured.values()) <= report["total_us"]
    assert rows[stagecpu.TRANSPORT] >= 0
    assert sum(rows.values()) == pytest.approx(report["total_us"])
    assert report["requests"] > 0 and report["blocked"] == 0
    floor = report["scoring_floor"]
    assert floor["candidates"] == 40 and floor["dim"] == 32 and floor["query_rows"] == stagecpu.FLOOR_QUERY_ROWS
    assert 0 < floor["best_us"] <= floor["median_us"]
    assert "scoring floor:" in out and "target: echo_cpu_us=" in out
    # Each call's objects were freed in the next call, timed; the event loop's thread is named.
    assert rows[stagecpu.RELEASE] > 0 and rows[stagecpu.GC] >= 0
    assert any(name.startswith("grpc-loop") for name in report["threads_us"]) and "by thread (us/req):" in out
    split = report["transport_us"]  # the transport row, split by thread
    assert split["event loop"] + split["other threads"] == pytest.approx(rows[stagecpu.TRANSPORT])
    assert split["other threads"] > 0 and f"{stagecpu.TRANSPORT} = the event loop's thread" in out


def test_stage_clock_moves_a_collection_out_of_the_spans_it_ran_in() -> None:
    """A cyclic collection inside a timed span is counted under "gc", not in that span or its parents."""
    import gc
    import time

    from reranker.tools.stagecpu import StageClock

    clock = StageClock()

    def collect() -> None:
        for _ in range(50):
            gc.collect()

    inner = clock.timed("inner", collect)
    outer = clock.timed("outer", lambda: (inner(), sum(range(20_000))))
    gc.callbacks.append(clock.on_gc)
    try:
        t0 = time.thread_time_ns()
        outer()
        elapsed = time.thread_time_ns() - t0
    finally:
        gc.callbacks.remove(clock.on_gc)
    assert clock.counts["gc"] >= 50
    assert clock.spans["gc"] > 0.5 * elapsed  # 50 full collections dwarf the rest
    assert 0 <= clock.spans["inner"] < clock.spans["gc"] / 5
    assert clock.spans["inner"] <= clock.spans["outer"] and clock.spans["outer"] + clock.spans["gc"] <= elapsed
    assert clock.open_spans() == []
