"""The generated servicer, filled in: one short method per RPC; protobuf stays at this edge."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from reranker import convert
from reranker.cancellation import CancelToken
from reranker.errors import InvalidRequest
from reranker.ingest import ready_batches
from reranker.service import RerankService
from reranker.types import RecordResult
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc


# grpc reports "no deadline" as a huge remaining time; treat anything beyond a day as none.
_NO_DEADLINE_S = 86_400.0


def _remaining(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


def _cancel_token(context: grpc.ServicerContext) -> CancelToken:
    """A token fired when the RPC terminates; while we still work on it that means the caller left."""
    token = CancelToken()
    if not context.add_callback(token.cancel):
        token.cancel()  # already terminated
    return token


class RerankerServicer(pb_grpc.RerankerServiceServicer):
    def __init__(self, service: RerankService) -> None:
        self._service = service
        self._limits = convert.Limits.from_settings(service.settings)

    def Rerank(self, request: pb.RerankRequest, context: grpc.ServicerContext) -> convert.EncodedRerankResponse:
        # Answered as bytes (see add_to_server).
        query = convert.rerank_query(request, self._limits)
        return convert.encode_rerank_response(self._service.rerank(query, _remaining(context), _cancel_token(context)))

    def RecordEvents(self, request: pb.RecordEventsRequest, context: grpc.ServicerContext) -> pb.RecordEventsResponse:
        if not request.events:
            raise InvalidRequest("events must not be empty")
        events = convert.events_from_pb(request.events, "events", self._limits)
        return convert.record_response(
            self._service.record_events(events, _remaining(context), _cancel_token(context))
        )

    def StreamEvents(self, request_iterator: Iterator[pb.Event], context: grpc.ServicerContext) -> pb.RecordEventsResponse:
        total, seen, cancel = RecordResult(), 0, _cancel_token(context)
        # Apply what has arrived at once: a click on a long-lived stream counts for the next Rerank.
        for batch in ready_batches(request_iterator, self._limits.max_events):
            events = tuple(convert.event_from_pb(m, f"event[{seen + i}]", self._limits) for i, m in enumerate(batch))
            seen += len(batch)
            total = total + self._service.record_events(events, _remaining(context), cancel)
        return convert.record_response(total)

    def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.ServicerContext) -> pb.UpsertItemsResponse:
        items = convert.items_from_pb(request, self._limits)
        return convert.upsert_response(self._service.upsert_items(items, _remaining(context), _cancel_token(context)))

    def GetUserProfile(
        self, request: pb.GetUserProfileRequest, context: grpc.ServicerContext
    ) -> pb.GetUserProfileResponse:
        user_id = request.user_id
        if not user_id:
            raise InvalidRequest("user_id must not be empty")
        return convert.profile_response(self._service.user_profile(user_id, request.include_vector))


def add_to_server(servicer: RerankerServicer, server: grpc.Server) -> None:
    """Register the RerankerService methods: the generated registration, except that Rerank sends
    the bytes that convert.encode_rerank_response built (no RerankResponse object per call)."""
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_unary_rpc_method_handler
    handlers = {
        "Rerank": unary(
            servicer.Rerank, pb.RerankRequest.FromString, convert.serialize_rerank_response
        ),
        "RecordEvents": unary(
            servicer.RecordEvents, pb.RecordEventsRequest.FromString, pb.RecordEventsResponse.SerializeToString
        ),
        "StreamEvents": stream(servicer.StreamEvents, pb.Event.FromString, pb.RecordEventsResponse.SerializeToString),
        "UpsertItems": unary(
            servicer.UpsertItems, pb.UpsertItemsRequest.FromString, pb.UpsertItemsResponse.SerializeToString
        ),
        "GetUserProfile": unary(
            servicer.GetUserProfile, pb.GetUserProfileRequest.FromString, pb.GetUserProfileResponse.SerializeToString
        ),
    }
    service = pb.DESCRIPTOR.services_by_name["RerankerService"]
    missing = {m.name for m in service.methods} - set(handlers)
    if missing:
        raise RuntimeError(f"no handler for {sorted(missing)}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
