"""`reranker learn`: its decisions on generated traffic whose truth is known (simulate.py), through
real log files, real head files and, where it matters, a real server and a real learner process
that is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reranker.config import Settings
from reranker.learner import bench
from reranker.learning import confseq
from reranker.learner.learner import Learner
from reranker.learning.publishing import TMP_MARK, History
from reranker.learning.traininglog import read_training_log
from reranker.learning.simulate import Traffic, toy_head
from reranker.model.encoder import FakeEncoder
from reranker.ranking import head as ranking_head
from reranker.ranking.experiments import bucket_of
from reranker.tools.loadtest import ServerProcess
from reranker.v1 import reranker_pb2 as pb

from conftest import REPO, ServerFactory, candidate, fake_settings
from test_eval_cli import ml_slice  # noqa: F401 (the 60-user ml-100k slice, a module fixture)


def _fleet(tmp_path: Path, **overrides: object) -> Settings:
    return bench.bench_settings(tmp_path, learn_min_lists=200, learn_max_canary_lists=1500, **overrides)


def _until_decided(learner: Learner, traffic: Traffic, step: int = 300, limit: int = 30_000) -> dict:
    while traffic.served < limit:
        traffic.serve(step)
        entry = learner.tick()
        if entry is not None:
            return entry
    raise AssertionError(f"no decision after {traffic.served} lists")


def _env(settings: Settings) -> dict[str, str]:
    names = ("experiment_arms", "learn_log_root", "learn_history_path", "online_metrics_window_seconds",
             "learn_min_lists", "learn_max_canary_lists", "learn_retrain_lists", "encoder")
    return {**os.environ, "PYTHONPATH": str(REPO), **{f"RERANKER_{n.upper()}": str(settings.value(n)) for n in names}}


def _learn(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reranker", "learn", *argv], capture_output=True, text=True,
                          timeout=120, env=_env(settings))


def test_the_interval_holds_under_repeated_looks_where_a_fixed_one_does_not() -> None:
    """A/A: two arms with the same NDCG distribution, looked at 40 times each; the always-valid
    interval leaves 0 in at most alpha of the runs, a 95% interval read at every look far more often."""
    rng = np.random.default_rng(0)
    runs, looks, step = 300, 40, 100
    always = fixed = 0
    for _ in range(runs):
        a = rng.binomial(1, 0.3, looks * step) / np.log2(rng.integers(2, 12, looks * step))
        b = rng.binomial(1, 0.3, looks * step * 3) / np.log2(rng.integers(2, 12, looks * step * 3))
        wrong_always = wrong_fixed = False
        for t in range(1, looks + 1):
            ma, mb = confseq.Moments.of(a[: t * step].tolist()), confseq.Moments.of(b[: 3 * t * step].tolist())
            cs = confseq.compare(ma, mb, tau=0.01, alpha=0.05)
            wrong_always |= cs.gain or cs.loss
            se = (ma.variance / ma.n + mb.variance / mb.n) ** 0.5
            wrong_fixed |= abs(ma.mean - mb.mean) > 1.96 * se
        always += wrong_always
        fixed += wrong_fixed
    assert always / runs <= 0.05
    assert fixed / runs >= 0.15  # what peeking at a fixed-sample interval does


@pytest.mark.parametrize("factor, expected", [(1.6, "promote"), (0.6, "rollback"), (1.0, "withdrawn")])
def test_a_better_head_is_promoted_a_worse_one_rolled_back_and_a_tie_left_alone(
    tmp_path: Path, factor: float, expected: str
) -> None:
    settings = _fleet(tmp_path)
    head = toy_head(7)
    traffic = Traffic(settings, tmp_path / "logs", {None: 0.5, head.version: 0.5 * factor}, seed=3)
    learner = Learner(settings, candidate=head)
    assert learner.tick()["decision"] == "canary"  # type: ignore[index]
    assert learner.versions() == (None, head.version)
    entry = _until_decided(learner, traffic)
    traffic.close()
    assert entry["decision"] == expected, entry
    online = entry["online"]
    assert online["lists"]["canary"] >= 100 and online["test"].startswith("normal-mixture")
    if expected == "promote":
        assert learner.versions() == (head.version, head.version)  # main serves it, the canary mirrors it
        assert online["lists"]["canary"] >= settings.learning.learn_min_lists and online["ndcg@10_diff"]["low"] > 0
    else:
        assert learner.versions() == (None, None)  # main is left alone (zero-shot), the canary withdrawn
        assert not (tmp_path / "heads" / "canary.npz").exists()
    if expected == "withdrawn":
        assert online["lists"]["canary"] >= settings.learning.learn_max_canary_lists
        assert online["ndcg@10_diff"]["low"] <= 0 <= online["ndcg@10_diff"]["high"]
    assert [e["decision"] for e in History(Path(settings.learning.learn_history_path)).entries] == ["canary", expected]
    assert learner.registry.get_sample_value("reranker_learner_decisions_total", {"decision": expected}) == 1
    status = _learn(settings, "status")
    assert status.returncode == 0 and status.stdout.count("\n") == 3 and f" {expected} " in status.stdout


def test_a_promoted_head_that_falls_below_zero_shot_is_rolled_back_to_zero_shot(tmp_path: Path) -> None:
    settings = _fleet(tmp_path)
    worse = toy_head(8)
    for arm in ("main", "canary"):  # promoted earlier: main serves it, the canary mirrors it
        worse.save(tmp_path / "heads" / f"{arm}.npz")
    traffic = Traffic(settings, tmp_path / "logs", {None: 0.5, worse.version: 0.3}, seed=4)
    learner = Learner(settings)
    assert learner.history.entries[-1]["decision"] == "recovered"  # main changed outside the learner: noted
    entry = _until_decided(learner, traffic)
    assert entry["decision"] == "floor" and entry["main_version"] is None
    assert learner.versions() == (None, None)
    traffic.serve(500)
    traffic.close()
    learner.source.refresh()
    newest = learner.source.lists[-300:]
    assert all("+" not in x.model_version for x in newest)  # every arm serves zero-shot again


def test_history_survives_a_restart_with_a_torn_line_and_lost_entries_are_recovered(tmp_path: Path) -> None:
    settings = _fleet(tmp_path)
    head = toy_head(9)
    traffic = Traffic(settings, tmp_path / "logs", {None: 0.5, head.version: 0.8}, seed=5)
    learner = Learner(settings, candidate=head)
    learner.tick()
    traffic.serve(500)
    assert learner.tick() is None  # still watching: the canary has fewer than learn_min_lists
    history = Path(settings.learning.learn_history_path)
    with history.open("ab") as fh:
        fh.write(b'{"decision": "promo')  # what a learner killed while appending leaves
    restarted = Learner(settings)  # a new process would do exactly this
    assert restarted.history.repaired and [e["decision"] for e in restarted.history.entries] == ["canary"]
    entry = _until_decided(restarted, traffic)
    assert entry["decision"] == "promote"
    # A learner killed after the rename but before the entry: the next start records what happened.
    lines = history.read_bytes().splitlines(keepends=True)
    history.write_bytes(b"".join(lines[:-1]))
    again = Learner(settings)
    last = again.history.entries[-1]
    assert last["decision"] == "recovered" and "promoted" in last["reason"] and last["main_version"] == head.version
    assert [e["decision"] for e in History(history).entries] == ["canary", "recovered"]
    assert len(Learner(settings).history.entries) == 2  # the next start has nothing more to recover
    # A canary published, then killed before its entry: the next start records it and watches it.
    toy_head(11).save(tmp_path / "heads" / "canary.npz")
    watching = Learner(settings)
    assert watching.history.entries[-1]["decision"] == "recovered" and watching.history.entries[-1]["canary"]
    assert len(Learner(settings).history.entries) == 3
    traffic.close()


def _wait(predicate: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_learner_killed_while_publishing_never_gets_half_a_head_served(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    settings = _fleet(tmp_path, learn_interval_seconds=0.05)
    heads = tmp_path / "heads"
    heads.mkdir()
    running, stub = make_server(fake_settings(experiment_arms=settings.ranking.experiment_arms, head_reload_seconds=0.002))
    big = toy_head(10, dim=64, items=400_000, encoder_version=FakeEncoder.version)  # a file that takes a while to write
    big.save(tmp_path / "big.npz")
    traffic = Traffic(settings, tmp_path / "logs", {None: 0.5}, seed=6)
    traffic.serve(200)
    traffic.close()
    learner = subprocess.Popen([sys.executable, "-m", "reranker", "learn", "run", "--candidate", str(tmp_path / "big.npz")],
                               env=_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: any(heads.glob(f".*{TMP_MARK}*")) or learner.poll() is not None)
        os.kill(learner.pid, signal.SIGSTOP)  # frozen mid-publish: written (partly), not renamed yet
        assert not (heads / "canary.npz").exists(), "the rename came first: the file is too small for this test"
        (tmp,) = heads.glob(f".*{TMP_MARK}*")
        assert running.service.reload_heads() is False  # the sidecar does not watch the temporary name
        os.kill(learner.pid, signal.SIGKILL)
    finally:
        learner.kill()
        learner.wait(30)
    canary_user = next(u for u in (f"user{j}" for j in range(1000)) if bucket_of(settings.ranking.experiment_salt, u) < 2000)
    request = pb.RerankRequest(user_id=canary_user, candidates=[candidate("a", 2.0, "x"), candidate("b", 1.0, "y")])
    assert "+" not in stub.Rerank(request).model_version  # still zero-shot
    assert tmp.exists() and History(Path(settings.learning.learn_history_path)).entries == []

    def reload_errors() -> float:
        return running.service.metrics.registry.get_sample_value("reranker_head_reloads_total", {"result": "error"})

    assert reload_errors() == 0
    try:
        ranking_head.load(tmp)
    except ranking_head.HeadError:  # killed mid-write: had a publisher exposed it, the sidecar refuses it
        shutil.copyfile(tmp, heads / "exposed.npz")
        os.replace(heads / "exposed.npz", heads / "canary.npz")
        _wait(lambda: reload_errors() == 1, timeout=30)
        assert "+" not in stub.Rerank(request).model_version and running.service.ready
        os.unlink(heads / "canary.npz")
    refused = reload_errors()
    done = _learn(settings, "run", "--once", "--candidate", str(tmp_path / "big.npz"))  # the restart
    assert done.returncode == 0, done.stderr[-2000:]
    assert not tmp.exists() and "left by a learner that was killed" in done.stderr
    assert [e["decision"] for e in History(Path(settings.learning.learn_history_path)).entries] == ["canary"]
    _wait(lambda: stub.Rerank(request).model_version.endswith("+" + big.version), timeout=30)
    assert ranking_head.load(heads / "canary.npz").version == big.version
    assert reload_errors() == refused  # the learner never exposed a partial file


def test_bench_prints_error_rates_and_lists_to_decision() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "reranker", "learn", "bench", "--runs", "2", "--kinds", "worse", "--quality", "0.8",
         "--look", "1000", "--max-lists", "40000", "--log-level", "WARNING"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)["worse"]
    assert report["runs"] == 2 and report["decisions"] == {"rollback": 2}
    assert 0 < report["median_canary_lists_to_decision"] < report["median_lists_to_decision"]


def test_the_learner_trains_and_gates_a_candidate_on_a_real_servers_log(ml_slice: Path, tmp_path: Path) -> None:
    """A real server logs a replayed ml-100k slice (consumed items kept); one look of a real learner
    process trains on the window but its newest 20%, scores that held-out slice with the candidate,
    the current head (none: zero-shot) and zero-shot, and publishes the candidate only on a sure gain."""
    heads, logs = tmp_path / "heads", tmp_path / "logs"
    arms = f"canary=20:{heads / 'canary.npz'},main=60:{heads / 'main.npz'}"
    served = ["--encoder", "fake", "--fake-dim", "64", "--metrics-address", "", "--training-log-dir", str(logs / "pod-a"),
              "--training-log-flush-seconds", "0.1", "--online-metrics-window-seconds", "600",
              "--experiment-arms", arms, "--head-reload-seconds", "0.05"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RERANKER_ENCODER": "fake", "RERANKER_FAKE_DIM": "64",
           "RERANKER_EXPERIMENT_ARMS": arms, "RERANKER_LEARN_LOG_ROOT": str(logs),
           "RERANKER_LEARN_ITEMS": str(ml_slice / "items.tsv"), "RERANKER_LEARN_HISTORY_PATH": str(tmp_path / "h.jsonl"),
           "RERANKER_LEARN_RETRAIN_LISTS": "500", "RERANKER_ONLINE_METRICS_WINDOW_SECONDS": "600"}
    with ServerProcess(served) as server:
        server.wait_serving()
        replayed = subprocess.run(
            [sys.executable, "-m", "reranker", "replay", "--target", server.target, "--items", str(ml_slice / "items.tsv"),
             "--events", str(ml_slice / "events.tsv"), "--num-candidates", "30", "--include-seen"],
            capture_output=True, text=True, timeout=600, env=env)
        assert replayed.returncode == 0, replayed.stderr[-2000:]
        lists = json.loads(replayed.stdout)["lists"]
        # Until every served list is on disk where the learner reads it (not a sleep: the server's writer
        # thread flushes every 0.1 s, later on a busy machine).
        deadline = time.monotonic() + 60
        while len(read_training_log(logs / "pod-a").lists) < lists:
            assert time.monotonic() < deadline, server.log[-3000:]
            time.sleep(0.05)
        done = subprocess.run([sys.executable, "-m", "reranker", "learn", "run", "--once"], capture_output=True,
                              text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        entry = json.loads(done.stdout)
        assert entry["decision"] in ("canary", "rejected"), entry
        window, offline = entry["window"], entry["offline"]
        assert window["lists"] == lists and window["held_out"] == round(lists * 0.2 + 0.49)
        assert window["start"] < window["split"] < window["stop"]
        assert set(offline["ndcg@10"]) == {"candidate", "current", "zero_shot"} and offline["held_out_lists"] > 100
        assert offline["ndcg@10"]["current"] == offline["ndcg@10"]["zero_shot"]  # no head yet: the current one is zero-shot
        gain = offline["candidate_vs_current"]
        assert gain["low"] <= gain["diff"] <= gain["high"]
        assert (entry["decision"] == "canary") == (gain["low"] > 0)
        if entry["decision"] == "canary":
            assert ranking_head.load(heads / "canary.npz").version == entry["version"]
            deadline = time.monotonic() + 30
            while not any(f"arm canary now serves {entry['version']}" in line for line in server.lines):
                assert time.monotonic() < deadline, server.log[-3000:]
                time.sleep(0.05)
        else:
            assert not (heads / "canary.npz").exists()
