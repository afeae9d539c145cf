"""The Rerank stages, in order. Each is one function `stage(root, ctx)`: it reads what earlier stages
left in the RerankContext, fills its own fields, and returns None to go on, a RerankResult to answer
now (a bypass, a fallback, the final answer) or, on a cache-only attempt, a Resume."""

from __future__ import annotations

import logging
import time

import numpy as np

from reranker.config import UserModelSettings
from reranker.history import CandidateHistory
from reranker.pipeline.events import fold, stamped
from reranker.pipeline.context import Components, RerankContext, Resume
from reranker.pipeline.explain import explain
from reranker.ranking import arms, head as ranking_head, scoring
from reranker.ranking.experiments import decide
from reranker.types import CandidateColumns, FallbackReason, RankedItems, RerankResult, Timing, Variant, take_ids
from reranker.users import usermodel
from reranker.users.profiles import (
    UserState,
    candidate_history,
    derived,
    on_liked_rows,
    positive_history,
    positive_history_ids,
)
from reranker.users.profiles import user_vector as user_vector_of

log = logging.getLogger("reranker.service")

Outcome = RerankResult | Resume | None


def upstream(
    root: Components, ctx: RerankContext, variant: Variant, reason: FallbackReason = FallbackReason.NONE,
    detail: str = "",
) -> RerankResult:
    """The upstream order (deduplicated, cut to top_k): a bypass, a control bucket or a fallback."""
    candidates, keep, query = ctx.candidates, ctx.keep, ctx.query
    limit = query.top_k or len(candidates)
    scores = candidates.scores[:limit]
    items = RankedItems.unchecked(candidates.item_ids[:limit], scores, np.zeros_like(scores), scores, keep[:limit])
    if variant is Variant.FALLBACK:
        log.warning("fail-open for request %r: %s (%s)", query.request_id, reason.name, detail)
    arm = ctx.arm
    return RerankResult(
        items=items,
        variant=variant,
        model_version=arm.model_version if arm is not None else root.model_version,
        request_id=query.request_id,
        fallback_reason=reason,
        fallback_detail=detail,
        timing=Timing(total_ms=1000.0 * (time.perf_counter() - ctx.started)),
        bucket=ctx.bucket,
        arm=ctx.arm_name,
    )


def dedupe(root: Components, ctx: RerankContext) -> Outcome:
    """Candidates as columns, first occurrences kept (`keep`: their original positions)."""
    candidates = CandidateColumns.of(ctx.query.candidates)
    keep = np.arange(len(candidates))
    if scoring.has_duplicates(candidates.item_ids):
        keep = np.asarray(scoring.first_occurrences(candidates.item_ids), dtype=np.int64)
        candidates = candidates.take(keep)
    ctx.candidates, ctx.keep = candidates, keep
    return None


def choose_arm(root: Components, ctx: RerankContext) -> Outcome:
    """Experiment bucket and arm; a bypass, kill switch or control bucket answers upstream."""
    s, query = ctx.settings, ctx.query
    skip, bucket = decide(
        user_id=query.user_id,
        experiment=query.experiment,
        bypass=query.options.bypass,
        kill_switch=s.ranking.kill_switch,
        treatment_percent=s.ranking.treatment_percent,
        default_salt=s.ranking.experiment_salt,
    )
    table = root.arms  # read once: a hot reload swaps the whole table
    arm = None if skip is not None or table is None else table.for_bucket(bucket)
    ctx.bucket, ctx.arm = bucket, arm
    ctx.arm_name = "" if skip is Variant.BYPASSED else arms.CONTROL if skip is not None else (
        arm.name if arm is not None else arms.TREATMENT
    )
    ctx.head = root.head if arm is None else arm.head
    return None if skip is None else upstream(root, ctx, skip)


def admit(root: Components, ctx: RerankContext) -> Outcome:
    """Too little time left, or not loaded yet: the upstream order (the texts still warm the cache)."""
    remaining = ctx.time_remaining
    if remaining is not None and remaining * 1000.0 < ctx.settings.limits.min_budget_ms:
        if root.vectors is not None:
            root.vectors.schedule_missing(ctx.candidates.item_ids, ctx.candidates.texts)
        return upstream(root, ctx, Variant.FALLBACK, FallbackReason.DEADLINE, f"{remaining * 1000:.1f} ms left")
    if not root.ready:
        return upstream(root, ctx, Variant.FALLBACK, FallbackReason.NOT_READY, root.load_error or "model loading")
    return None


