"""The generated servicer, filled in: one short method per RPC; protobuf stays at this edge."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from reranker import convert
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


class RerankerServicer(pb_grpc.RerankerServiceServicer):
    def __init__(self, service: RerankService) -> None:
        self._service = service
        self._limits = convert.Limits.from_settings(service.settings)

    def Rerank(self, request: pb.RerankRequest, context: grpc.ServicerContext) -> pb.RerankResponse:
        query = convert.rerank_query(request, self._limits)
        return convert.rerank_response(self._service.rerank(query, _remaining(context)))

    def RecordEvents(self, request: pb.RecordEventsRequest, context: grpc.ServicerContext) -> pb.RecordEventsResponse:
        if not request.events:
            raise InvalidRequest("events must not be empty")
        events = convert.events_from_pb(request.events, "events", self._limits)
        return convert.record_response(self._service.record_events(events, _remaining(context)))

    def StreamEvents(self, request_iterator: Iterator[pb.Event], context: grpc.ServicerContext) -> pb.RecordEventsResponse:
        total, seen = RecordResult(), 0
        # Apply what has arrived at once: a click on a long-lived stream counts for the next Rerank.
        for batch in ready_batches(request_iterator, self._limits.max_events):
            events = tuple(convert.event_from_pb(m, f"event[{seen + i}]", self._limits) for i, m in enumerate(batch))
            seen += len(batch)
            total = total + self._service.record_events(events, _remaining(context))
        return convert.record_response(total)

    def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.ServicerContext) -> pb.UpsertItemsResponse:
        items = convert.items_from_pb(request, self._limits)
        return convert.upsert_response(self._service.upsert_items(items, _remaining(context)))

    def GetUserProfile(
        self, request: pb.GetUserProfileRequest, context: grpc.ServicerContext
    ) -> pb.GetUserProfileResponse:
        user_id = request.user_id
        if not user_id:
            raise InvalidRequest("user_id must not be empty")
        return convert.profile_response(self._service.user_profile(user_id, request.include_vector))
