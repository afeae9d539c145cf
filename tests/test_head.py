"""The ranking head: request-time features, the versioned artefact, and what the server does with it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from reranker.ranking import head as ranking_head
from reranker.model.encoder import FakeEncoder
from reranker.evaluation import train
from reranker.v1 import reranker_pb2 as pb

from conftest import ServerFactory, candidate, event, fake_settings

F = len(ranking_head.FEATURES)


def make_head(dim: int = 64, **overrides: object) -> ranking_head.RankingHead:
    rng = np.random.default_rng(1)
    values: dict[str, object] = dict(
        weights=rng.normal(size=F),
        mean=np.zeros(F),
        std=np.ones(F),
        adapter_down=np.zeros((dim, 4), dtype=np.float32),
        adapter_up=np.zeros((4, dim), dtype=np.float32),
        prior=np.zeros(dim, dtype=np.float32),
        popularity={"pop": 1.0, "mid": 0.5},
        encoder_version=FakeEncoder.version,
    )
    values.update(overrides)
    return ranking_head.RankingHead(**values)  # type: ignore[arg-type]


def only(feature: str) -> np.ndarray:
    w = np.zeros(F)
    w[ranking_head.FEATURES.index(feature)] = 1.0
    return w


def test_features_by_hand() -> None:
    head = make_head(dim=2)
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    history = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)  # oldest first
    user = np.array([0.6, 0.8], dtype=np.float32)
    raw = head.features(["a", "pop", "mid"], np.array([3.0, 1.0, 3.0]), items, np.array([True, True, False]), user, history)
    col = {name: raw[:, i] for i, name in enumerate(ranking_head.FEATURES)}
    np.testing.assert_allclose(col["upstream_minmax"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(col["upstream_rank"], [1.0, 1 / np.log2(4), 1.0])  # ties share the rank
    np.testing.assert_allclose(col["zero_shot"][:2], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(col["max_sim"][:2], [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(col["last_item"][:2], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(col["popularity"], [0.0, 1.0, 0.5])


def test_items_without_vector_get_neutral_semantic_features() -> None:
    head = make_head(dim=2, weights=only("max_sim"), mean=np.full(F, 0.3))
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    history = np.array([[1.0, 0.0]], dtype=np.float32)
    scores = head.score(["a", "b", "c"], np.zeros(3), items, np.array([True, True, False]), np.array([1.0, 0.0]), history)
    assert scores[0] > scores[2] == 0.0 > scores[1]


def test_artefact_round_trip_and_version(tmp_path: Path) -> None:
    head = make_head(meta={"training_data": "abc"})
    head.save(tmp_path / "head.npz")
    loaded = ranking_head.load(tmp_path / "head.npz")
    assert loaded.version == head.version and loaded.version.startswith(f"head-v{ranking_head.FORMAT_VERSION}-")
    np.testing.assert_allclose(loaded.weights, head.weights)
    assert loaded.popularity == head.popularity
    assert loaded.meta["training_data"] == "abc" and loaded.meta["features"] == list(ranking_head.FEATURES)
    assert make_head(weights=head.weights + 1).version != head.version


def test_broken_artefacts_are_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ranking_head.HeadError, match="does not exist"):
        ranking_head.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ranking_head.HeadError, match="not a readable .npz"):
        ranking_head.load(tmp_path / "junk.npz")
    make_head(std=np.zeros(F)).save(tmp_path / "zero-std.npz")
    with pytest.raises(ranking_head.HeadError, match="std holds 17 value"):
        ranking_head.load(tmp_path / "zero-std.npz")
    with pytest.raises(ranking_head.HeadError, match="trained on encoder"):
        ranking_head.check_encoder(make_head(), "all-MiniLM-L6-v2@abc/float32", 64)
    with pytest.raises(ranking_head.HeadError, match="expects 64-d vectors"):
        ranking_head.check_encoder(make_head(), FakeEncoder.version, 384)


def _user_with_history(stub: object) -> None:
    stub.UpsertItems(pb.UpsertItemsRequest(items=[  # type: ignore[attr-defined]
        pb.Item(item_id=i, text=t) for i, t in [("h1", "space opera"), ("c1", "space opera sequel"), ("c2", "cooking show")]
    ]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h1")]))  # type: ignore[attr-defined]


def test_server_ranks_with_the_head_and_reports_its_version(tmp_path: Path, make_server: ServerFactory) -> None:
    # A head that only trusts popularity: the unpopular upstream favourite must drop.
    head = make_head(weights=only("popularity"), popularity={"c2": 1.0})
    head.save(tmp_path / "head.npz")
    _, stub = make_server(dataclasses.replace(fake_settings(), head_path=str(tmp_path / "head.npz")))
    _user_with_history(stub)
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("c1", 2.0), candidate("c2", 1.0)]))
    assert reply.variant == pb.VARIANT_RERANKED
    assert reply.model_version == f"{FakeEncoder.version}+{head.version}"
    assert [it.item_id for it in reply.items] == ["c2", "c1"]
    # An explicit blend weight in the request asks for the fixed blend instead (weight 0 = upstream order).
    opts = pb.RerankOptions(blend_weight=0.0)
    fixed = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("c1", 2.0), candidate("c2", 1.0)], options=opts))
    assert [it.item_id for it in fixed.items] == ["c1", "c2"]


def test_unloadable_head_keeps_the_server_failing_open(tmp_path: Path, make_server: ServerFactory) -> None:
    make_head(dim=32).save(tmp_path / "head32.npz")  # the fake encoder here gives 64-d vectors
    running, stub = make_server(dataclasses.replace(fake_settings(), head_path=str(tmp_path / "head32.npz")), wait=False)
    running.loader.join(30)
    assert not running.service.ready and "expects 32-d vectors" in running.service.load_error
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1.0), candidate("b", 2.0)]))
    assert reply.variant == pb.VARIANT_FALLBACK and reply.fallback_reason == pb.FALLBACK_REASON_NOT_READY
    assert [it.item_id for it in reply.items] == ["a", "b"]
    with pytest.raises(grpc.RpcError) as err:
        stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "a", text="x")]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# --- collaborative features: covisit / transition tables ---------------------------------------------
# Three users watched h1 and then c2; nobody watched c1 with h1.
HISTORIES = {"a": ["h1", "c2", "x"], "b": ["h1", "c2"], "c": ["h1", "y", "c2"], "d": ["c1", "y"]}


def test_item_graph_tables_by_hand() -> None:
    graph = train.item_graph(HISTORIES, train.TrainConfig(neighbours=2, transition_window=2, transition_decay=0.5))
    assert set(graph.ids) == {"h1", "c2", "x", "y", "c1"}
    # covisit: cosine on the binary user x item matrix; h1 and c2 share all three users.
    scores = graph.covisit.scores(graph.positions(["c2", "c1", "x", "nope"]), graph.positions(["h1"]), np.ones(1))
    np.testing.assert_allclose(scores, [1.0, 0.0, 1 / np.sqrt(3), 0.0], rtol=1e-6)
    # transition h1 -> c2: gap 1 for a, b (weight 1 each), gap 2 for c (0.5); h1's outgoing weight:
    # a: c2 (1) + x (0.5), b: c2 (1), c: y (1) + c2 (0.5) = 4; value = 2.5 / (4 + 1).
    t = graph.transition.scores(graph.positions(["c2", "y", "x"]), graph.positions(["h1"]), np.ones(1))
    # h1 -> x (0.5 / 5 = 0.1) is h1's third-best follower: cut by the top-2 limit.
    np.testing.assert_allclose(t, [0.5, 0.2, 0.0], rtol=1e-6)
    # Directed: c2 is never followed by h1.
    assert graph.transition.scores(graph.positions(["h1"]), graph.positions(["c2"]), np.ones(1))[0] == 0.0
    # At most k neighbours per item (the artefact stays bounded).
    for table in graph.tables().values():
        assert np.diff(table.indptr).max() <= 2


def test_collaborative_features_weigh_recent_history_more() -> None:
    graph = train.item_graph(HISTORIES, train.TrainConfig())
    head = make_head(dim=2, graph=graph, history_decay=0.5)
    items = np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    raw = head.features(["c2", "c1", "c2", "zz"], np.zeros(4), items, np.ones(4, bool), np.array([1.0, 0.0]),
                        np.zeros((0, 2), np.float32), ["h1", "unknown", "c1"])
    col = {name: raw[:, i] for i, name in enumerate(ranking_head.FEATURES)}
    # h1 is two events old (weight 0.25), the unknown id is skipped, c1 is the newest (weight 1).
    np.testing.assert_allclose(col["covisit"], [0.25, 0.0, 0.25, 0.0], rtol=1e-6)  # duplicates get the same value
    assert col["transition"][0] > 0 and col["transition"][3] == 0.0
    # ALS fold-in from the known history items (h1, c1), unweighted: u = (Y'Y + a Yh'Yh + r I)^-1 (1 + a) Yh'1.
    y = graph.factors.astype(np.float64)
    yh = y[graph.positions(["h1", "c1"])]
    user = np.linalg.solve(y.T @ y + graph.alpha * yh.T @ yh + graph.reg * np.eye(y.shape[1]), (1 + graph.alpha) * yh.sum(0))
    expected = y[graph.positions(["c2", "c1", "c2"])] @ user
    np.testing.assert_allclose(col["mf_foldin"], [*expected, 0.0], rtol=1e-4, atol=1e-6)
    no_history = head.features(["c2"], np.zeros(1), items[:1], np.ones(1, bool), np.array([1.0, 0.0]), np.zeros((0, 2), np.float32))
    for name in ("covisit", "transition", "mf_foldin"):
        assert no_history[0, ranking_head.FEATURES.index(name)] == 0.0


def test_server_lifts_the_item_that_follows_the_users_history(tmp_path: Path, make_server: ServerFactory) -> None:
    graph = train.item_graph(HISTORIES, train.TrainConfig())
    for feature in ("covisit", "transition", "mf_foldin"):
        path = tmp_path / f"{feature}.npz"
        make_head(weights=only(feature) * 10 + only("upstream_minmax"), graph=graph).save(path)
        _, stub = make_server(dataclasses.replace(fake_settings(), head_path=str(path)))
        _user_with_history(stub)  # the user watched h1
        cands = [candidate("c1", 2.0), candidate("c2", 1.0)]
        reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=cands))
        assert reply.variant == pb.VARIANT_RERANKED and ranking_head.load(path).version in reply.model_version
        assert [it.item_id for it in reply.items] == ["c2", "c1"], feature
        # A user without h1 in the history keeps the upstream order.
        stub.RecordEvents(pb.RecordEventsRequest(events=[event("v", "c1")]))
        other = stub.Rerank(pb.RerankRequest(user_id="v", candidates=[candidate("c1", 2.0), candidate("c2", 1.0)]))
        assert [it.item_id for it in other.items] == ["c1", "c2"], feature
        # Negative feedback on h1 is not "history the user liked": no lift.
        stub.RecordEvents(pb.RecordEventsRequest(events=[event("w", "h1", type=pb.EVENT_TYPE_DISLIKE)]))
        stub.RecordEvents(pb.RecordEventsRequest(events=[event("w", "c1")]))
        disliked = stub.Rerank(pb.RerankRequest(user_id="w", candidates=[candidate("c1", 2.0), candidate("c2", 1.0)]))
        assert [it.item_id for it in disliked.items] == ["c1", "c2"], feature


def test_old_format_artefact_is_refused_with_a_clear_message(tmp_path: Path, make_server: ServerFactory) -> None:
    # What a format-1 head looked like: no graph arrays, format_version 1 in its meta.
    head = make_head()
    head.save(tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if not k.startswith(("graph", "covisit", "transition"))}
    meta = json.loads(str(arrays["meta"]))
    meta.update(format_version=1, features=list(ranking_head.FEATURES[:10]))
    arrays["meta"] = np.array(json.dumps(meta))
    old = tmp_path / "old.npz"
    with old.open("wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(ranking_head.HeadError, match=r"has format 1; this server reads format 3 \(retrain it"):
        ranking_head.load(old)
    running, stub = make_server(dataclasses.replace(fake_settings(), head_path=str(old)), wait=False)
    running.loader.join(30)
    assert not running.service.ready and "has format 1" in running.service.load_error
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1.0), candidate("b", 2.0)]))
    assert reply.variant == pb.VARIANT_FALLBACK and reply.fallback_reason == pb.FALLBACK_REASON_NOT_READY


def test_malformed_neighbour_table_is_refused(tmp_path: Path) -> None:
    graph = train.item_graph(HISTORIES, train.TrainConfig())
    broken = ranking_head.NeighbourTable(graph.covisit.indptr, graph.covisit.indices + 100, graph.covisit.values)
    make_head(graph=ranking_head.ItemGraph(graph.ids, broken, graph.transition)).save(tmp_path / "broken.npz")
    with pytest.raises(ranking_head.HeadError, match="malformed covisit table"):
        ranking_head.load(tmp_path / "broken.npz")
    short = ranking_head.ItemGraph(graph.ids, graph.covisit, graph.transition, graph.factors[:-1])
    make_head(graph=short).save(tmp_path / "short.npz")
    with pytest.raises(ranking_head.HeadError, match="malformed mf_factors"):
        ranking_head.load(tmp_path / "short.npz")



@pytest.mark.parametrize("meta", ["[]", "3", '"a string"', "null"])
def test_a_meta_block_that_is_json_but_not_an_object_is_refused_with_a_reason(tmp_path: Path, meta: str) -> None:
    make_head().save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["meta"] = np.array(meta)
    odd = tmp_path / "odd.npz"
    with odd.open("wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(ranking_head.HeadError, match="meta block is not a JSON object"):
        ranking_head.load(odd)