def candidate_vectors(root: Components, ctx: RerankContext) -> Outcome:
    """Candidates' vectors: item cache, catalog, then the encoder within the encode budget."""
    s, candidates, source, resume = ctx.settings, ctx.candidates, root.vectors, ctx.resume
    assert source is not None
    budget = s.limits.encode_timeout_ms / 1000.0
    if ctx.time_remaining is not None:
        budget = min(budget, ctx.time_remaining - s.limits.min_budget_ms / 1000.0)
    ctx.encode_budget = budget
    ctx.encode_started = time.perf_counter()
    # The lookup writes every key (0 where not cached); a resumed request reuses its lookup: zeros.
    ctx.keys = np.empty(len(candidates), dtype=np.uint64) if resume is None else np.zeros(len(candidates), dtype=np.uint64)
    vectors, has_vector, hits, encoded, blocked = source.resolve(
        candidates.item_ids, candidates.texts, budget, ctx.cancel, lookup=None if resume is None else resume.lookup,
        keys_out=ctx.keys, cache_only=ctx.cache_only,
    )
    if blocked:
        return Resume((vectors, has_vector))
    ctx.vectors, ctx.has_vector, ctx.hits, ctx.encoded = vectors, has_vector, hits, encoded
    return None


def context_events(root: Components, ctx: RerankContext) -> Outcome:
    """The request's context events into the user's profile (read-your-writes for this Rerank)."""
    given = ctx.query.context_events
    if given:
        source, resume = root.vectors, ctx.resume
        assert source is not None
        now = root.now()
        events = stamped(root, given, now)
        vectors, has_vector, _, _, blocked = source.resolve(
            [e.item_id for e in events], [e.text for e in events], ctx.encode_budget, ctx.cancel,
            lookup=None if resume is None else resume.event_lookup, cache_only=ctx.cache_only,
        )
        if blocked:  # nothing encoded yet: (ctx.vectors, ctx.has_vector) is the candidates' lookup
            return Resume((ctx.vectors, ctx.has_vector), (vectors, has_vector))
        fold(root, events, vectors, has_vector, now)
    ctx.encode_ms = 1000.0 * (time.perf_counter() - ctx.encode_started)
    return None


def user_state(root: Components, ctx: RerankContext) -> Outcome:
    """The user's profile, user vector and what the user already consumed among the candidates."""
    assert root.profiles is not None
    s, candidates = ctx.settings, ctx.candidates
    ctx.score_started = time.perf_counter()
    state = ctx.state = root.profiles.get(ctx.query.user_id, recent=False)
    if state is None:
        ctx.user_vector = None
        ctx.seen = CandidateHistory.none(len(candidates))
        return None
    user_vector = ctx.user_vector = derived(state, "user_vector", lambda: _user_vector(state, s.users))
    ctx.seen = candidate_history(state, s.users, candidates.item_ids, ctx.vectors, ctx.has_vector, user_vector, ctx.keys)
    return None


def score(root: Components, ctx: RerankContext) -> Outcome:
    """The trained head's ranking, or the fixed blend where the request asks for a blend weight (or
    there is no head, or the user is cold)."""
    opts, s = ctx.query.options, ctx.settings
    diversity = s.ranking.diversity if opts.diversity is None else opts.diversity
    head = ctx.head
    ctx.use_head = (
        head is not None and ctx.user_vector is not None and ctx.state is not None and opts.blend_weight is None
    )
    if ctx.use_head:
        assert head is not None
        ctx.ranking = _head_ranking(head, ctx, diversity)
    else:
        ctx.ranking = _blend_ranking(ctx, diversity)
    return None


def _head_ranking(head: ranking_head.RankingHead, ctx: RerankContext, diversity: float) -> scoring.Ranking:
    state, user_vector = ctx.state, ctx.user_vector
    assert state is not None and user_vector is not None
    candidates = ctx.candidates
    return head.rank(
        candidates.item_ids, candidates.scores, ctx.vectors, ctx.has_vector, user_vector,
        derived(state, "positive_history", lambda: positive_history(state)),
        derived(state, "positive_history_ids", lambda: positive_history_ids(state)),
        diversity=diversity, mmr_window=ctx.settings.ranking.mmr_window, seen=on_liked_rows(ctx.seen, state),
    )


