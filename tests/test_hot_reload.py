"""Head hot reload and a head per experiment arm, through a real server."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker.ranking import arms
from reranker.config import Settings
from reranker.ranking.experiments import bucket_of
from reranker.v1 import reranker_pb2 as pb

from conftest import CountWatcher, ServerFactory, candidate, event, fake_settings
from test_head import F, make_head, only

CANDS = [candidate("c1", 2.0), candidate("c2", 1.0)]


def _publish(head: object, path: Path) -> str:
    """Write a head the way a trainer should: a temporary file, then an atomic rename."""
    tmp = path.with_suffix(".tmp.npz")
    head.save(tmp)  # type: ignore[attr-defined]
    os.replace(tmp, path)
    return f"fake-hash-v1+{head.version}"  # type: ignore[attr-defined]


def _user(stub: object, user: str = "u") -> None:
    stub.UpsertItems(pb.UpsertItemsRequest(items=[  # type: ignore[attr-defined]
        pb.Item(item_id=i, text=t) for i, t in [("h1", "space opera"), ("c1", "space opera sequel"), ("c2", "cooking")]
    ]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event(user, "h1")]))  # type: ignore[attr-defined]


def _wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_renamed_file_is_served_from_the_next_request_and_a_bad_one_keeps_the_old_head(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    path = tmp_path / "head.npz"
    first = _publish(make_head(weights=only("upstream_minmax")), path)
    running, stub = make_server(fake_settings(head_path=str(path), head_reload_seconds=0.05))
    _user(stub)
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=CANDS))
    assert reply.model_version == first and [it.item_id for it in reply.items] == ["c1", "c2"]
    second = _publish(make_head(weights=-only("upstream_minmax")), path)  # the upstream order reversed
    metrics = running.service.metrics
    # Wait on what announces the reload (its count), then everything else must already show it.
    _wait_for(lambda: metrics.registry.get_sample_value("reranker_head_reloads_total", {"result": "ok"}) == 1)
    assert running.service.model_version == second
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=CANDS))
    assert reply.model_version == second and [it.item_id for it in reply.items] == ["c2", "c1"]
    assert f'reranker_model_info{{model_version="{second}"}} 1.0' in metrics.exposition().decode()
    # A truncated file, then a head for another encoder: both refused, the old head stays, still SERVING.
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[:100])
    os.replace(broken, path)
    make_head(dim=32).save(tmp_path / "dim32.npz")
    _wait_for(lambda: metrics.registry.get_sample_value("reranker_head_reloads_total", {"result": "error"}) == 1)
    os.replace(tmp_path / "dim32.npz", path)
    _wait_for(lambda: metrics.registry.get_sample_value("reranker_head_reloads_total", {"result": "error"}) == 2)
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=CANDS))
    assert reply.model_version == second and reply.variant == pb.VARIANT_RERANKED
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    # SIGHUP's reload (forced) right after a publish serves it at once (the watcher may have been first);
    # forced again, the same head is not swapped.
    third = _publish(make_head(weights=only("popularity"), popularity={"c2": 1.0}), path)
    running.service.reload_heads()
    assert running.service.model_version == third
    assert not running.service.reload_heads()
    assert metrics.registry.get_sample_value("reranker_head_reloads_total", {"result": "unchanged"}) >= 1


def test_no_request_fails_while_heads_are_swapped_under_load(tmp_path: Path, make_server: ServerFactory) -> None:
    path = tmp_path / "head.npz"
    heads = [make_head(weights=only("upstream_minmax") * (i + 1)) for i in range(2)]
    versions = [f"fake-hash-v1+{h.version}" for h in heads]
    _publish(heads[0], path)
    running, stub = make_server(fake_settings(head_path=str(path), head_reload_seconds=0.01))
    _user(stub)
    stop, seen, errors = threading.Event(), Counter[str](), []

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            call = ch.unary_unary("/reranker.v1.RerankerService/Rerank", pb.RerankRequest.SerializeToString,
                                  pb.RerankResponse.FromString)
            while not stop.is_set():
                try:
                    reply = call(pb.RerankRequest(user_id="u", candidates=CANDS), timeout=10)
                    seen[reply.model_version] += 1
                    if reply.variant != pb.VARIANT_RERANKED:
                        errors.append(pb.Variant.Name(reply.variant))
                except grpc.RpcError as exc:
                    errors.append(str(exc.code()))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for swap in range(1, 7):
        version = versions[swap % 2]
        answered = seen[version]
        _publish(heads[swap % 2], path)
        # Until the clients got 10 answers from the new head (not a time: a loaded machine answers slower).
        _wait_for(lambda: seen[version] >= answered + 10 or bool(errors), timeout=60)
    stop.set()
    for t in threads:
        t.join(20)
    assert errors == [] and set(seen) == set(versions) and sum(seen.values()) > 50


def test_each_arm_gets_its_own_head_and_control_and_bypass_are_unchanged(tmp_path: Path, make_server: ServerFactory) -> None:
    make_head(weights=only("upstream_minmax")).save(tmp_path / "a.npz")
    settings = fake_settings(
        head_path=str(tmp_path / "a.npz"), treatment_percent=80.0, experiment_arms=f"b=40:{tmp_path / 'b.npz'}",
        head_reload_seconds=0.05,
    )
    running, stub = make_server(settings)  # b.npz does not exist yet: arm b serves like treatment
    users = [f"user-{i}" for i in range(60)]
    for user in users:
        _user(stub, user)

    def by_arm() -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for user in users:
            reply = stub.Rerank(pb.RerankRequest(user_id=user, candidates=CANDS))
            bucket = bucket_of(settings.ranking.experiment_salt, user)
            expected = "b" if bucket < 4000 else "treatment" if bucket < 8000 else "control"
            assert reply.arm == expected and reply.bucket == bucket
            assert reply.variant == (pb.VARIANT_CONTROL if expected == "control" else pb.VARIANT_RERANKED)
            out.setdefault(reply.arm, set()).add(reply.model_version)
        return out

    a_version = running.service.model_version
    assert by_arm() == {"b": {a_version}, "treatment": {a_version}, "control": {a_version}}
    b_version = _publish(make_head(weights=-only("upstream_minmax")), tmp_path / "b.npz")
    _wait_for(lambda: running.service.arms is not None and running.service.arms.arms[0].model_version == b_version)
    assert by_arm() == {"b": {b_version}, "treatment": {a_version}, "control": {a_version}}
    reply = stub.Rerank(pb.RerankRequest(user_id=users[0], candidates=CANDS, options=pb.RerankOptions(bypass=True)))
    assert reply.variant == pb.VARIANT_BYPASSED and reply.arm == ""


def test_arm_settings_are_validated() -> None:
    assert Settings(experiment_arms="b=10:/x.npz, c=5.5:/y.npz").ranking.parsed_experiment_arms() == [
        ("b", 10.0, "/x.npz"), ("c", 5.5, "/y.npz")
    ]
    for bad, message in [
        ("b=10", "not name=percent:path"), ("control=10:/x", "must be"), ("b=x:/p", "non-numeric"),
        ("b=0:/p", r"in \(0, 100\]"), ("b=60:/p,c=50:/q", "more than treatment_percent"), ("b=1:/p,b=2:/q", "twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            Settings(experiment_arms=bad)


def test_arm_names_are_exactly_ascii_letters_digits_underscore_and_hyphen() -> None:
    """What the message says, [A-Za-z0-9_-], is what the flag accepts: no other letters or digits."""
    for name in ("_", "-", "a_b", "A-1", "__x--", "Z9"):
        settings = Settings.from_sources([f"--experiment-arms={name}=10:/x.npz"], {})
        assert settings.ranking.parsed_experiment_arms() == [(name, 10.0, "/x.npz")]
    for name in ("ä", "١", "a.b", "a/b", "ǅ", "x²", "a\u00a0b"):
        with pytest.raises(ValueError, match=r"must be \[A-Za-z0-9_-\]"):
            Settings.from_sources([f"--experiment-arms={name}=10:/x.npz"], {})


def test_arm_buckets_follow_the_order_given() -> None:
    settings = Settings(treatment_percent=50.0, experiment_arms="b=10:/b.npz,c=5:/c.npz")
    table = arms.build_table(settings.ranking, "enc", {})
    assert [(a.name, a.end, a.borrowed) for a in table.arms] == [("b", 1000, True), ("c", 1500, True)]
    assert [table.for_bucket(x).name for x in (0, 999, 1000, 1499, 1500, 4999)] == ["b", "b", "c", "c", "treatment", "treatment"]
    head = make_head()
    table = arms.build_table(dataclasses.replace(settings.ranking, head_path="/a.npz"), "enc", {"c": head})
    assert table.arms[1].model_version == f"enc+{head.version}" and table.arms[0].model_version == "enc"
    assert table.paths() == {"treatment": "/a.npz", "b": "/b.npz", "c": "/c.npz"} and set(table.heads()) == {"treatment", "c"}
    assert np.isfinite(table.arms[1].head.weights).all()  # type: ignore[union-attr]


# --- every number in a head file is finite and in range; the version covers all that scores ------
def _edited(head: object, path: Path, arrays: dict[str, object] | None = None, meta: dict[str, object] | None = None) -> Path:
    """`head` saved, then its arrays / meta edited by hand (the meta's version left as it was)."""
    tmp = path.with_suffix(".edit.npz")
    head.save(tmp)  # type: ignore[attr-defined]
    with np.load(tmp, allow_pickle=False) as data:
        content = {name: data[name] for name in data.files}
    content.update(arrays or {})
    if meta:
        saved = json.loads(str(content["meta"]))
        saved.update(meta)
        content["meta"] = np.array(json.dumps(saved, sort_keys=True))
    with tmp.open("wb") as fh:
        np.savez(fh, **content)  # type: ignore[arg-type]
    os.replace(tmp, path)
    return path


BAD_HEADS: dict[str, dict[str, object]] = {
    "NaN popularity": dict(arrays={"popularity_values": np.array([np.nan, 0.5], dtype=np.float32)}),
    "popularity above 1": dict(arrays={"popularity_values": np.array([7.0, 0.5], dtype=np.float32)}),
    "attention_temperature 0": dict(meta={"attention_temperature": 0.0}),
    "attention_temperature NaN": dict(meta={"attention_temperature": float("nan")}),
    "mf_alpha NaN": dict(meta={"mf_alpha": float("nan")}),
    "mf_reg 0": dict(meta={"mf_reg": 0.0}),
    "history_decay inf": dict(meta={"history_decay": float("inf")}),
    "session_length a string": dict(meta={"session_length": "ten"}),
    "weights 1e300": dict(arrays={"weights": np.full(F, 1e300)}),
    "std 1e-300": dict(arrays={"std": np.full(F, 1e-300)}),
}


def _scores_are_finite(reply: pb.RerankResponse) -> bool:
    values = [v for it in reply.items for v in (it.score, it.semantic_score, it.upstream_score)]
    return bool(values) and bool(np.isfinite(values).all())


def test_a_head_with_a_number_out_of_range_is_refused_by_hot_reload_and_the_old_head_keeps_serving(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    path = tmp_path / "head.npz"
    good = make_head(weights=only("popularity") + only("attention") + only("mf_foldin"), popularity={"c2": 1.0, "c1": 0.5})
    served = _publish(good, path)
    running, stub = make_server(fake_settings(head_path=str(path), head_reload_seconds=0.05))
    _user(stub)
    registry = running.service.metrics.registry
    for name, edit in BAD_HEADS.items():
        errors = registry.get_sample_value("reranker_head_reloads_total", {"result": "error"})
        _edited(good, path, **edit)  # type: ignore[arg-type]
        _wait_for(lambda: registry.get_sample_value("reranker_head_reloads_total", {"result": "error"}) == errors + 1)
        reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=CANDS))
        assert reply.model_version == served and reply.variant == pb.VARIANT_RERANKED, name
        assert _scores_are_finite(reply), name
        assert running.service.reload_heads() is False, name  # SIGHUP's forced reload refuses it too
    assert registry.get_sample_value("reranker_head_reloads_total", {"result": "ok"}) == 0


