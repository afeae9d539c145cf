"""Where RPC work runs: a warm Rerank on the server's event loop, anything that waits on the pool.

A warm Rerank (every candidate vector cached, in-process profiles) never needs a pool thread, so a
hung or busy encoder holding every pool thread cannot delay it. A cold one is tried on the loop
first and moved to the pool when it must encode; the move repeats no work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from reranker.model.encoder import FakeEncoder
from reranker.v1 import reranker_pb2 as pb
from tests.conftest import ServerFactory, candidate, event, fake_settings
from tests.test_faults import HangingEncoder


@pytest.fixture
def encoder() -> Iterator[HangingEncoder]:
    hanging = HangingEncoder(FakeEncoder(64), ok_batches=3)  # warm-up, the catalogue, the history item
    yield hanging
    hanging.release()


def _warm_request(user: str) -> pb.RerankRequest:
    return pb.RerankRequest(user_id=user, candidates=[candidate(f"w{i}", 5.0 - i, f"warm {i}") for i in range(5)])


def test_warm_rerank_is_answered_while_every_pool_thread_waits_on_the_encoder(
    make_server: ServerFactory, encoder: HangingEncoder
) -> None:
    running, stub = make_server(fake_settings(max_workers=1, encode_timeout_ms=30_000.0), encoder=encoder)
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=f"w{i}", text=f"warm {i}") for i in range(5)]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h1", "a history item")]))
    cold = stub.Rerank.future(  # takes the only pool thread and hangs in the encoder
        pb.RerankRequest(user_id="u", candidates=[candidate("c1", 1.0, "never seen")]), timeout=30
    )
    assert encoder.entered.wait(30)
    started = time.monotonic()
    warm = stub.Rerank(_warm_request("u"), timeout=5)
    assert warm.variant == pb.VARIANT_RERANKED and not warm.cold_user
    assert (warm.cache_hits, warm.encoded) == (5, 0)
    assert time.monotonic() - started < 5  # answered, not queued behind the hung encode
    assert not cold.done()
    encoder.release()
    assert cold.result().variant == pb.VARIANT_RERANKED


def test_a_cold_rerank_moved_to_the_pool_looks_each_item_up_once(make_server: ServerFactory) -> None:
    running, stub = make_server(fake_settings())
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h1", "a history item")]))
    items = running.service.items
    assert items is not None
    hits, misses = items.hits, items.misses
    resp = stub.Rerank(
        pb.RerankRequest(user_id="u", candidates=[candidate("w0", 2.0, "warm 0"), candidate("n1", 1.0, "new 1")]),
        timeout=5,
    )
    assert resp.variant == pb.VARIANT_RERANKED
    assert (resp.cache_hits, resp.encoded) == (0, 2)
    assert (items.hits - hits, items.misses - misses) == (0, 2)  # not 4: the loop's lookup was reused
    again = stub.Rerank(_warm_request("u"), timeout=5)  # w0 is cached now; w1..w4 are not
    assert (again.cache_hits, again.encoded) == (1, 4)
    assert (items.hits - hits, items.misses - misses) == (1, 6)


def test_context_events_on_cached_items_are_applied_on_the_loop(make_server: ServerFactory, encoder: HangingEncoder) -> None:
    running, stub = make_server(fake_settings(max_workers=1, encode_timeout_ms=30_000.0), encoder=encoder)
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=f"w{i}", text=f"warm {i}") for i in range(5)]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "h1", "a history item")]))
    cold = stub.Rerank.future(pb.RerankRequest(user_id="u", candidates=[candidate("c1", 1.0, "never seen")]), timeout=30)
    assert encoder.entered.wait(30)  # the only pool thread is stuck
    request = _warm_request("u")
    request.context_events.append(event("u", "w3"))  # a cached item: no encoding needed
    warm = stub.Rerank(request, timeout=5)
    # The context event counts for this very request: w3 is now consumed, and for a user who has
    # never repeated an item the learned policy (no head) puts it after the others.
    assert warm.variant == pb.VARIANT_RERANKED and warm.consumed_candidates == 1
    assert warm.items[-1].item_id == "w3"
    encoder.release()
    assert cold.result().variant == pb.VARIANT_RERANKED
    assert stub.GetUserProfile(pb.GetUserProfileRequest(user_id="u"), timeout=5).event_count == 2


def test_a_context_event_that_needs_encoding_moves_the_request_to_the_pool_once(make_server: ServerFactory) -> None:
    running, stub = make_server(fake_settings())
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=f"w{i}", text=f"warm {i}") for i in range(5)]))
    items = running.service.items
    assert items is not None
    hits, misses = items.hits, items.misses
    request = _warm_request("u")
    request.context_events.append(event("u", "e1", "warm 2 sequel"))  # not cached: must be encoded
    resp = stub.Rerank(request, timeout=5)
    assert resp.variant == pb.VARIANT_RERANKED and not resp.cold_user
    assert (items.hits - hits, items.misses - misses) == (5, 1)  # each lookup once, on the loop
    assert stub.GetUserProfile(pb.GetUserProfileRequest(user_id="u"), timeout=5).event_count == 1
