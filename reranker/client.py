"""A small Python client for the sidecar: deadlines, retries on UNAVAILABLE only, and fail-open.

    from reranker.client import RerankerClient

    with RerankerClient("127.0.0.1:50051", timeout_s=0.05) as client:
        outcome = client.rerank_or_upstream("user-42", [("item-1", 0.9, "text"), ("item-2", 0.8)])
        serve(outcome.item_ids)          # always a usable order, reranked or upstream
        if not outcome.reranked:
            count_fallback(outcome.reason)

- Every call has a deadline (`timeout_s`): one budget for the call *including* its retries.
- Only UNAVAILABLE is retried (sidecar restarting, model still loading, connection refused), with
  jittered exponential backoff while the budget lasts, by gRPC itself: the channel carries the
  published service config (reranker/serviceconfig.json, `retryPolicy`), the one a Go or Java caller
  uses too. INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED and the rest are returned at once:
  retrying them cannot help or makes overload worse.
- `rerank_or_upstream` never raises: on any error or timeout it returns the caller's own order
  (de-duplicated, cut to top_k) with the reason, the server's message (`detail`) and, for
  INVALID_ARGUMENT, the request field that was wrong (`field`), so the sidecar can never break the page.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, TypeVar

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# gRPC caps a retry policy's maxAttempts at 5.
MAX_RETRIES = 4
# gRPC reads backoffs in whole milliseconds; with a 1 ms initial backoff grpcio 1.85 stalled about half
# of the retried calls until their deadline (0 of 15 at 2 ms and above, measured): keep clear of that.
MIN_BACKOFF_S = 0.005


@cache
def published_service_config() -> dict[str, Any]:
    """reranker/serviceconfig.json: per-method timeouts and the UNAVAILABLE retry policy (gRPC service config)."""
    return json.loads(resources.files("reranker").joinpath("serviceconfig.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def service_config_options(
    retries: int = 2, backoff_s: float = 0.01, max_backoff_s: float = 0.2, *, timeouts: bool = False
) -> list[tuple[str, Any]]:
    """Channel options that make gRPC retry UNAVAILABLE by the published service config, with
    `retries` extra attempts (0 = none) and jittered exponential backoff from `backoff_s` up to
    `max_backoff_s`. Without `timeouts` the config's per-method timeouts are left out: the caller
    passes a deadline per call, and grpcio applies a service-config timeout against a stale start
    time, failing calls early (grpc/grpc#34547); Go and Java callers use them as published."""
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be in [0, {MAX_RETRIES}] (gRPC allows at most 5 attempts)")
    if backoff_s < MIN_BACKOFF_S:
        raise ValueError(f"backoff_s must be at least {MIN_BACKOFF_S} s")
    config = copy.deepcopy(published_service_config())
    for method in config["methodConfig"]:
        if not timeouts:
            method.pop("timeout", None)
        if retries == 0:
            method.pop("retryPolicy", None)
        elif "retryPolicy" in method:
            method["retryPolicy"].update(
                maxAttempts=retries + 1, initialBackoff=f"{backoff_s:.3f}s", maxBackoff=f"{max(max_backoff_s, backoff_s):.3f}s"
            )
    return [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]


def error_field(exc: grpc.RpcError) -> str:
    """The request field an INVALID_ARGUMENT names (the google.rpc.BadRequest in the status details,
    e.g. "candidates[3].item_id"), or "" when the error carries none."""
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except Exception:  # a status whose details do not match its code or message: no field to report
        return ""
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                return violation.field
    return ""

CandidateLike = pb.Candidate | tuple[str, float] | tuple[str, float, str | None]
T = TypeVar("T")


def to_candidate(value: CandidateLike) -> pb.Candidate:
    """pb.Candidate, (item_id, score) or (item_id, score, text) -> pb.Candidate."""
    if isinstance(value, pb.Candidate):
        return value
    item_id, score, *rest = value
    candidate = pb.Candidate(item_id=item_id, score=float(score))
    if rest and rest[0] is not None:
        candidate.text = rest[0]
    return candidate


def to_columns(candidates: Sequence[CandidateLike]) -> pb.CandidateColumns | None:
    """The candidates as one CandidateColumns message (cheaper to build, send and read than a
    message per candidate), or None when one needs the message form: a text set to "" (columns
    read "" as "no text")."""
    item_ids: list[str] = []
    scores: list[float] = []
    texts: list[str] = []
    any_text = False
    for value in candidates:
        if isinstance(value, pb.Candidate):
            item_id, score, text = value.item_id, value.score, value.text if value.HasField("text") else None
        else:
            item_id, score, *rest = value
            text = rest[0] if rest else None
        if text == "":
            return None
        item_ids.append(item_id)
        scores.append(float(score))
        texts.append(text or "")
        any_text = any_text or text is not None
    return pb.CandidateColumns(item_ids=item_ids, scores=scores, texts=texts if any_text else [])


def item_ids_of(response: pb.RerankResponse) -> list[str]:
    """The answer's order, whether it came as `items` or as `item_columns`."""
    if response.HasField("item_columns"):
        return list(response.item_columns.item_ids)
    return [it.item_id for it in response.items]


def upstream_order(candidates: Sequence[pb.Candidate], top_k: int = 0) -> list[str]:
    """The caller's own order, de-duplicated by item id (first wins) and cut to top_k, as the server does."""
    seen: set[str] = set()
    out = []
    for c in candidates:
        if c.item_id not in seen:
            seen.add(c.item_id)
            out.append(c.item_id)
    return out[:top_k] if top_k else out


def packed_candidates(
    item_ids: Any, scores: Any, texts: Sequence[str | None] | None = None
) -> pb.PackedCandidates:
    """Candidates as PackedCandidates: integer ids (int64) and upstream scores (float32) as raw
    little-endian bytes (one `tobytes` each, no message per candidate); `texts`, when given, one
    per id, None or "" meaning no text. Decimal string ids on the server ("42") are these ids."""
    ids = np.ascontiguousarray(item_ids, dtype="<i8")
    values = np.ascontiguousarray(scores, dtype="<f4")
    if ids.ndim != 1 or values.shape != ids.shape:
        raise ValueError(f"item_ids and scores must be 1-D of one length, got {ids.shape} and {values.shape}")
    packed = pb.PackedCandidates(item_ids=ids.tobytes(), scores=values.tobytes())
    if texts is not None:
        if len(texts) != ids.size:
            raise ValueError(f"texts has {len(texts)} values for {ids.size} item_ids")
        packed.texts.extend([t or "" for t in texts])
    return packed


@dataclass(frozen=True)
class PackedRanking:
    """A packed answer as numpy arrays, best first: `positions` index the request's candidates."""

    positions: np.ndarray  # int32
    scores: np.ndarray  # float32 final scores
    item_ids: np.ndarray | None = None  # int64, when asked for (or on the client-side fallback)
    semantic_scores: np.ndarray | None = None  # float32, when asked for
    upstream_scores: np.ndarray | None = None  # float32, when asked for
    # "reranked", "control", "bypassed", "fallback" (server-side fail-open) or "error" (client-side).
    variant: str = "reranked"
    reason: str = ""
    response: pb.RerankResponse | None = field(default=None, repr=False)
    # On a client-side fail-open: the server's message, and the request field it names (INVALID_ARGUMENT).
    detail: str = ""
    field: str = ""

    @property
    def reranked(self) -> bool:
        return self.variant == "reranked"


def unpack_items(response: pb.RerankResponse) -> PackedRanking:
    """RerankResponse.packed_items as arrays (read in place with numpy.frombuffer: read-only)."""
    packed = response.packed_items

    def column(data: bytes, dtype: str) -> np.ndarray | None:
        return np.frombuffer(data, dtype=dtype) if data else None

    positions = np.frombuffer(packed.positions, dtype="<i4")
    return PackedRanking(
        positions=positions,
        scores=np.frombuffer(packed.scores, dtype="<f4"),
        item_ids=column(packed.item_ids, "<i8"),
        semantic_scores=column(packed.semantic_scores, "<f4"),
        upstream_scores=column(packed.upstream_scores, "<f4"),
        variant=pb.Variant.Name(response.variant).removeprefix("VARIANT_").lower(),
        reason=_fallback_reason(response),
        response=response,
    )


def _fallback_reason(response: pb.RerankResponse) -> str:
    if response.variant != pb.VARIANT_FALLBACK:
        return ""
    return pb.FallbackReason.Name(response.fallback_reason).removeprefix("FALLBACK_REASON_").lower()


@dataclass(frozen=True)
class RerankOutcome:
    """What to serve, and why."""

    item_ids: list[str]
    # True only when the order is the sidecar's personalized one (VARIANT_RERANKED).
    reranked: bool
    # "reranked", "control", "bypassed", "fallback" (server-side fail-open) or "error" (client-side).
    variant: str
    # Empty when reranked/control/bypassed; else the server's fallback reason ("deadline", ...) or
    # the gRPC status name of the failed call ("UNAVAILABLE", "DEADLINE_EXCEEDED", ...).
    reason: str = ""
    response: pb.RerankResponse | None = None
    # Calls this client made (1; 0 when the request could not even be built). Retries on UNAVAILABLE
    # happen inside the gRPC channel (service config): the server's reranker_rpcs_total counts each attempt.
    attempts: int = 0
    latency_ms: float = 0.0
    # The server's message (fallback detail, or the gRPC status details on an error) ...
    detail: str = ""
    # ... and, on INVALID_ARGUMENT, the request field that was wrong ("user_id", "candidates[3].item_id").
    field: str = ""


class RerankerClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout_s: float = 0.1,
        retries: int = 2,
        backoff_s: float = 0.01,
        max_backoff_s: float = 0.2,
        channel: grpc.Channel | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`timeout_s`: default deadline per call, retries included. `retries` (0-4): extra attempts on
        UNAVAILABLE, made by the channel's retry policy (service_config_options). A `channel` given
        here is used as it is: build it with `options=service_config_options()` for the retries.
        A "grpc.service_config" in `channel_options` replaces the published one."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        options = list(channel_options)
        if not any(key == "grpc.service_config" for key, _ in options):
            options = service_config_options(retries, backoff_s, max_backoff_s) + options
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._own_channel = channel is None
        self._channel = channel if channel is not None else grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.RerankerServiceStub(self._channel)

    # --- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> RerankerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, method: Callable[..., T], request: Any, timeout_s: float | None, attempts: list[int] | None = None
    ) -> T:
        """One call with one deadline for all its attempts (the channel retries UNAVAILABLE within it).

        `attempts`, when given, is a one-element list that receives the number of calls made (1).
        """
        if attempts is not None:
            attempts[:] = [1]
        return method(request, timeout=self.timeout_s if timeout_s is None else timeout_s)  # type: ignore[no-any-return]

    # --- RPCs ----------------------------------------------------------------------------------
    def rerank(
        self,
        user_id: str,
        candidates: Iterable[CandidateLike],
        *,
        top_k: int = 0,
        context_events: Sequence[pb.Event] = (),
        experiment: str = "",
        request_id: str = "",
        options: pb.RerankOptions | None = None,
        timeout_s: float | None = None,
        columns: bool = False,
    ) -> pb.RerankResponse:
        """The raw Rerank call (raises grpc.RpcError). Most callers want `rerank_or_upstream`.
        `columns`: ask for the answer as `item_columns` (see item_ids_of)."""
        request = self.rerank_request(
            user_id, candidates, top_k=top_k, context_events=context_events, experiment=experiment,
            request_id=request_id, options=options, columns=columns,
        )
        return self._call(self._stub.Rerank, request, timeout_s)

    @staticmethod
    def rerank_request(
        user_id: str,
        candidates: Iterable[CandidateLike],
        *,
        top_k: int = 0,
        context_events: Sequence[pb.Event] = (),
        experiment: str = "",
        request_id: str = "",
        options: pb.RerankOptions | None = None,
        columns: bool = False,
    ) -> pb.RerankRequest:
        """The request, with the candidates as columns (see to_columns) where they allow it;
        `columns` asks for the answer as columns too (RerankOptions.columns)."""
        given = list(candidates)
        candidate_columns = to_columns(given)
        if columns:
            given_options, options = options, pb.RerankOptions()
            if given_options is not None:
                options.CopyFrom(given_options)  # never change the caller's message
            options.columns = True
        return pb.RerankRequest(
            user_id=user_id,
            candidates=[to_candidate(c) for c in given] if candidate_columns is None else None,
            candidate_columns=candidate_columns,
            context_events=list(context_events),
            top_k=top_k,
            options=options,
            experiment=experiment,
            request_id=request_id,
        )

    def rerank_or_upstream(
        self,
        user_id: str,
        candidates: Iterable[CandidateLike],
        *,
        top_k: int = 0,
        context_events: Sequence[pb.Event] = (),
        experiment: str = "",
        request_id: str = "",
        options: pb.RerankOptions | None = None,
        timeout_s: float | None = None,
        columns: bool = False,
    ) -> RerankOutcome:
        """Rerank, or the upstream order on *any* error or timeout. Never raises. `columns`: the
        server answers with `item_columns` (cheaper for hundreds of items; no explanations);
        `outcome.item_ids` is the order either way."""
        started = time.monotonic()
        attempts = [0]
        given = list(candidates)
        try:
            request = self.rerank_request(
                user_id, given, top_k=top_k, context_events=context_events, experiment=experiment,
                request_id=request_id, options=options, columns=columns,
            )
            response = self._call(self._stub.Rerank, request, timeout_s, attempts)
        except grpc.RpcError as exc:
            reason, detail = _status(exc)
            return _upstream(given, top_k, reason, detail, started, attempts[0], error_field(exc))
        except Exception as exc:  # a bug or bad input on our side must not break the caller either
            log.warning("rerank failed on the client side; serving upstream order", exc_info=True)
            return _upstream(given, top_k, "CLIENT_ERROR", str(exc), started, attempts[0])
        variant = pb.Variant.Name(response.variant).removeprefix("VARIANT_").lower()
        return RerankOutcome(
            item_ids=item_ids_of(response),
            reranked=response.variant == pb.VARIANT_RERANKED,
            variant=variant,
            reason=_fallback_reason(response),
            response=response,
            attempts=attempts[0],
            latency_ms=1000.0 * (time.monotonic() - started),
            detail=response.fallback_detail,
        )

    def rerank_packed(
        self,
        user_id: str,
        item_ids: Any,
        scores: Any,
        texts: Sequence[str | None] | None = None,
        *,
        top_k: int = 0,
        context_events: Sequence[pb.Event] = (),
        experiment: str = "",
        request_id: str = "",
        options: pb.RerankOptions | None = None,
        with_item_ids: bool = False,
        with_score_details: bool = False,
        timeout_s: float | None = None,
        fail_open: bool = True,
    ) -> PackedRanking:
        """Rerank with the packed form: int64 ids and float32 scores in, arrays out (see
        PackedRanking), no Python object per candidate on either side. `with_item_ids` /
        `with_score_details`: the answer also carries the ids / the semantic and upstream scores.

        With `fail_open` (the default) it never raises: on any error or timeout it returns the
        request's own order (first occurrences, cut to top_k) with variant "error" and the gRPC
        status name as `reason`; `fail_open=False` raises grpc.RpcError instead."""
        ids = np.ascontiguousarray(item_ids, dtype=np.int64)
        upstream = np.ascontiguousarray(scores, dtype=np.float32)
        try:
            request_options = pb.RerankOptions()
            if options is not None:
                request_options.CopyFrom(options)  # never change the caller's message
            request_options.packed_item_ids = with_item_ids or request_options.packed_item_ids
            request_options.packed_score_details = with_score_details or request_options.packed_score_details
            request = pb.RerankRequest(
                user_id=user_id, packed_candidates=packed_candidates(ids, upstream, texts),
                context_events=list(context_events), top_k=top_k, options=request_options,
                experiment=experiment, request_id=request_id,
            )
            return unpack_items(self._call(self._stub.Rerank, request, timeout_s))
        except Exception as exc:
            if not fail_open:
                raise
            if isinstance(exc, grpc.RpcError):
                reason, detail = _status(exc)
                return _packed_upstream(ids, upstream, top_k, reason, detail, error_field(exc))
            log.warning("packed rerank failed on the client side; serving upstream order", exc_info=True)
            return _packed_upstream(ids, upstream, top_k, "CLIENT_ERROR", str(exc))

    def record_events(self, events: Sequence[pb.Event], *, timeout_s: float | None = None) -> pb.RecordEventsResponse:
        """RecordEvents; safe to retry because the server de-duplicates by event_id (set one)."""
        return self._call(self._stub.RecordEvents, pb.RecordEventsRequest(events=list(events)), timeout_s)

    def upsert_items(
        self, items: Iterable[tuple[str, str]], *, timeout_s: float | None = None
    ) -> pb.UpsertItemsResponse:
        """UpsertItems from (item_id, text) pairs (idempotent: same text is not re-encoded)."""
        request = pb.UpsertItemsRequest(items=[pb.Item(item_id=i, text=t) for i, t in items])
        return self._call(self._stub.UpsertItems, request, timeout_s)

    def user_profile(self, user_id: str, *, timeout_s: float | None = None) -> pb.GetUserProfileResponse:
        return self._call(self._stub.GetUserProfile, pb.GetUserProfileRequest(user_id=user_id), timeout_s)