def test_a_server_does_not_start_on_a_head_with_a_nan_and_says_which_number(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    path = _edited(make_head(), tmp_path / "head.npz", **BAD_HEADS["NaN popularity"])  # type: ignore[arg-type]
    running, _ = make_server(fake_settings(head_path=str(path)), wait=False)
    running.loader.join(30)
    assert not running.service.ready and "popularity_values" in running.service.load_error


def test_changing_any_scoring_number_of_the_meta_changes_the_version_and_is_swapped_in(
    tmp_path: Path, make_server: ServerFactory
) -> None:
    path = tmp_path / "head.npz"
    good = make_head(weights=only("attention"))
    first = _publish(good, path)
    running, stub = make_server(fake_settings(head_path=str(path), head_reload_seconds=0.05))
    _user(stub)
    versions = {first}
    for meta in ({"attention_temperature": 0.5}, {"session_length": 3}, {"attention_temperature": 0.5, "mf_alpha": 2.0}):
        _edited(good, path, meta=meta)
        _wait_for(lambda: running.service.model_version not in versions)
        versions.add(running.service.model_version)
        reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=CANDS))
        assert reply.model_version == running.service.model_version and _scores_are_finite(reply)
    assert len(versions) == 4


def test_an_arm_whose_file_is_removed_goes_back_to_the_treatment_head(tmp_path: Path, make_server: ServerFactory) -> None:
    """Removing an arm's file is how a head is withdrawn (the learner's rollback): the arm serves like
    treatment again, as before its file arrived. head_path itself keeps its head (the server needs one)."""
    a_version = _publish(make_head(weights=only("upstream_minmax")), tmp_path / "a.npz")
    settings = fake_settings(
        head_path=str(tmp_path / "a.npz"), experiment_arms=f"b=50:{tmp_path / 'b.npz'}", head_reload_seconds=0.05,
    )
    running, stub = make_server(settings)
    b_version = _publish(make_head(weights=-only("upstream_minmax")), tmp_path / "b.npz")

    def arm_b() -> arms.Arm:
        assert running.service.arms is not None
        return running.service.arms.arms[0]

    _wait_for(lambda: arm_b().model_version == b_version)
    os.unlink(tmp_path / "b.npz")
    _wait_for(lambda: arm_b().model_version == a_version)
    assert arm_b().borrowed and arm_b().name == "b"
    os.unlink(tmp_path / "a.npz")
    time.sleep(0.3)
    assert running.service.model_version == a_version  # head_path: the old head stays
    assert running.service.reload_heads() is False
    b_again = _publish(make_head(weights=only("popularity"), popularity={"c2": 1.0}), tmp_path / "b.npz")
    _wait_for(lambda: arm_b().model_version == b_again)


