"""Server interceptor: maps the error hierarchy to gRPC status codes, in one table.

Unknown exceptions become a generic INTERNAL message (logged here), never a stack trace to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from reranker.errors import (
    EncoderFailed,
    EncodeTimeout,
    InvalidRequest,
    NotReady,
    Overloaded,
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
    (RerankerError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for error_type, code in STATUS_FOR_ERROR:
        if isinstance(exc, error_type):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


def _guard(behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable[..., Any]:
    def guarded(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
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
                _guard(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _guard(handler.stream_unary, method), handler.request_deserializer, handler.response_serializer
            )
        return handler
