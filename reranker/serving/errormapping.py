"""Error mapping at the gRPC edge: the error hierarchy becomes gRPC status codes, in one table.

`guarded` wraps each RerankerService handler when it is registered (no per-call interceptor).
Unknown exceptions become a generic INTERNAL message (logged here), never a stack trace to the
caller. Request bytes that do not parse (corrupt wire format, invalid UTF-8 in a string field)
become InvalidRequest too: `tolerant` wraps the handlers' deserializers so that a parse failure
reaches the guarded handler instead of grpc's generic "Exception deserializing request".

INVALID_ARGUMENT follows the standard rich error model as well: the status details carry a
google.rpc.BadRequest whose field violation names the request field the message starts with
("candidates[3].item_id must not be empty" -> field `candidates[3].item_id`), when that path exists
in the request message; any gRPC client reads it (Python: grpc_status.rpc_status.from_call, Go:
status.FromError(err).Details(), Java: StatusProto.fromThrowable).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from reranker.errors import (
    EncoderFailed,
    EncodeTimeout,
    InvalidRequest,
    NotReady,
    Overloaded,
    RequestCancelled,
    RerankerError,
)

log = logging.getLogger(__name__)

Handler = Callable[[Any, aio.ServicerContext], Awaitable[Any]]

# Most specific first.
STATUS_FOR_ERROR: tuple[tuple[type[RerankerError], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (EncodeTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (EncoderFailed, grpc.StatusCode.UNAVAILABLE),
    (RequestCancelled, grpc.StatusCode.CANCELLED),
    (RerankerError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for error_type, code in STATUS_FOR_ERROR:
        if isinstance(exc, error_type):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


# A leading field path: "candidates[3].item_id", "options.consumed", "packed_candidates.scores[2]".
_FIELD_PATH = re.compile(r"[A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*")


def field_path(message: str, request_type: Descriptor | None) -> str:
    """The request field `message` starts with, if that path exists in `request_type`; else ""."""
    match = _FIELD_PATH.match(message)
    if match is None or request_type is None or not message[match.end():].startswith(" "):
        return ""
    descriptor: Descriptor | None = request_type
    for part in match.group(0).split("."):
        found = descriptor.fields_by_name.get(part.partition("[")[0]) if descriptor is not None else None
        if found is None:
            return ""
        descriptor = found.message_type
    return match.group(0)


def invalid_argument(message: str, field: str) -> grpc.Status:
    """INVALID_ARGUMENT with a google.rpc.BadRequest naming `field` in the status details."""
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message)
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return rpc_status.to_status(status)


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    reason: str

    def error(self, where: str) -> InvalidRequest:
        return InvalidRequest(f"{where} is not a valid protobuf message: {self.reason}")


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError: bad wire format, invalid UTF-8, too deep nesting
            return _Undecodable(str(exc) or type(exc).__name__)

    return deserialize


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error(f"stream message {index}")
        index += 1
        yield request


def guarded(behavior: Handler, method: str, *, streaming: bool) -> Handler:
    async def guard(request_or_iterator: Any, context: aio.ServicerContext) -> Any:
        try:
            if streaming:
                request_or_iterator = _checked_stream(request_or_iterator)
            elif isinstance(request_or_iterator, _Undecodable):
                raise request_or_iterator.error("request")
            return await behavior(request_or_iterator, context)
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", method)
            field = ""
            if code is grpc.StatusCode.INVALID_ARGUMENT and not streaming:
                field = field_path(message, getattr(request_or_iterator, "DESCRIPTOR", None))
        # Abort outside the except block: no chained traceback (whose message may quote request
        # fields) reaches tracing or other outer layers.
        if field:
            status = invalid_argument(message, field)
            await context.abort(status.code, status.details, status.trailing_metadata)
        await context.abort(code, message)

    return guard
