"""Late encodes land in the item cache.

Under CPU pressure the encoder can be slower than a caller's deadline. The caller gets the upstream
order (fail open), but the work the encoder finishes afterwards still fills the item cache, so the
next request for those items is personalized: a busy machine warms up instead of falling back for
as long as the pressure lasts. A text already being encoded is never encoded a second time: a
later request waits for that encode. A fail-open answer given before any encoding (the deadline
was already too short) queues its candidates' texts too.

Late work is bounded: it stays in the encoder queue (`encode_queue_size`), runs only while no
caller is waiting for the encoder, and is the first thing dropped when callers need the room.

All through a real gRPC server on 127.0.0.1:0, with a slow or gated encoder. `min_budget_ms=300` keeps
the fail-open answer well ahead of the caller's deadline on a loaded machine.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from reranker.errors import Overloaded
from reranker.model.batching import MicroBatcher
from reranker.model.encoder import FakeEncoder
from reranker.v1 import reranker_pb2 as pb
from tests.conftest import ServerFactory, candidate, event, fake_settings
from tests.test_metrics import scrape, value


class CountingSlowEncoder:
    """Sleeps `delay_s` per batch (a busy CPU) and counts how often each text was encoded."""

    def __init__(self, dim: int = 64, delay_s: float = 0.5) -> None:
        self.inner, self.delay_s = FakeEncoder(dim), delay_s
        self.dim, self.version = dim, "slow-" + self.inner.version
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        time.sleep(self.delay_s)
        with self._lock:
            self.counts.update(texts)
        return self.inner.encode(texts)


class GatedEncoder:
    """Blocks every batch until `release()`; records every text it was asked to encode, and the batches."""

    def __init__(self, dim: int = 64) -> None:
        self.inner, self.dim, self.version = FakeEncoder(dim), dim, "gated"
        self.gate, self.entered = threading.Event(), threading.Event()
        self.seen: list[str] = []
        self.batches: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.seen.extend(texts)
        self.batches.append(list(texts))
        self.entered.set()
        self.gate.wait(30)
        return self.inner.encode(texts)

    def release(self) -> None:
        self.gate.set()


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


TEXTS = [
    "The Empire Strikes Back. Genres: Action Adventure Sci-Fi War.",
    "Sleepless in Seattle. Genres: Comedy Romance.",
    "Alien. Genres: Action Horror Sci-Fi Thriller.",
    "Toy Story. Genres: Animation Children's Comedy.",
    "Fargo. Genres: Crime Drama Thriller.",
]


def _request(prefix: str = "", texts: list[str] = TEXTS, user: str = "u1") -> pb.RerankRequest:
    return pb.RerankRequest(
        user_id=user,
        candidates=[candidate(f"{prefix}{i}", 1.0 - 0.1 * i, prefix + t) for i, t in enumerate(texts)],
    )


def _with_profile(stub: object) -> None:
    stub.RecordEvents(  # type: ignore[attr-defined]
        pb.RecordEventsRequest(events=[event("u1", "liked", "Star Wars. Genres: Action Adventure Sci-Fi.")]),
        timeout=30,
    )


def test_an_encode_that_finishes_after_the_callers_deadline_fills_the_cache(make_server: ServerFactory) -> None:
    encoder = CountingSlowEncoder(delay_s=0.5)
    running, stub = make_server(fake_settings(warmup=False, min_budget_ms=300.0), encoder=encoder)
    _with_profile(stub)
    first = stub.Rerank(_request(), timeout=0.5)  # waits 0.2 s; the encoder needs 0.5 s
    assert (first.variant, first.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_DEADLINE)
    # Until the late vectors are in the cache (counted once they are), not until the encoder started.
    encoding = running.service._encoding
    assert encoding is not None and _wait_for(lambda: encoding.late_filled >= len(TEXTS), 30), encoder.counts
    # The vectors that arrived after the deadline were kept: the same short deadline now reranks,
    # from the cache, without encoding anything again.
    later = None
    for _ in range(20):
        later = stub.Rerank(_request(), timeout=0.5)
        if later.variant == pb.VARIANT_RERANKED:
            break
        time.sleep(0.05)
    assert later is not None and later.variant == pb.VARIANT_RERANKED, later
    assert later.cache_hits == len(TEXTS) and later.encoded == 0
    assert all(encoder.counts[t] == 1 for t in TEXTS), encoder.counts


def test_a_request_for_texts_being_encoded_waits_for_that_encode_instead_of_encoding_again(
    make_server: ServerFactory,
) -> None:
    encoder = CountingSlowEncoder(delay_s=0.6)
    settings = fake_settings(warmup=False, min_budget_ms=300.0, encode_timeout_ms=5000.0)
    _, stub = make_server(settings, encoder=encoder)
    _with_profile(stub)
    first = stub.Rerank(_request(), timeout=0.5)
    assert first.fallback_reason == pb.FALLBACK_REASON_DEADLINE
    second = stub.Rerank(_request(), timeout=10)  # issued while the first one's encode still runs
    assert second.variant == pb.VARIANT_RERANKED
    assert all(encoder.counts[t] == 1 for t in TEXTS), encoder.counts


def test_a_deadline_fallback_before_any_encoding_queues_the_candidates_texts(make_server: ServerFactory) -> None:
    encoder = CountingSlowEncoder(delay_s=0.05)
    # 300 ms of budget are needed to try at all: a 100 ms deadline fails open at once ...
    _, stub = make_server(fake_settings(warmup=False, min_budget_ms=300.0), encoder=encoder)
    _with_profile(stub)
    first = stub.Rerank(_request(), timeout=0.1)
    assert (first.variant, first.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_DEADLINE)
    assert "ms left" in first.fallback_detail
    # ... and its texts are encoded anyway, so the next request finds them cached.
    assert _wait_for(lambda: all(encoder.counts[t] == 1 for t in TEXTS), 10), encoder.counts
    assert _wait_for(lambda: stub.Rerank(_request(), timeout=2).encoded == 0, 5)
    later = stub.Rerank(_request(), timeout=2)
    assert later.variant == pb.VARIANT_RERANKED and later.cache_hits == len(TEXTS)
    assert all(encoder.counts[t] == 1 for t in TEXTS), encoder.counts


def test_late_work_is_bounded_by_the_queue_yields_to_waiting_callers_and_is_dropped_first(
    make_server: ServerFactory,
) -> None:
    encoder = GatedEncoder()
    settings = fake_settings(warmup=False, encode_queue_size=10, min_budget_ms=300.0, metrics_address="127.0.0.1:0")
    running, stub = make_server(settings, encoder=encoder)
    batcher = running.service._batcher
    assert batcher is not None
    blocker = stub.Rerank(_request("blocker-", TEXTS[:1]), timeout=0.5)  # the encoder hangs on it
    assert blocker.fallback_reason == pb.FALLBACK_REASON_DEADLINE and encoder.entered.is_set()
    # Six requests of 5 new texts each time out behind it. Their work stays queued as late work,
    # never more than the queue holds: each new one pushes out the oldest late work.
    for i in range(6):
        late = stub.Rerank(_request(f"late{i}-"), timeout=0.5)
        assert (late.variant, late.fallback_reason) == (pb.VARIANT_FALLBACK, pb.FALLBACK_REASON_DEADLINE)
        assert batcher.pending_texts <= settings.model.encode_queue_size
    assert batcher.pending_texts == 10  # late4-, late5-
    # A caller that waits is never refused for late work: it takes the room, and runs first.
    live = stub.Rerank.future(_request("live-"), timeout=30)
    assert _wait_for(lambda: batcher.pending_texts == 10 and batcher.late_texts == 5)
    encoder.release()
    assert live.result().variant == pb.VARIANT_RERANKED
    assert _wait_for(lambda: batcher.pending_texts == 0)
    after_blocker = encoder.seen[1:]
    assert [t.split("-")[0] for t in after_blocker] == ["live"] * 5 + ["late5"] * 5
    # What was dropped was never encoded; what ran filled the cache.
    assert not any(t.startswith(("late0", "late1", "late2", "late3", "late4")) for t in encoder.seen)
    assert _wait_for(lambda: stub.Rerank(_request("late5-"), timeout=5).encoded == 0, 5)
    m = scrape(running.metrics_port)
    assert value(m, "reranker_encoder_late_texts_total", outcome="dropped") == 25
    assert value(m, "reranker_encoder_late_texts_total", outcome="filled") == 5 + 1  # late5- and the blocker


# --- the micro-batcher's late queue, directly ------------------------------------------------------------
def _gated_batcher(max_pending: int, encoder: object | None = None) -> tuple[MicroBatcher, GatedEncoder]:
    gated = encoder if encoder is not None else GatedEncoder(dim=16)
    batcher = MicroBatcher(gated, max_batch=32, max_wait_s=0.0, max_pending=max_pending)  # type: ignore[arg-type]
    return batcher, gated  # type: ignore[return-value]


def test_late_jobs_run_after_waited_for_jobs_and_are_dropped_oldest_first() -> None:
    batcher, encoder = _gated_batcher(max_pending=6)
    try:
        running = batcher.submit(["running"])
        assert encoder.entered.wait(5)
        old = batcher.submit(["old1", "old2"], late=True)
        young = batcher.submit(["young1", "young2"])
        assert batcher.set_late(young)  # its caller gave up
        assert not batcher.set_late(running)  # already running: nothing to mark
        with pytest.raises(Overloaded):
            batcher.submit(["x", "y", "z"], late=True)  # late work never pushes anything out
        waited = batcher.submit(["w1", "w2", "w3"])  # needs 3 of 6: the oldest late job leaves
        assert old.cancelled() and not young.cancelled()
        assert (batcher.pending_texts, batcher.late_texts, batcher.stats.late_dropped) == (5, 2, 2)
        with pytest.raises(Overloaded, match="queue full"):
            batcher.submit(["a", "b", "c", "d", "e"])  # more than even dropping every late job frees
        assert not young.cancelled()  # ... so nothing was dropped for it
        encoder.release()
        for f in (running, waited, young):
            f.result(timeout=10)
    finally:
        batcher.close()
    assert encoder.seen == ["running", "w1", "w2", "w3", "young1", "young2"]


def test_a_late_job_marked_waited_for_again_runs_with_the_waited_for_ones() -> None:
    batcher, encoder = _gated_batcher(max_pending=10)
    try:
        batcher.submit(["running"])
        assert encoder.entered.wait(5)
        late = batcher.submit(["late"], late=True)
        batcher.submit(["waited"])
        assert batcher.set_late(late, False)  # a caller waits for it again
        assert batcher.late_texts == 0
        encoder.release()
        late.result(timeout=10)
    finally:
        batcher.close()
    assert encoder.batches == [["running"], ["late", "waited"]]  # one batch (length-sorted), not a late one


def test_late_submissions_are_tokenized_by_the_worker_not_the_submitter() -> None:
    from tests.test_batching_overload import RecordingTokenEncoder

    encoder = RecordingTokenEncoder()
    batcher = MicroBatcher(encoder, max_batch=8, max_wait_s=0.0, max_pending=10)
    try:
        late = batcher.submit(["abc", "de"], late=True)
        np.testing.assert_allclose(late.result(timeout=10), FakeEncoder(16).encode(["abc", "de"]), atol=1e-6)
    finally:
        batcher.close()
    assert encoder.tokenize_threads == ["encoder-batcher"]


def test_with_late_fill_off_a_cancelled_request_drops_its_queued_work(make_server: ServerFactory) -> None:
    encoder = GatedEncoder()
    settings = fake_settings(warmup=False, min_budget_ms=300.0, encode_late_fill=False)
    running, stub = make_server(settings, encoder=encoder)
    batcher = running.service._batcher
    assert batcher is not None
    assert stub.Rerank(_request("blocker-", TEXTS[:1]), timeout=0.5).fallback_reason == pb.FALLBACK_REASON_DEADLINE
    assert stub.Rerank(_request("late-"), timeout=0.5).fallback_reason == pb.FALLBACK_REASON_DEADLINE
    assert batcher.pending_texts == 0
    encoder.release()
    assert _wait_for(lambda: running.service._encoding is not None and running.service._encoding.in_flight == 0)
    assert encoder.seen == ["blocker-" + TEXTS[0]]  # what had started still lands in the cache
    assert stub.Rerank(_request("blocker-", TEXTS[:1]), timeout=5).encoded == 0


def test_a_cancelled_request_leaves_its_queued_work_to_fill_the_cache(make_server: ServerFactory) -> None:
    encoder = GatedEncoder()
    running, stub = make_server(fake_settings(warmup=False, encode_timeout_ms=30_000.0), encoder=encoder)
    blocker = stub.Rerank.future(_request("blocker-", TEXTS[:1]))
    assert encoder.entered.wait(30)  # through a real server: a busy machine may take seconds
    call = stub.Rerank.future(_request("gone-"))
    batcher = running.service._batcher
    assert batcher is not None and _wait_for(lambda: batcher.pending_texts == 5)
    call.cancel()
    assert _wait_for(lambda: batcher.late_texts == 5)
    encoder.release()
    assert blocker.result(timeout=10).variant == pb.VARIANT_RERANKED
    assert _wait_for(lambda: stub.Rerank(_request("gone-"), timeout=5).encoded == 0, 5)
    assert sorted(encoder.seen[1:]) == sorted("gone-" + t for t in TEXTS)
