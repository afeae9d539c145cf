"""The ranking head: request-time features, the versioned artefact, and what the server does with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pytest

from reranker import head as ranking_head
from reranker.encoder import FakeEncoder
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
    assert loaded.version == head.version and loaded.version.startswith("head-v1-")
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
    with pytest.raises(ranking_head.HeadError, match="non-positive feature scales"):
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
