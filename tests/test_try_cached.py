"""The cache-only fast path is a direct call: `RerankService.try_cached` answers where every vector is
cached, else hands back a Resume (nothing written, nothing encoded) that `rerank` starts from,
without looking the candidates or events up again."""

from __future__ import annotations

from reranker.model.encoder import FakeEncoder
from reranker.pipeline import Resume
from reranker.service import RerankService
from reranker.types import Candidate, Event, Item, RerankQuery, RerankResult

from conftest import fake_settings

TEXTS = {f"i{k}": f"topic {k % 3} story {k}" for k in range(8)}


def _service() -> RerankService:
    service = RerankService(fake_settings(warmup=False), FakeEncoder(64))
    service.load()
    service.upsert_items([Item(i, TEXTS[i]) for i in ("i0", "i1", "i2", "i3")])
    service.record_events([Event("u", "i0", timestamp=1.0, event_id="e0")])
    return service


def _query(ids: list[str], events: tuple[Event, ...] = ()) -> RerankQuery:
    return RerankQuery("u", tuple(Candidate(i, 1.0 - 0.1 * n, TEXTS[i]) for n, i in enumerate(ids)), events)


def _ranked(result: RerankResult) -> list[tuple[str, float]]:
    return [(item.item_id, round(float(item.score), 6)) for item in result.items]


def test_cached_candidates_are_answered_at_once() -> None:
    service = _service()
    try:
        first = service.try_cached(_query(["i1", "i2", "i3"]))
        assert isinstance(first, RerankResult) and first.encoded == 0 and first.cache_hits == 3
        assert _ranked(first) == _ranked(service.rerank(_query(["i1", "i2", "i3"])))
    finally:
        service.close()


def test_a_candidate_to_encode_leaves_a_resume_and_the_blocking_run_looks_up_once() -> None:
    plain, fast = _service(), _service()
    try:
        query = _query(["i1", "i5", "i2"])
        pending = fast.try_cached(query)
        assert isinstance(pending, Resume) and pending.lookup is not None and pending.event_lookup is None
        assert len(fast.items) == 4  # type: ignore[arg-type]  # nothing encoded yet
        resumed = fast.rerank(query, resume=pending)
        expected = plain.rerank(query)
        assert _ranked(resumed) == _ranked(expected) and resumed.encoded == expected.encoded == 1
        assert (fast.items.hits, fast.items.misses) == (plain.items.hits, plain.items.misses)  # type: ignore[union-attr]
    finally:
        plain.close()
        fast.close()


def test_a_context_event_to_encode_writes_nothing_until_the_blocking_run() -> None:
    plain, fast = _service(), _service()
    try:
        query = _query(["i1", "i2", "i3"], (Event("u", "i6", timestamp=2.0, event_id="e6", text=TEXTS["i6"]),))
        pending = fast.try_cached(query)
        assert isinstance(pending, Resume) and pending.lookup is not None and pending.event_lookup is not None
        assert fast.user_profile("u").event_count == 1  # the context event is not applied yet
        resumed = fast.rerank(query, resume=pending)
        expected = plain.rerank(query)
        assert fast.user_profile("u").event_count == plain.user_profile("u").event_count == 2
        assert _ranked(resumed) == _ranked(expected)
        assert (fast.items.hits, fast.items.misses) == (plain.items.hits, plain.items.misses)  # type: ignore[union-attr]
    finally:
        plain.close()
        fast.close()
