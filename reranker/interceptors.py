"""Server interceptor: maps the error hierarchy to gRPC status codes, in one table.

Unknown exceptions become a generic INTERNAL message (logged here), never a stack trace to the caller.
Request bytes that do not parse (corrupt wire format, invalid UTF-8 in a string field) become
InvalidRequest too: the handlers' deserializers are wrapped so that a parse failure reaches the
guarded handler instead of grpc's generic "Exception deserializing request".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

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


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    reason: str

    def error(self, where: str) -> InvalidRequest:
        return InvalidRequest(f"{where} is not a valid protobuf message: {self.reason}")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError: bad wire format, invalid UTF-8, too deep nesting
            return _Undecodable(str(exc) or type(exc).__name__)

    return deserialize


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for index, request in enumerate(requests):
        if isinstance(request, _Undecodable):
            raise request.error(f"stream message {index}")
        yield request


def _guard(behavior: Callable[[Any, grpc.ServicerContext], Any], method: str, streaming: bool) -> Callable[..., Any]:
    def guarded(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            if streaming:
                request_or_iterator = _checked_stream(request_or_iterator)
            elif isinstance(request_or_iterator, _Undecodable):
                raise request_or_iterator.error("request")
            return behavior(request_or_iterator, context)
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", method)
        # Abort outside the except block: no chained traceback (whose message may quote request
        # fields) reaches tracing or other outer interceptors.
        context.abort(code, message)

    return guarded


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard(handler.unary_unary, method, streaming=False),
                _tolerant(handler.request_deserializer),
                handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _guard(handler.stream_unary, method, streaming=True),
                _tolerant(handler.request_deserializer),
                handler.response_serializer,
            )
        return handler
