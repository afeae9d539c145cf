"""Runtime settings from a mounted file: applied without a restart, a bad file keeps the settings in force.

A real `reranker serve` process reads a real file; the file is replaced the way the kubelet updates a
ConfigMap volume (a new file renamed over the old one).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from reranker.runtimesettings import RuntimeSettingsError, parse
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

from conftest import REPO, CountWatcher, ServerFactory, candidate, event, fake_settings
from test_head import make_head, only
from test_hot_reload import _publish
from reranker.tools.harness import ServerProcess, free_port

POLL_S = 0.2
APPLIED_WITHIN_S = 10.0  # poll interval + a busy 2-core machine's scheduling
CANDS = [candidate("c1", 2.0, "space opera sequel"), candidate("c2", 1.0, "cooking show")]


def publish(path: Path, content: str) -> None:
    """Replace the file atomically, as the kubelet swaps a ConfigMap volume's data."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def exposition(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def scrape(port: int, name: str, labels: str = "") -> float | None:
    body = exposition(port)
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", body, re.MULTILINE)
    return float(match.group(1)) if match else None


class ServeProcess:
    """`python -m reranker serve` with a runtime settings file, as a child process (harness.ServerProcess)."""

    def __init__(self, settings_file: Path, *extra: str) -> None:
        self.metrics_port = free_port()
        self.server = ServerProcess(
            ["--encoder", "fake", "--fake-dim", "32", "--grace-seconds", "1",
             "--metrics-address", f"127.0.0.1:{self.metrics_port}", "--runtime-settings-file", str(settings_file),
             "--runtime-settings-poll-seconds", str(POLL_S), *extra],
            env={"PYTHONPATH": str(REPO)},
        )
        self.process = self.server.proc
        self.server.wait_serving(60.0)
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = pb_grpc.RerankerServiceStub(self.channel)

    @property
    def log(self) -> str:
        return self.server.log

    def variant(self) -> int:
        return self.stub.Rerank(pb.RerankRequest(user_id="u", candidates=CANDS), timeout=10).variant

    def wait_for_variant(self, variant: int, timeout: float = APPLIED_WITHIN_S) -> float:
        """Seconds until a Rerank answers with `variant` (AssertionError after `timeout`)."""
        started = time.monotonic()
        while self.variant() != variant:
            assert time.monotonic() - started < timeout, f"no {pb.Variant.Name(variant)} within {timeout} s"
            time.sleep(0.01)
        return time.monotonic() - started

    def wait_counted(self, result: str, count: int, timeout: float = APPLIED_WITHIN_S) -> None:
        """Until reranker_runtime_settings_reloads_total{result} is `count`: the count comes last, so
        the settings, `stale` and `info` already show that file."""
        deadline = time.monotonic() + timeout
        while scrape(self.metrics_port, "reranker_runtime_settings_reloads_total", f'{{result="{result}"}}') != count:
            assert time.monotonic() < deadline, f"no {count} {result} reloads within {timeout} s"
            time.sleep(0.05)

    def wait_logged(self, text: str, timeout: float = APPLIED_WITHIN_S) -> None:
        """Until `text` is in the log (it crosses a pipe and a reader thread: it may trail the metrics)."""
        deadline = time.monotonic() + timeout
        while text not in self.log:
            assert time.monotonic() < deadline, f"{text!r} not logged within {timeout} s"
            time.sleep(0.05)

    def stop(self) -> None:
        self.channel.close()
        self.server.terminate()
        code = self.server.wait(30)
        self.server.__exit__(None, None, None)
        assert code == 0, self.log


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "runtime.yaml"
    publish(path, "version: start\nkill_switch: false\n")
    return path