def test_a_counted_reload_is_already_served_and_named_by_model_info(tmp_path: Path, make_server: ServerFactory) -> None:
    """Whoever sees a reload counted ok (a dashboard, a test waiting on the counter) must already get the
    new head from the service and see its version in reranker_model_info; never an empty model_info."""
    a_version = _publish(make_head(weights=only("upstream_minmax")), tmp_path / "a.npz")
    settings = fake_settings(head_path=str(tmp_path / "a.npz"), experiment_arms=f"b=50:{tmp_path / 'b.npz'}",
                             head_reload_seconds=0)  # no ticks: only the checks below reload
    running, _ = make_server(settings)
    service = running.service
    reloader = service.learning.reloader
    assert reloader is not None
    registry = service.metrics.registry
    seen: list[tuple[str, str, bool]] = []

    def served(version: str) -> bool:
        return bool(service.arms is not None and any(a.model_version == version for a in service.arms.arms)
                    and registry.get_sample_value("reranker_model_info", {"model_version": version}) == 1)

    def at_count(result: str) -> tuple[str, str, bool]:  # what a reader sees at the moment of counting
        version = service.arms.arms[0].model_version if service.arms else ""
        return result, version, served(version) if service.arms else False

    reloader.reloads = CountWatcher(at_count, seen)  # type: ignore[assignment]
    b_version = _publish(make_head(weights=-only("upstream_minmax")), tmp_path / "b.npz")
    assert reloader.check() is True
    os.unlink(tmp_path / "b.npz")  # withdrawn: arm b serves like treatment again
    assert reloader.check() is True
    assert seen == [("ok", b_version, True), ("ok", a_version, True)], seen


