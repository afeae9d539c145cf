"""The servicer in process, through grpc_testing (no socket, no server): protobuf in, the service's
answer out, and the edge's error table (errormapping.status_for) for refused requests. The same
handlers behind a real server are covered by tests/test_e2e.py and tests/test_input_hardening.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest

from conftest import candidate, event
from reranker.errors import RerankerError
from reranker.service import RerankService
from reranker.serving.errormapping import status_for
from reranker.serving.servicer import RerankerServicer
from reranker.v1 import reranker_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["RerankerService"]


class BlockingServicer:
    """RerankerServicer's coroutines run to completion per call (grpc_testing calls handlers on its
    own threads and awaits nothing); a refused request aborts with the edge's status and message."""

    def __init__(self, servicer: RerankerServicer) -> None:
        self._servicer = servicer

    def _run(self, method: str, request: Any, context: Any) -> Any:
        try:
            return asyncio.run(getattr(self._servicer, method)(request, context))
        except RerankerError as exc:
            context.abort(*status_for(exc))

    def Rerank(self, request: pb.RerankRequest, context: Any) -> Any:
        return self._run("Rerank", request, context)

    def RecordEvents(self, request: pb.RecordEventsRequest, context: Any) -> Any:
        return self._run("RecordEvents", request, context)

    def GetUserProfile(self, request: pb.GetUserProfileRequest, context: Any) -> Any:
        return self._run("GetUserProfile", request, context)


@pytest.fixture
def test_server(service: RerankService) -> Iterator[grpc_testing.Server]:
    service.load()
    with ThreadPoolExecutor(4) as pool:
        servicer = BlockingServicer(RerankerServicer(service, pool))
        yield grpc_testing.server_from_dictionary({SERVICE: servicer}, grpc_testing.strict_real_time())
    service.close()


def call(server: grpc_testing.Server, method: str, request: Any, timeout: float = 10.0) -> tuple[Any, grpc.StatusCode, str]:
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name[method], (), request, timeout)
    response, _trailing, code, details = rpc.termination()
    return response, code, details


def test_rerank_answers_every_candidate_once(test_server: grpc_testing.Server) -> None:
    request = pb.RerankRequest(user_id="u", candidates=[candidate(f"i{k}", 1.0 / (k + 1), f"text {k}") for k in range(5)])
    response, code, _ = call(test_server, "Rerank", request)
    assert code == grpc.StatusCode.OK
    answer = pb.RerankResponse.FromString(response.data)  # the servicer answers pre-encoded bytes
    assert sorted(item.item_id for item in answer.items) == [f"i{k}" for k in range(5)]
    assert answer.variant == pb.VARIANT_RERANKED


def test_a_refused_candidate_is_invalid_argument_naming_the_field(test_server: grpc_testing.Server) -> None:
    request = pb.RerankRequest(user_id="u", candidates=[candidate("", 1.0, "text")])
    _, code, details = call(test_server, "Rerank", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "item_id" in details


def test_record_events_refuses_an_empty_batch(test_server: grpc_testing.Server) -> None:
    _, code, details = call(test_server, "RecordEvents", pb.RecordEventsRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "events must not be empty"


def test_recorded_events_show_in_the_profile(test_server: grpc_testing.Server) -> None:
    events = [event("u", f"i{k}", f"text {k}", type=pb.EVENT_TYPE_CLICK) for k in range(3)]
    response, code, _ = call(test_server, "RecordEvents", pb.RecordEventsRequest(events=events))
    assert code == grpc.StatusCode.OK and response.accepted == 3
    profile, code, _ = call(test_server, "GetUserProfile", pb.GetUserProfileRequest(user_id="u"))
    assert code == grpc.StatusCode.OK and profile.event_count == 3