def test_the_kill_switch_flips_without_a_restart_and_a_bad_file_keeps_it(settings_file: Path) -> None:
    server = ServeProcess(settings_file)
    try:
        pid = server.process.pid
        assert server.variant() == pb.VARIANT_RERANKED
        publish(settings_file, "version: incident\nkill_switch: true\n")
        server.wait_counted("ok", 2)
        assert server.variant() == pb.VARIANT_BYPASSED
        # Bad files, one after the other: each keeps the kill switch on, is counted and logged.
        bad = [
            "kill_switch: [unclosed\n",  # not YAML
            "kill_swich: false\n",  # a typo must not be ignored
            "kill_switch: 'no'\n",  # not a boolean
            "blend_weight: 3\n",  # out of range
            "max_workers: 1\n",  # a start-up setting
        ]
        for n, content in enumerate(bad, start=1):
            publish(settings_file, content)
            server.wait_counted("error", n)
            assert server.variant() == pb.VARIANT_BYPASSED, content
            assert scrape(server.metrics_port, "reranker_runtime_settings_stale") == 1.0
        server.wait_logged("kill_swich")
        assert "the settings in force are kept" in server.log
        # A good file again: applied, no longer stale; the same process all along.
        publish(settings_file, "version: resolved\nkill_switch: false\n")
        server.wait_counted("ok", 3)
        assert server.variant() == pb.VARIANT_RERANKED
        assert scrape(server.metrics_port, "reranker_runtime_settings_stale") == 0.0
        body = exposition(server.metrics_port)
        assert re.search(r'reranker_runtime_settings_info\{checksum="[0-9a-f]{16}",version="resolved"\} 1\.0', body)
        assert server.process.pid == pid and server.process.poll() is None
    finally:
        server.stop()


def test_the_file_is_read_before_the_first_request(settings_file: Path) -> None:
    """A pod restarted during an incident starts with the kill switch of the file, not of its flags."""
    publish(settings_file, json.dumps({"kill_switch": True}))
    server = ServeProcess(settings_file, "--no-kill-switch")
    try:
        assert server.variant() == pb.VARIANT_BYPASSED
    finally:
        server.stop()


def test_a_missing_file_at_start_serves_the_start_up_settings_and_is_picked_up_later(tmp_path: Path) -> None:
    path = tmp_path / "runtime.json"
    server = ServeProcess(path)
    try:
        assert server.variant() == pb.VARIANT_RERANKED
        publish(path, json.dumps({"treatment_percent": 0}))
        server.wait_for_variant(pb.VARIANT_CONTROL)
        publish(path, "{}")  # a key removed goes back to its start-up value
        server.wait_for_variant(pb.VARIANT_RERANKED)
    finally:
        server.stop()


def test_blend_consumed_policy_and_log_sampling_follow_the_file(tmp_path: Path, make_server: ServerFactory) -> None:
    path = tmp_path / "runtime.json"
    publish(path, "{}")
    settings = fake_settings(runtime_settings_file=str(path), runtime_settings_poll_seconds=60, training_log_sample=1.0,
                             training_log_dir=str(tmp_path / "log"), consumed_policy="keep")
    running, stub = make_server(settings)
    service = running.service
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h1", "space opera"), event("u", "c3", "a documentary")]))
    cands = [candidate("c1", 2.0, "cooking show"), candidate("c2", 1.0, "space opera sequel"), candidate("c3", 0.5)]

    def order() -> list[str]:
        return [it.item_id for it in stub.Rerank(pb.RerankRequest(user_id="u", candidates=cands)).items]

    assert order() == ["c1", "c2", "c3"]  # blend 0.3 of two scaled scores cannot flip c1 and c2; c3 kept
    publish(path, json.dumps({"blend_weight": 1.0, "consumed_policy": "drop", "access_log_sample": 0.5,
                              "training_log_sample": 0.25, "diversity": 0.1}))
    assert service.runtime_settings is not None and service.runtime_settings.check()
    assert order() == ["c2", "c1"]  # similarity alone; the consumed c3 dropped
    assert service.settings.ranking.diversity == 0.1
    assert service.training_log is not None and service.training_log.sample == 0.25


def test_new_arms_from_the_file_load_their_heads_and_an_unusable_head_keeps_the_arms(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    path = tmp_path / "runtime.json"
    publish(path, "{}")
    running, stub = make_server(fake_settings(runtime_settings_file=str(path), runtime_settings_poll_seconds=60,
                                              head_reload_seconds=0.05))
    service = running.service
    assert service.runtime_settings is not None
    head_file = tmp_path / "b.npz"
    version = _publish(make_head(weights=only("upstream_minmax")), head_file)
    publish(path, json.dumps({"experiment_arms": f"b=100:{head_file}"}))
    assert service.runtime_settings.check()
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=CANDS))
    assert (reply.arm, reply.model_version) == ("b", version)
    broken = tmp_path / "c.npz"
    broken.write_bytes(b"not a head")
    publish(path, json.dumps({"experiment_arms": f"c=100:{broken}"}))
    assert not service.runtime_settings.check()
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=CANDS))
    assert (reply.arm, reply.model_version) == ("b", version)  # the arms in force are kept
    # the arm's head file is still watched after the change: a new head is hot-reloaded
    newer = _publish(make_head(weights=-only("upstream_minmax")), head_file)
    deadline = time.monotonic() + APPLIED_WITHIN_S
    while stub.Rerank(pb.RerankRequest(user_id="u", candidates=CANDS)).model_version != newer:
        assert time.monotonic() < deadline, "the arm's head was not reloaded"
        time.sleep(0.02)