def _blend_ranking(ctx: RerankContext, diversity: float) -> scoring.Ranking:
    s, state, user_vector, seen, vectors = ctx.settings, ctx.state, ctx.user_vector, ctx.seen, ctx.vectors
    semantic = None  # attention pooling feeds only the fixed blend (the head has its own features)
    if user_vector is not None and state is not None:
        # One similarity array per request (the user row, then the history rows; how it is multiplied
        # is scoring.similarities' choice): the cosine, its leave-one-out corrections (the few consumed
        # candidates only) and the attention all read from it.
        attend = s.users.attention_weight > 0 and len(state.history) > 0
        rows = derived(state, "query_rows" if attend else "user_row",
                       lambda: scoring.query_rows(user_vector, state.history.vectors if attend else None))
        sims = scoring.similarities(vectors, rows)
        semantic = seen.corrected(sims[0], vectors)
        if attend:
            weights = derived(state, "decayed_weights", lambda: _decayed_weights(state, s.users.half_life_seconds))
            semantic = scoring.personal_semantic(
                vectors, ctx.has_vector, user_vector, state.history.vectors, weights,
                attention_weight=s.users.attention_weight, temperature=s.users.attention_temperature,
                own_rows=seen.own_rows, cosine=semantic, sims=sims[1:],
                pooling_weights=derived(state, "pooling_weights", lambda: scoring.attention_weights(weights)),
            )
        else:
            semantic = np.where(ctx.has_vector, semantic, 0.0)
    blend_weight = ctx.query.options.blend_weight
    return scoring.rank(
        ctx.candidates.scores,
        vectors,
        ctx.has_vector,
        user_vector,
        weight=s.ranking.blend_weight if blend_weight is None else blend_weight,
        diversity=diversity,
        mmr_window=s.ranking.mmr_window,
        semantic=semantic,
        upstream_form=s.ranking.blend_upstream,
    )


def consumed_policy(root: Components, ctx: RerankContext) -> Outcome:
    """Candidates the user already consumed: kept, demoted or dropped (policy "learned" without a head:
    demoted when the user's repeat rate is below consumed_repeat_rate, else kept)."""
    seen = ctx.seen
    count = seen.consumed_count
    order, dropped = ctx.ranking.order, 0
    if count:
        s = ctx.settings
        policy = ctx.query.options.consumed or s.ranking.consumed_policy
        if policy == "learned" and not ctx.use_head:
            assert ctx.state is not None
            rate = _repeat_rate(root, ctx.state, s.ranking.consumed_prior_events)
            policy = "demote" if rate < s.ranking.consumed_repeat_rate else "keep"
        order, dropped = scoring.apply_consumed_policy(order, seen.consumed, policy)
    ctx.order, ctx.consumed_count, ctx.dropped = order, count, dropped
    return None


def cut_and_explain(root: Components, ctx: RerankContext) -> Outcome:
    """The first top_k, with explanations when asked: the answer."""
    query, candidates, has_vector = ctx.query, ctx.candidates, ctx.has_vector
    order = ctx.order
    if query.top_k > 0:
        order = order[: query.top_k]
    ranking = ctx.ranking
    explanations = None
    if query.options.explain:
        explanations = explain(ctx.state, order, ranking.semantic, ctx.vectors, has_vector)
    items = RankedItems(
        take_ids(candidates.item_ids, order),
        ranking.final[order],
        ranking.semantic[order],
        candidates.scores[order],
        ctx.keep[order],
        explanations,
    )
    now = time.perf_counter()
    arm = ctx.arm
    return RerankResult(
        items=items,
        variant=Variant.RERANKED,
        model_version=root.model_version if arm is None else arm.model_version,
        request_id=query.request_id,
        cold_user=ctx.user_vector is None,
        timing=Timing(1000.0 * (now - ctx.started), ctx.encode_ms, 1000.0 * (now - ctx.score_started)),
        cache_hits=ctx.hits,
        encoded=ctx.encoded,
        without_vector=len(has_vector) - int(np.count_nonzero(has_vector)),
        bucket=ctx.bucket,
        arm=arms.TREATMENT if arm is None else arm.name,
        consumed_candidates=ctx.consumed_count,
        consumed_dropped=ctx.dropped,
    )


def _repeat_rate(root: Components, state: UserState, prior: float) -> float:
    """The user's repeat rate shrunk towards the population's: (r + n g) / (e + n)."""
    store = root.profiles
    assert store is not None
    population = store.repeats / store.consumed_events if store.consumed_events else 0.0
    consumed = state.consumed
    return (consumed.repeats + prior * population) / max(consumed.events + prior, 1e-12)


def _user_vector(state: UserState, settings: UserModelSettings) -> np.ndarray | None:
    vector = user_vector_of(state, settings)
    if vector is not None:
        vector.flags.writeable = False  # shared by every request until the user's next event
    return vector


def _decayed_weights(state: UserState, half_life_seconds: float) -> np.ndarray:
    weights = usermodel.decayed_weights(state.history, state.ref_time, usermodel.decay_rate(half_life_seconds))
    weights.flags.writeable = False
    return weights


# The stages in order: the first three answer before any vector work (their errors propagate), the
# rest run under the fail-open mapping of RerankPipeline.
GATES = (dedupe, choose_arm, admit)
STAGES = (candidate_vectors, context_events, user_state, score, consumed_policy, cut_and_explain)