def test_model_info_never_names_no_model_while_a_new_table_is_swapped_in() -> None:
    """A scrape between two updates of reranker_model_info sees the old or the new model versions,
    never none (the gauge is what dashboards and alerts join on)."""
    from reranker.learning.live import LiveLearning
    from reranker.metrics import Metrics

    metrics = Metrics()
    named: set[str] = set()
    states: list[frozenset[str]] = []

    class Recording:  # stands in for the gauge; records what a scrape would see after each change
        def labels(self, *, model_version: str) -> Recording:
            self.version = model_version
            return self

        def set(self, _value: float) -> None:
            named.add(self.version)
            states.append(frozenset(named))

        def remove(self, version: str) -> None:
            named.discard(version)
            states.append(frozenset(named))

        def clear(self) -> None:
            named.clear()
            states.append(frozenset(named))

    metrics.model_info = Recording()  # type: ignore[assignment]
    learning = LiveLearning(metrics, time.time, lambda _table: None)
    settings = Settings(treatment_percent=50.0, experiment_arms="b=10:/b.npz")
    learning.swap_table(arms.build_table(settings.ranking, "enc-1", {}))
    learning.swap_table(arms.build_table(settings.ranking, "enc-2", {}))
    assert named == {"enc-2"} and all(states[states.index(frozenset({"enc-1"})):]), states