def test_the_file_format_is_checked_key_by_key() -> None:
    values, version = parse(b'{"kill_switch": true, "treatment_percent": 50, "version": 7}', "x.json")
    assert values == {"kill_switch": True, "treatment_percent": 50.0} and version == "7"
    assert parse(b"", "x.yaml") == ({}, "")
    for content, reason in [
        (b"[1, 2]", "must be a mapping"),
        (b'{"kill_switch": 1}', "expected a bool"),
        (b'{"grace_seconds": 1}', "start-up setting"),
        (b'{"kill_switchh": true}', "not a setting"),
        (b"\xff", "cannot parse"),
    ]:
        with pytest.raises(RuntimeSettingsError, match=reason):
            parse(content, "x.json")


def test_a_counted_reload_already_shows_in_the_settings_stale_and_info(tmp_path: Path) -> None:
    """Whoever sees a file counted (ok or error) must see what it did: the settings applied, `stale`
    and `info` saying so. A watcher thread counts while readers (a scrape, a test) poll the count."""
    from prometheus_client import CollectorRegistry

    from reranker.runtimesettings import RuntimeSettingsFile

    path = tmp_path / "runtime.yaml"
    publish(path, "version: one\nkill_switch: false\n")
    registry = CollectorRegistry()
    watched = RuntimeSettingsFile(fake_settings(runtime_settings_file=str(path)), registry)
    watched.initial()
    applied: list[bool] = []
    seen: list[tuple[str, bool, float | None, float | None]] = []

    def at_count(result: str) -> tuple[str, bool, float | None, float | None]:  # what a reader sees when counting
        return (result, applied[-1], registry.get_sample_value("reranker_runtime_settings_stale"),
                registry.get_sample_value("reranker_runtime_settings_info", {"version": "two", "checksum": checksum}))

    watched.reloads = CountWatcher(at_count, seen)  # type: ignore[assignment]
    watched._apply = lambda s: applied.append(s.ranking.kill_switch)  # what start(apply) sets, without the thread
    applied.append(False)
    content = "version: two\nkill_switch: true\n"
    checksum = __import__("hashlib").sha256(content.encode()).hexdigest()[:16]
    publish(path, content)
    assert watched.check()
    publish(path, "kill_switch: [unclosed\n")
    assert not watched.check()
    os.unlink(path)
    assert not watched.check()
    assert seen == [("ok", True, 0.0, 1.0), ("error", True, 1.0, 1.0), ("error", True, 1.0, 1.0)], seen


def test_info_never_names_no_file_while_a_new_one_is_applied(tmp_path: Path) -> None:
    """A scrape between two updates of reranker_runtime_settings_info sees the old or the new file, never none."""
    from reranker.runtimesettings import RuntimeSettingsFile

    path = tmp_path / "runtime.yaml"
    publish(path, "version: one\n")
    watched = RuntimeSettingsFile(fake_settings(runtime_settings_file=str(path)))
    named: set[tuple[str, str]] = set()
    states: list[frozenset[tuple[str, str]]] = []

    class Recording:  # stands in for the gauge; records what a scrape would see after each change
        def labels(self, *, version: str, checksum: str) -> Recording:
            self.key = (version, checksum)
            return self

        def set(self, _value: float) -> None:
            named.add(self.key)
            states.append(frozenset(named))

        def remove(self, *key: str) -> None:
            named.discard(key)  # type: ignore[arg-type]
            states.append(frozenset(named))

        def clear(self) -> None:
            named.clear()
            states.append(frozenset(named))

    watched.info = Recording()  # type: ignore[assignment]
    watched.initial()
    publish(path, "version: two\n")
    assert watched._check(lambda _s: None)
    assert [v for v, _ in named] == ["two"] and all(states[1:]), states
