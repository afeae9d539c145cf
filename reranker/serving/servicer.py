"""The RerankerService handlers: one short coroutine per RPC; protobuf stays at this edge.

They run on the server's event loop. A warm Rerank (every vector cached, profiles in process) is
answered right there, with no thread hop; anything that waits (encoding, writes, a Redis round
trip) runs on `blocking_pool`, so the loop never stalls behind it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
from grpc import aio

from reranker.serving import convert
from reranker.cancellation import CancelToken
from reranker.serving.errormapping import Handler, guarded, tolerant
from reranker.errors import InvalidRequest
from reranker.users.eventpolicy import EventRefused
from reranker.users.ingest import ready_batches
from reranker.serving.observability import Observer
from reranker.pipeline import Resume
from reranker.service import RerankService
from reranker.types import Event, RecordResult
from reranker.v1 import reranker_pb2 as pb

R = TypeVar("R")

SERVICE = pb.DESCRIPTOR.services_by_name["RerankerService"]
# grpc reports "no deadline" as a huge remaining time; treat anything beyond a day as none.
_NO_DEADLINE_S = 86_400.0


def _remaining(context: aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


class RerankerServicer:
    def __init__(self, service: RerankService, blocking_pool: Executor) -> None:
        self._service = service
        self._pool = blocking_pool
        self._limits = convert.Limits.from_settings(service.settings.limits, service.settings.users)

    async def _blocking(
        self, fn: Callable[..., R], arg: Any, context: aio.ServicerContext, **kwargs: Any
    ) -> R:
        """`fn(arg, time_remaining, cancel=token, **kwargs)` on the blocking pool.

        time_remaining is taken when a pool thread picks the call up (time spent queued counts
        against the caller's deadline). If this RPC ends first (caller cancelled, deadline
        passed), the token fires: queued encoder work is dropped and the thread freed at once."""
        remaining = _remaining(context)
        deadline = None if remaining is None else time.monotonic() + remaining
        token = CancelToken()

        def call() -> R:
            left = None if deadline is None else deadline - time.monotonic()
            return fn(arg, left, cancel=token, **kwargs)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except asyncio.CancelledError:
            token.cancel()
            raise

    def _counted(self, convert_fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """`convert_fn(...)`, counting a refusal by the event policy in reranker_events_refused."""
        try:
            return convert_fn(*args, **kwargs)
        except EventRefused as exc:
            self._service.metrics.events_refused.labels(field=exc.field).inc()
            raise

    async def Rerank(self, request: pb.RerankRequest, context: aio.ServicerContext) -> convert.EncodedRerankResponse:
        # Answered as bytes (see add_to_server).
        if request.context_events:
            query, form = self._counted(convert.rerank_request, request, self._limits, self._service.now())
        else:
            query, form = convert.rerank_request(request, self._limits)
        remaining, service = _remaining(context), self._service
        columns, packed = form.columns, (form if form.packed else None)
        resume: Resume | None = None
        if service.profiles_in_process:  # answered on the event loop where nothing needs encoding
            first = service.try_cached(query, remaining)
            if not isinstance(first, Resume):
                return convert.encode_rerank_response(first, columns, packed)
            resume = first
        result = await self._blocking(service.rerank, query, context, resume=resume)
        return convert.encode_rerank_response(result, columns, packed)

    async def RecordEvents(self, request: pb.RecordEventsRequest, context: aio.ServicerContext) -> pb.RecordEventsResponse:
        if not request.events:
            raise InvalidRequest("events must not be empty")
        events = self._counted(convert.events_from_pb, request.events, "events", self._limits, now=self._service.now())
        return convert.record_response(await self._blocking(self._service.record_events, events, context))

    async def StreamEvents(
        self, request_iterator: AsyncIterator[pb.Event], context: aio.ServicerContext
    ) -> pb.RecordEventsResponse:
        total, seen = RecordResult(), 0
        # Apply what has arrived at once: a click on a long-lived stream counts for the next Rerank.
        # A refused event ends the stream; the events before it are applied, whatever the batching.
        async for batch in ready_batches(request_iterator, self._limits.max_events):
            now = self._service.now()
            events: list[Event] = []
            refused: InvalidRequest | None = None
            for m in batch:
                try:
                    events.append(self._counted(convert.event_from_pb, m, f"event[{seen}]", self._limits, now=now))
                except InvalidRequest as exc:
                    refused = exc
                    break
                seen += 1
            if events:
                total = total + await self._blocking(self._service.record_events, events, context)
            if refused is not None:
                raise refused
        return convert.record_response(total)

    async def UpsertItems(self, request: pb.UpsertItemsRequest, context: aio.ServicerContext) -> pb.UpsertItemsResponse:
        items = convert.items_from_pb(request, self._limits)
        return convert.upsert_response(await self._blocking(self._service.upsert_items, items, context))

    async def GetUserProfile(
        self, request: pb.GetUserProfileRequest, context: aio.ServicerContext
    ) -> pb.GetUserProfileResponse:
        user_id = request.user_id
        if not user_id:
            raise InvalidRequest("user_id must not be empty")
        loop = asyncio.get_running_loop()
        view = await loop.run_in_executor(self._pool, self._service.user_profile, user_id, request.include_vector)
        return convert.profile_response(view)


def add_to_server(servicer: RerankerServicer, server: aio.Server, observer: Observer) -> None:
    """Register the RerankerService methods, each wrapped once (not per call) with error mapping
    outside observation. Rerank sends the bytes that convert.encode_rerank_response built (no
    RerankResponse object per call)."""

    def wrap(behavior: Handler, method: str, streaming: bool = False) -> Handler:
        return guarded(observer.observed(behavior, method, streaming=streaming), method, streaming=streaming)

    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_unary_rpc_method_handler
    handlers = {
        "Rerank": unary(
            wrap(servicer.Rerank, "Rerank"),
            tolerant(pb.RerankRequest.FromString),
            convert.serialize_rerank_response,
        ),
        "RecordEvents": unary(
            wrap(servicer.RecordEvents, "RecordEvents"),
            tolerant(pb.RecordEventsRequest.FromString),
            pb.RecordEventsResponse.SerializeToString,
        ),
        "StreamEvents": stream(
            wrap(servicer.StreamEvents, "StreamEvents", streaming=True),
            tolerant(pb.Event.FromString),
            pb.RecordEventsResponse.SerializeToString,
        ),
        "UpsertItems": unary(
            wrap(servicer.UpsertItems, "UpsertItems"),
            tolerant(pb.UpsertItemsRequest.FromString),
            pb.UpsertItemsResponse.SerializeToString,
        ),
        "GetUserProfile": unary(
            wrap(servicer.GetUserProfile, "GetUserProfile"),
            tolerant(pb.GetUserProfileRequest.FromString),
            pb.GetUserProfileResponse.SerializeToString,
        ),
    }
    missing = {m.name for m in SERVICE.methods} - set(handlers)
    if missing:
        raise RuntimeError(f"no handler for {sorted(missing)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
