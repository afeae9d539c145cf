"""Per-RPC observation at the gRPC edge: request id, metrics, one access-log line.

Wraps each RerankerService handler inside errormapping.guarded, so it sees the service's own
exceptions and derives the status code from the same table (errormapping.status_for) before they
are mapped. Health checks and reflection are not observed (kubelet probes would otherwise dominate
the logs).

Never logged: user ids, item ids, texts. A Rerank line carries the experiment bucket and, when
`log_user_salt` is set, a salted hash of the user id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from reranker.config import ObservabilitySettings
from reranker.serving.convert import EncodedRerankResponse, candidate_count
from reranker.serving.errormapping import Handler, status_for
from reranker.metrics import Metrics
from reranker.types import order_of
from reranker.userhash import user_hash
from reranker.v1 import reranker_pb2 as pb

access_log = logging.getLogger("reranker.access")

REQUEST_ID_HEADER = "x-request-id"


def variant_label(variant: int) -> str:
    """pb.VARIANT_FALLBACK -> "fallback"."""
    return _VARIANT_LABELS.get(variant) or pb.Variant.Name(variant).removeprefix("VARIANT_").lower()


def reason_label(reason: int) -> str:
    """pb.FALLBACK_REASON_DEADLINE -> "deadline"."""
    return _REASON_LABELS.get(reason) or pb.FallbackReason.Name(reason).removeprefix("FALLBACK_REASON_").lower()


# Labels made once (an enum name lookup and two string copies per call otherwise).
_VARIANT_LABELS = {v: pb.Variant.Name(v).removeprefix("VARIANT_").lower() for v in pb.Variant.values()}
_REASON_LABELS = {v: pb.FallbackReason.Name(v).removeprefix("FALLBACK_REASON_").lower() for v in pb.FallbackReason.values()}


def _request_id(context: aio.ServicerContext, from_request: str = "") -> str:
    if from_request:
        return from_request
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and value:
            return value[:128]
    # 64 random bits as 16 hex digits, like the uuid4 prefix this was (60 bits), at a tenth of the cost:
    # uuid4 is an os.urandom system call and a UUID object per call. The module's generator is seeded
    # once per process (and again in a forked child), which is all a correlation id needs.
    return f"{random.getrandbits(64):016x}"


class Observer:
    """Wraps each RerankerService handler when it is registered (no per-call interceptor)."""

    def __init__(self, settings: ObservabilitySettings, metrics: Metrics) -> None:
        self._metrics = metrics
        self._access_log = settings.access_log
        self._sample = settings.access_log_sample
        self._user_salt = settings.log_user_salt

    def apply(self, settings: ObservabilitySettings) -> None:
        """Runtime settings changed (RerankService.watch_settings): the access-log sample follows."""
        self._sample = settings.access_log_sample

    def observed(self, behavior: Handler, method: str, *, streaming: bool) -> Handler:
        metrics = self._metrics
        rerank = method == "Rerank"

        async def observe(request: Any, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            counter = None
            if streaming:
                request = counter = _CountingIterator(request)
            elif rerank and not request.request_id:
                # Give the request an id when the caller did not: the response echoes it.
                request.request_id = _request_id(context)
            code, error, response = "OK", "", None
            try:
                response = await behavior(request, context)
                return response
            except asyncio.CancelledError:
                code = "CANCELLED"  # the caller went away or its deadline passed
                raise
            except Exception as exc:
                code = status_for(exc)[0].name
                error = type(exc).__name__  # messages may quote ids: not logged
                raise
            finally:
                seconds = time.perf_counter() - started
                variant = reason = ""
                if response.__class__ is EncodedRerankResponse:
                    result = response.result
                    variant = _VARIANT_LABELS[result.variant]
                    if result.variant == pb.VARIANT_FALLBACK:
                        reason = _REASON_LABELS[result.fallback_reason]
                    metrics.rerank_candidates.observe(candidate_count(request))
                    metrics.observe_order(result.arm, order_of(result))
                metrics.observe_rpc(method, code, seconds, variant, reason)
                # Sampled out or below the logger's level: no fields, no record, nothing formatted.
                if self._access_log and self._should_log(code, variant) and access_log.isEnabledFor(logging.INFO):
                    self._log(method, code, error, seconds, variant, request, response, context, counter)

        return observe

    def _log(
        self, method: str, code: str, error: str, seconds: float, variant: str, request: Any, response: Any,
        context: aio.ServicerContext, counter: _CountingIterator | None,
    ) -> None:
        fields: dict[str, Any] = {
            "method": method, "request_id": getattr(request, "request_id", "") or _request_id(context),
        }
        if error:
            fields["error"] = error
        fields["code"] = code
        fields.update(self._describe(request, response, counter.count if counter is not None else None))
        fields["latency_ms"] = round(seconds * 1000.0, 3)
        access_log.info(
            "%s %s %.1f ms%s", method, code, seconds * 1000.0, f" {variant}" if variant else "",
            extra={"fields": fields},
        )

    def _should_log(self, code: str, variant: str) -> bool:
        """Always log failures and anything but a personalized answer; sample the rest."""
        if code != "OK" or variant not in ("", "reranked") or self._sample >= 1.0:
            return True
        return random.random() < self._sample

    def _describe(self, request: Any, response: Any, streamed: int | None) -> dict[str, Any]:
        """Counts and outcome of one call: sizes, bucket, variant; never ids or texts."""
        out: dict[str, Any] = {}
        if isinstance(request, pb.RerankRequest):
            out["candidates"] = candidate_count(request)
            if self._user_salt and request.user_id:
                out["user_hash"] = user_hash(self._user_salt, request.user_id)
            if request.experiment:
                out["experiment"] = request.experiment
        elif isinstance(request, pb.RecordEventsRequest):
            out["events"] = len(request.events)
        elif isinstance(request, pb.UpsertItemsRequest):
            out["items"] = len(request.items)
        if streamed is not None:
            out["events"] = streamed
        if isinstance(response, EncodedRerankResponse):
            result = response.result
            out["variant"] = variant_label(result.variant)
            out["arm"] = result.arm or "bypassed"
            out["order"] = order_of(result)  # personalized, cold (no profile: upstream order) or upstream
            out["bucket"] = result.bucket
            out["returned"] = len(result.items)
            out["cold_user"] = result.cold_user
            out["encoded"] = result.encoded
            out["cache_hits"] = result.cache_hits
            if result.variant == pb.VARIANT_FALLBACK:
                out["fallback_reason"] = reason_label(result.fallback_reason)
                out["fallback_detail"] = result.fallback_detail[:200]
        return out


class _CountingIterator:
    """Wraps a request stream and counts the messages the servicer pulled."""

    def __init__(self, inner: AsyncIterator[Any]) -> None:
        self._inner = inner
        self.count = 0

    def __aiter__(self) -> _CountingIterator:
        return self

    async def __anext__(self) -> Any:
        item = await self._inner.__anext__()
        self.count += 1
        return item