def _item_id(value: CandidateLike) -> str:
    return value.item_id if isinstance(value, pb.Candidate) else str(value[0])


def _status(exc: grpc.RpcError) -> tuple[str, str]:
    """(status code name, server message) of a failed call."""
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    return (code.name if code is not None else "RPC_ERROR"), detail or ""


def _packed_upstream(
    ids: np.ndarray, scores: np.ndarray, top_k: int, reason: str, detail: str = "", field_name: str = ""
) -> PackedRanking:
    """The request's own order as a PackedRanking (the client-side fail-open path)."""
    if ids.ndim != 1 or scores.shape != ids.shape:
        ids, scores = ids.reshape(-1)[:0], scores.reshape(-1)[:0]  # malformed: serve nothing
    positions = np.sort(np.unique(ids, return_index=True)[1]).astype(np.int32)
    positions = positions[:top_k] if top_k else positions
    return PackedRanking(
        positions, scores[positions], ids[positions], None, scores[positions], variant="error", reason=reason,
        detail=detail, field=field_name,
    )


def _upstream(
    given: Sequence[CandidateLike], top_k: int, reason: str, detail: str, started: float, attempts: int,
    field_name: str = "",
) -> RerankOutcome:
    """The caller's own order as an outcome (the fail-open path)."""
    try:
        ids = upstream_order([pb.Candidate(item_id=_item_id(c)) for c in given], top_k)
    except Exception:  # candidates so malformed that no id can be read: serve nothing rather than crash
        ids = []
    log.debug("rerank failed open: %s (%s)", reason, detail)
    return RerankOutcome(
        item_ids=ids,
        reranked=False,
        variant="error",
        reason=reason,
        attempts=attempts,
        latency_ms=1000.0 * (time.monotonic() - started),
        detail=detail,
        field=field_name,
    )
