"""RerankPipeline: runs the stages (stages.py) over one RerankContext, with the fail-open mapping:
anything that goes wrong after the gates answers with the upstream order and the reason."""

from __future__ import annotations

import time

from reranker.cancellation import CancelToken
from reranker.errors import EncoderFailed, EncodeTimeout, Overloaded, RequestCancelled
from reranker.pipeline.context import Components, RerankContext, Resume
from reranker.pipeline.stages import GATES, STAGES, log, upstream
from reranker.types import FallbackReason, RerankQuery, RerankResult, Variant


class RerankPipeline:
    """The Rerank path over the parts `root` composed (read per request: they change on reloads)."""

    __slots__ = ("_root",)

    def __init__(self, root: Components) -> None:
        self._root = root

    def run(
        self, query: RerankQuery, time_remaining: float | None = None, cancel: CancelToken | None = None,
        resume: Resume | None = None,
    ) -> RerankResult:
        """Personalized order, or the upstream order (with the reason) when anything goes wrong.

        `time_remaining` is the caller's remaining deadline in seconds (None = no deadline).
        `cancel` fires when the caller goes away: pending encoder work is dropped and
        RequestCancelled is raised (there is nobody left to answer). `resume` is what a
        cache-only attempt (try_cached) left: its lookups are not made again."""
        root = self._root
        ctx = RerankContext(query, root.settings, time.perf_counter(), time_remaining, cancel, False, resume)
        result: RerankResult = self._run(ctx)  # type: ignore[assignment]  # a blocking run never stops at a Resume
        training_log = root.training_log
        if training_log is not None:
            training_log.served(query, result)  # a deque append; the writer thread does the rest
        return result

    def try_cached(self, query: RerankQuery, time_remaining: float | None = None) -> RerankResult | Resume:
        """The answer where it needs no blocking work (every vector cached or in the catalog), else a
        Resume for `run` (nothing written yet). Profile reads and writes still happen: use it only
        where profiles live in process."""
        root = self._root
        ctx = RerankContext(query, root.settings, time.perf_counter(), time_remaining, None, True, None)
        result = self._run(ctx)
        training_log = root.training_log
        if training_log is not None and result.__class__ is RerankResult:
            training_log.served(query, result)  # type: ignore[arg-type]
        return result

    def _run(self, ctx: RerankContext) -> RerankResult | Resume:
        root = self._root
        for stage in GATES:
            out = stage(root, ctx)
            if out is not None:
                return out
        try:
            for stage in STAGES:
                out = stage(root, ctx)
                if out is not None:
                    return out
        except RequestCancelled:
            raise
        except EncodeTimeout as exc:
            return upstream(root, ctx, Variant.FALLBACK, FallbackReason.DEADLINE, str(exc))
        except Overloaded as exc:
            if ctx.settings.limits.overload_policy == "reject":
                raise  # RESOURCE_EXHAUSTED: the caller backs off or serves its own order
            return upstream(root, ctx, Variant.FALLBACK, FallbackReason.OVERLOADED, str(exc))
        except EncoderFailed as exc:
            return upstream(root, ctx, Variant.FALLBACK, FallbackReason.ENCODER_ERROR, str(exc))
        except Exception:
            log.exception("rerank failed; serving upstream order")
            return upstream(root, ctx, Variant.FALLBACK, FallbackReason.INTERNAL, "internal error")
        raise AssertionError("the last stage answers")
