"""End-to-end with the real packaged all-MiniLM-L6-v2 on real MovieLens titles (../shared/data/ml-100k)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
import pytest

from conftest import candidate, event, ml100k_items, wait_ready
from reranker.config import Settings
from reranker.serving.server import RunningServer, build_server
from reranker.service import RerankService
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model

OFF_TOPIC_GENRES = {"Romance", "Musical", "Children's", "Comedy", "Drama"}


def text_of(entry: tuple[str, str, str]) -> str:
    title, _year, genres = entry
    return f"{title}. Genres: {genres}."


def pairwise_accuracy(scores: dict[str, float], better: list[str], worse: list[str]) -> float:
    """Share of (better, worse) pairs that the scores order correctly."""
    return sum(scores[b] > scores[w] for b in better for w in worse) / (len(better) * len(worse))


@pytest.fixture(scope="module")
def real_server() -> Iterator[tuple[RunningServer, pb_grpc.RerankerServiceStub]]:
    # generous encode timeout: this test is about ranking quality, not latency (CI machines may be busy)
    settings = dataclasses.replace(
        Settings(), address="127.0.0.1:0", metrics_address="", max_workers=4, encode_timeout_ms=60_000.0
    )
    running = build_server(settings, RerankService(settings))
    wait_ready(running, timeout=120)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield running, pb_grpc.RerankerServiceStub(channel)
    running.stop(0)


def test_sci_fi_fan_gets_sci_fi_first(real_server) -> None:
    running, stub = real_server
    items = ml100k_items()
    sci_fi = [i for i, (_, _, g) in items.items() if "Sci-Fi" in g.split()]
    off_topic = [i for i, (_, _, g) in items.items() if set(g.split()) <= OFF_TOPIC_GENRES]
    history, same_topic, other = sci_fi[:6], sci_fi[6:12], off_topic[:12]
    assert len(same_topic) == 6 and len(other) == 12

    events = [event("fan", i, text_of(items[i]), type=pb.EVENT_TYPE_LIKE, event_id=f"h{i}") for i in history]
    assert stub.RecordEvents(pb.RecordEventsRequest(events=events), timeout=30).accepted == 6
    # upstream puts every off-topic movie first
    ordered = other + same_topic
    candidates = [candidate(i, float(len(ordered) - k), text_of(items[i])) for k, i in enumerate(ordered)]
    response = stub.Rerank(
        pb.RerankRequest(user_id="fan", candidates=candidates, options=pb.RerankOptions(blend_weight=0.9)), timeout=30
    )
    assert response.variant == pb.VARIANT_RERANKED and not response.cold_user
    assert response.model_version.startswith("all-MiniLM-L6-v2@") and response.model_version == running.service.model_version
    top = [it.item_id for it in response.items[:6]]
    # upstream's top 6 are all off-topic; after reranking most of them are sci-fi
    assert sum(i in same_topic for i in top) >= 4, [items[i][0] for i in top]
    semantic = {it.item_id: it.semantic_score for it in response.items}
    final = {it.item_id: it.score for it in response.items}
    assert pairwise_accuracy(semantic, same_topic, other) >= 0.85
    upstream = {it.item_id: it.upstream_score for it in response.items}
    assert pairwise_accuracy(upstream, same_topic, other) == 0.0
    assert pairwise_accuracy(final, same_topic, other) >= 0.8


def test_default_blend_still_lifts_same_topic_items(real_server) -> None:
    _, stub = real_server
    items = ml100k_items()
    horror = [i for i, (_, _, g) in items.items() if g.split() == ["Horror"]]
    off_topic = [i for i, (_, _, g) in items.items() if set(g.split()) <= {"Comedy", "Romance", "Musical"}]
    history, same_topic, other = horror[:5], horror[5:10], off_topic[:10]
    stub.RecordEvents(
        pb.RecordEventsRequest(events=[event("horror-fan", i, text_of(items[i])) for i in history]), timeout=30
    )
    ordered = other + same_topic
    candidates = [candidate(i, float(len(ordered) - k), text_of(items[i])) for k, i in enumerate(ordered)]
    response = stub.Rerank(pb.RerankRequest(user_id="horror-fan", candidates=candidates, top_k=10), timeout=30)
    top = [it.item_id for it in response.items]
    # The upstream top 10 has no horror at all. The default blend (0.3, chosen on validation so that
    # a strong upstream is not overridden) lets the closest ones in; a request at 0.5 most of them.
    assert sum(i in same_topic for i in top) >= 1, [items[i][0] for i in top]
    response = stub.Rerank(pb.RerankRequest(user_id="horror-fan", candidates=candidates, top_k=10,
                                            options=pb.RerankOptions(blend_weight=0.5)), timeout=30)
    top = [it.item_id for it in response.items]
    assert sum(i in same_topic for i in top) >= 3, [items[i][0] for i in top]
