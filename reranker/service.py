"""RerankService: orchestration of bypass, deadline budget, vectors, user model, scoring, fail-open.

Plain Python in, plain Python out: protobuf stays in convert.py / servicer.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reranker.ranking import arms as arms_module
from reranker.ranking import head as ranking_head
from reranker.ranking import scoring
from reranker.users import usermodel
from reranker.model.batching import MicroBatcher
from reranker.model.itemencoding import ItemEncoding
from reranker.cancellation import CancelToken
from reranker.model.catalog import CatalogError, CatalogSource
from reranker.history import CandidateHistory
from reranker.config import Settings
from reranker.model.encoder import Encoder
from reranker.model.loader import load_encoder
from reranker.errors import EncoderFailed, EncodeTimeout, NotReady, Overloaded, RequestCancelled
from reranker.users.eventpolicy import check_event_time, check_event_weight
from reranker.ranking.experiments import decide
from reranker.ranking.hotreload import HeadReloader
from reranker.model.items import ItemVectorCache
from reranker.metrics import Metrics
from reranker.learning.onlinemetrics import OnlineMetrics
from reranker.users.profiles import InProcessProfileStore, ProfileStore, UserState, derived
from reranker.users.compact import CompactProfileStore
from reranker.users.stores import make_profile_store
from reranker.users.profiles import candidate_history, on_liked_rows, positive_history, positive_history_ids
from reranker.users.profiles import user_vector as user_vector_of
from reranker.users.snapshot import PeriodicSnapshots, SnapshotInfo, load_snapshot, save_snapshot
from reranker.learning.traininglog import TrainingLog
from reranker.runtimesettings import RuntimeSettingsFile
from reranker.types import (
    CandidateColumns,
    Event,
    Explanation,
    FallbackReason,
    Item,
    RankedItems,
    RecordResult,
    RerankQuery,
    RerankResult,
    Timing,
    UpsertResult,
    UserProfileView,
    Variant,
    take_ids,
)

log = logging.getLogger(__name__)

WARMUP_TEXTS = ["warm up the encoder", "a second, slightly longer warm-up text for the encoder"]
# Writes (RecordEvents, UpsertItems) have no fail-open path; without a caller deadline they wait this long.
WRITE_TIMEOUT_S = 60.0

# (vectors, hit mask) of one ItemVectorCache.lookup
Lookup = tuple[np.ndarray, np.ndarray]


class WouldBlock(Exception):
    """Raised by `rerank(..., may_block=False)` before anything blocking (encoding) would happen,
    and before anything was written. Carries the cache lookups already made (candidates, context
    events), so the blocking retry does not repeat them."""

    def __init__(self, lookup: Lookup | None = None, event_lookup: Lookup | None = None) -> None:
        super().__init__("this request needs blocking work")
        self.lookup = lookup
        self.event_lookup = event_lookup


class RerankService:
    def __init__(
        self,
        settings: Settings,
        encoder: Encoder | None = None,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        # Settings an incident or experiment changes come from runtime_settings_file, on top of these;
        # apply_settings swaps the whole (frozen) object: a request reads `self.settings` once.
        self.runtime_settings: RuntimeSettingsFile | None = None
        if settings.runtime_settings_file:
            self.runtime_settings = RuntimeSettingsFile(settings, self.metrics.registry, clock=clock)
            settings = self.runtime_settings.initial()
        self.settings = settings
        self._settings_listeners: list[Callable[[Settings], None]] = []
        self._clock = clock
        self._encoder = encoder
        self._batcher: MicroBatcher | None = None
        self._encoding: ItemEncoding | None = None  # texts -> item cache, through the batcher
        self._ready = threading.Event()
        self.load_error: str = ""
        self.items: ItemVectorCache | None = None
        self.catalog: CatalogSource | None = None  # shared, memory-mapped item vectors (catalog.py)
        self.profiles: ProfileStore | None = None
        self.model_version = ""
        self._snapshots: PeriodicSnapshots | None = None
        self.head: ranking_head.RankingHead | None = None
        # Head per experiment arm; replaced whole by a hot reload (a request reads it once).
        self.arms: arms_module.ArmTable | None = None
        self.training_log: TrainingLog | None = None
        self.online_metrics: OnlineMetrics | None = None
        self._reloader: HeadReloader | None = None
        self._weight_limit = settings.event_weight_limit()

    # --- lifecycle -------------------------------------------------------------------------------
    def now(self) -> float:
        """Server time (the clock event times are checked against and stamped with)."""
        return self._clock()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self) -> None:
        """Load (if needed) and warm the encoder, build caches, then mark ready. Blocking."""
        load_started = time.perf_counter()
        try:
            encoder = self._encoder if self._encoder is not None else load_encoder(self.settings)
            started = time.perf_counter()
            if self.settings.warmup:
                encoder.encode(WARMUP_TEXTS)
            log.info("encoder %s warmed in %.0f ms", encoder.version, 1000 * (time.perf_counter() - started))
            scoring.single_threaded_blas()
            table = arms_module.initial_table(self.settings, encoder.version, encoder.dim)
        except Exception as exc:
            self.load_error = str(exc)
            raise
        s = self.settings
        self._encoder = encoder
        self._set_arms(table)
        self.items = ItemVectorCache(s.item_cache_size, encoder.dim)
        if s.catalog_path:
            try:
                self.catalog = CatalogSource(s.catalog_path, model_version=encoder.version, dim=encoder.dim,
                                             poll_seconds=s.catalog_poll_seconds, registry=self.metrics.registry)
            except CatalogError as exc:
                self.load_error = str(exc)
                raise
        self.profiles = make_profile_store(s, encoder.dim, self._clock, lookup=self._stored_vectors)
        if s.snapshot_path:
            load_snapshot(
                s.snapshot_path, items=self.items, profiles=self._local_profiles(), model_version=self.model_version,
                dim=encoder.dim, now=self._clock(), ttl_seconds=s.user_ttl_seconds,
            )
            if s.snapshot_interval_seconds > 0:
                self._snapshots = PeriodicSnapshots(self.save_snapshot, s.snapshot_interval_seconds)
                self._snapshots.start()
        self._batcher = MicroBatcher(
            encoder,
            max_batch=s.encode_batch_size,
            max_wait_s=s.encode_max_wait_ms / 1000.0,
            max_pending=s.encode_queue_size,
            observer=self.metrics.observe_batch,
        )
        encoding = ItemEncoding(self._batcher, self.items, late_fill=s.encode_late_fill, chunk=s.encode_queue_size // 2)
        self._encoding = encoding
        self.metrics.watch_late_encodes(lambda: (encoding.late_filled, encoding.late_dropped))
        self.metrics.watch_caches(self._cache_counters)
        self._start_learning(encoder)
        self.metrics.watch_profile_repairs(lambda: int(getattr(self.profiles, "repairs", 0)))
        self.metrics.watch_unreadable_profiles(lambda: dict(getattr(self.profiles, "unreadable_reasons", {})))
        self._ready.set()
        if self.runtime_settings is not None:
            self.runtime_settings.start(self.apply_settings)
        self.metrics.model_loaded(time.perf_counter() - load_started, self.model_version)

    def _cache_counters(self) -> dict[str, tuple[int, int, int]]:
        """{cache: (hits, misses, entries)} for the metrics endpoint."""
        out = {}
        if self.items is not None:
            out["items"] = (self.items.hits, self.items.misses, len(self.items))
        if self.profiles is not None:
            out["users"] = (self.profiles.hits, self.profiles.misses, len(self.profiles))
        if self.catalog is not None:  # looked up where the item cache missed
            out["catalog"] = (self.catalog.hits, self.catalog.misses, len(self.catalog.current))
        return out

    # --- learning from live traffic: arms, hot reload, training log, online metrics ---------------
    def _set_arms(self, table: arms_module.ArmTable) -> None:
        """Swap in a new arm table (one reference: a request in flight keeps the table it read)."""
        self.arms = table
        self.head = table.default.head
        self.model_version = table.default.model_version

    def _swap_arms(self, table: arms_module.ArmTable) -> None:
        self._set_arms(table)
        self.metrics.model_info.clear()
        for version in {table.default.model_version, *(a.model_version for a in table.arms)}:
            self.metrics.model_info.labels(model_version=version).set(1)

    def _start_learning(self, encoder: Encoder) -> None:
        s, registry = self.settings, self.metrics.registry
        assert self.arms is not None
        if self.arms.paths():
            self._start_reloader(s, encoder)
        if s.online_metrics_window_seconds > 0:
            self.online_metrics = OnlineMetrics(s, registry)
        if s.training_log_dir or self.online_metrics is not None:
            sinks = [self.online_metrics] if self.online_metrics is not None else []
            self.training_log = TrainingLog(s, registry, sinks=sinks, clock=self._clock)

    def _start_reloader(self, settings: Settings, encoder: Encoder) -> None:
        self._reloader = HeadReloader(
            settings, encoder.version, encoder.dim, lambda: self.arms, self._swap_arms,  # type: ignore[arg-type,return-value]
            self.metrics.registry,
        )
        self._reloader.start()

    def watch_settings(self, listener: Callable[[Settings], None]) -> None:
        """`listener(settings)` now and after every runtime settings change (edges that keep a copy)."""
        self._settings_listeners.append(listener)
        listener(self.settings)

    def apply_settings(self, new: Settings) -> None:
        """Swap in new runtime settings (runtimesettings.py; called on its watcher thread). Changed
        experiment arms get their table first: an unusable new arm head raises and nothing changes."""
        encoder = self._encoder
        if new.experiment_arms != self.settings.experiment_arms and self.arms is not None and encoder is not None:
            if self._reloader is not None:
                self._reloader.retarget(new)
            else:
                self._swap_arms(arms_module.rebuild_table(new, encoder.version, encoder.dim, self.arms))
                if self.arms.paths():
                    self._start_reloader(new, encoder)
        self.settings = new
        if self.training_log is not None:
            self.training_log.sample = new.training_log_sample
        for listener in self._settings_listeners:
            listener(new)

    def reload_heads(self) -> bool:
        """Reload every head file now (SIGHUP); True when a new head was swapped in."""
        return self._reloader.check(force=True) if self._reloader is not None else False

    def close(self) -> None:
        """Stop everything, each step whatever the others did: a failed step is logged and the next
        one runs (the training-log close, the snapshot and the Redis replay flush above all)."""
        was_ready = self.ready
        self._ready.clear()
        steps: list[tuple[str, Callable[[], object] | None]] = [
            ("metrics", self.metrics.not_ready),
            ("runtime settings watcher", self.runtime_settings.stop if self.runtime_settings is not None else None),
            ("encoder batcher", self._batcher.close if self._batcher is not None else None),
            ("encoder connections", getattr(self._encoder, "close", None)),
            ("periodic snapshots", self._snapshots.stop if self._snapshots is not None else None),
            ("head reloader", self._reloader.stop if self._reloader is not None else None),
            ("training log", self.training_log.close if self.training_log is not None else None),
            ("snapshot (the previous snapshot is kept)",
             self.save_snapshot if was_ready and self.settings.snapshot_path else None),
            ("profile store (with Redis: the replay of events kept during an outage)",
             self.profiles.close if self.profiles is not None else None),
            ("catalog", self.catalog.close if self.catalog is not None else None),
        ]
        for what, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:
                log.exception("shutdown: %s failed; going on with the next step", what)

    def _local_profiles(self) -> InProcessProfileStore | CompactProfileStore | None:
        """The in-process store, when it is the store of record (with Redis, Redis persists profiles)."""
        return self.profiles if isinstance(self.profiles, (InProcessProfileStore, CompactProfileStore)) else None

    def _stored_vectors(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of items a compact profile names (item cache, then catalog; never encoded): (vectors,
        found). Not counted as cache lookups: the cache metrics stay about candidates and events."""
        assert self.items is not None
        texts: list[str | None] = [None] * len(item_ids)
        vectors, hit = self.items.lookup(item_ids, texts, count=False)
        if self.catalog is not None and not hit.all():
            hit = self.catalog.current.fill(item_ids, texts, vectors, hit)
        return vectors, hit

    def save_snapshot(self) -> SnapshotInfo:
        """Write item vectors and in-process profiles to `snapshot_path` (atomic replace)."""
        assert self.items is not None and self.settings.snapshot_path
        return save_snapshot(
            self.settings.snapshot_path, items=self.items, profiles=self._local_profiles(),
            model_version=self.model_version, dim=self.items.dim,
        )

    # --- Rerank ----------------------------------------------------------------------------------
    @property
    def profiles_in_process(self) -> bool:
        """Profiles live in this process (no network round trip to read one)."""
        return self._local_profiles() is not None

    def rerank(
        self, query: RerankQuery, time_remaining: float | None = None, cancel: CancelToken | None = None, **blocking: Any
    ) -> RerankResult:
        """`_rerank` (see there; `blocking` = may_block, lookup, event_lookup), then the answer goes
        to the training log / online metrics when they are on."""
        result = self._rerank(query, time_remaining, cancel, **blocking)
        training_log = self.training_log
        if training_log is not None:
            training_log.served(query, result)  # a deque append; the writer thread does the rest
        return result

    def _rerank(
        self,
        query: RerankQuery,
        time_remaining: float | None = None,
        cancel: CancelToken | None = None,
        *,
        may_block: bool = True,
        lookup: Lookup | None = None,
        event_lookup: Lookup | None = None,
    ) -> RerankResult:
        """Personalized order, or the upstream order (with the reason) when anything goes wrong.

        `time_remaining` is the caller's remaining deadline in seconds (None = no deadline).
        `cancel` fires when the caller goes away: pending encoder work is dropped and
        RequestCancelled is raised (there is nobody left to answer).

        With `may_block=False` the call never waits: a request whose candidates or context events
        need encoding raises WouldBlock instead (nothing written yet); retry it with
        `lookup=exc.lookup, event_lookup=exc.event_lookup` where blocking is fine. Profile reads
        and writes still happen: use it only when `profiles_in_process`.
        """
        started = time.perf_counter()
        s = self.settings
        candidates = CandidateColumns.of(query.candidates)
        keep = np.arange(len(candidates))  # original position of each kept candidate
        if scoring.has_duplicates(candidates.item_ids):  # keep first occurrences
            keep = np.asarray(scoring.first_occurrences(candidates.item_ids), dtype=np.int64)
            candidates = candidates.take(keep)
        skip, bucket = decide(
            user_id=query.user_id,
            experiment=query.experiment,
            bypass=query.options.bypass,
            kill_switch=s.kill_switch,
            treatment_percent=s.treatment_percent,
            default_salt=s.experiment_salt,
        )
        table = self.arms  # read once: a hot reload swaps the whole table
        arm = None if skip is not None or table is None else table.for_bucket(bucket)
        arm_name = "" if skip is Variant.BYPASSED else arms_module.CONTROL if skip is not None else (
            arm.name if arm is not None else arms_module.TREATMENT
        )

        def upstream(variant: Variant, reason: FallbackReason = FallbackReason.NONE, detail: str = "") -> RerankResult:
            return self._upstream_result(
                query, candidates, keep, variant, reason, detail, bucket, started, arm_name,
                arm.model_version if arm is not None else self.model_version,
            )

        if skip is not None:
            return upstream(skip)
        if time_remaining is not None and time_remaining * 1000.0 < s.min_budget_ms:
            self._schedule_missing(candidates)
            return upstream(Variant.FALLBACK, FallbackReason.DEADLINE, f"{time_remaining * 1000:.1f} ms left")
        if not self.ready:
            return upstream(Variant.FALLBACK, FallbackReason.NOT_READY, self.load_error or "model loading")
        try:
            return self._personalize(
                query, candidates, keep, bucket, started, time_remaining, cancel,
                may_block=may_block, lookup=lookup, event_lookup=event_lookup, arm=arm, settings=s,
            )
        except (RequestCancelled, WouldBlock):
            raise
        except EncodeTimeout as exc:
            return upstream(Variant.FALLBACK, FallbackReason.DEADLINE, str(exc))
        except Overloaded as exc:
            if s.overload_policy == "reject":
                raise  # RESOURCE_EXHAUSTED: the caller backs off or serves its own order
            return upstream(Variant.FALLBACK, FallbackReason.OVERLOADED, str(exc))
        except EncoderFailed as exc:
            return upstream(Variant.FALLBACK, FallbackReason.ENCODER_ERROR, str(exc))
        except Exception:
            log.exception("rerank failed; serving upstream order")
            return upstream(Variant.FALLBACK, FallbackReason.INTERNAL, "internal error")

    def _personalize(
        self,
        query: RerankQuery,
        candidates: CandidateColumns,
        keep: np.ndarray,
        bucket: int,
        started: float,
        time_remaining: float | None,
        cancel: CancelToken | None = None,
        *,
        may_block: bool = True,
        lookup: Lookup | None = None,
        event_lookup: Lookup | None = None,
        arm: arms_module.Arm | None = None,
        settings: Settings | None = None,
    ) -> RerankResult:
        s = self.settings if settings is None else settings  # the settings _rerank read
        assert self.items is not None and self.profiles is not None
        head = self.head if arm is None else arm.head
        encode_budget = s.encode_timeout_ms / 1000.0
        if time_remaining is not None:
            encode_budget = min(encode_budget, time_remaining - s.min_budget_ms / 1000.0)
        encode_started = time.perf_counter()
        keys = np.zeros(len(candidates), dtype=np.uint64)  # the ids' consumed-item keys, from the item cache
        vectors, has_vector, hits, encoded = self._resolve_vectors(
            candidates.item_ids, candidates.texts, encode_budget, cancel, may_block=may_block, lookup=lookup,
            keys_out=keys,
        )
        if query.context_events:
            try:
                self._record(
                    query.context_events, encode_budget, cancel, may_block=may_block, lookup=event_lookup
                )
            except WouldBlock as wait:  # nothing encoded yet: (vectors, has_vector) is the lookup
                raise WouldBlock((vectors, has_vector), wait.lookup) from None
        encode_ms = 1000.0 * (time.perf_counter() - encode_started)

        score_started = time.perf_counter()
        state = self.profiles.get(query.user_id, recent=False)
        user_vector = None if state is None else derived(state, "user_vector", lambda: self._user_vector(state))
        opts = query.options
        diversity = s.diversity if opts.diversity is None else opts.diversity
        policy = opts.consumed or s.consumed_policy
        seen = (
            CandidateHistory.none(len(candidates)) if state is None
            else candidate_history(state, s, candidates.item_ids, vectors, has_vector, user_vector, keys)
        )
        # The trained head replaces the fixed blend, unless the request asks for a blend weight explicitly.
        use_head = head is not None and user_vector is not None and state is not None and opts.blend_weight is None
        if use_head:
            assert head is not None and state is not None and user_vector is not None
            ranking = head.rank(
                candidates.item_ids, candidates.scores, vectors, has_vector, user_vector,
                derived(state, "positive_history", lambda: positive_history(state)),
                derived(state, "positive_history_ids", lambda: positive_history_ids(state)),
                diversity=diversity, mmr_window=s.mmr_window, seen=on_liked_rows(seen, state),
            )
        else:
            semantic = None  # attention pooling feeds only the fixed blend (the head has its own features)
            if user_vector is not None and seen.excluded is not None:
                semantic = seen.cosine(vectors, user_vector)
            if user_vector is not None and s.attention_weight > 0 and state is not None and len(state.history):
                semantic = scoring.personal_semantic(
                    vectors, has_vector, user_vector, state.history.vectors,
                    derived(state, "decayed_weights", lambda: self._decayed_weights(state)),
                    attention_weight=s.attention_weight, temperature=s.attention_temperature,
                    own_rows=seen.own_rows, cosine=semantic,
                )
            ranking = scoring.rank(
                candidates.scores,
                vectors,
                has_vector,
                user_vector,
                weight=s.blend_weight if opts.blend_weight is None else opts.blend_weight,
                diversity=diversity,
                mmr_window=s.mmr_window,
                semantic=semantic,
                upstream_form=s.blend_upstream,
            )
        consumed = seen.consumed
        consumed_count = int(consumed.sum())
        order, dropped = ranking.order, 0
        if consumed_count:
            if policy == "learned" and not use_head:
                assert state is not None
                policy = "demote" if self._repeat_rate(state) < s.consumed_repeat_rate else "keep"
            order, dropped = scoring.apply_consumed_policy(order, consumed, policy)
        if query.top_k > 0:
            order = order[: query.top_k]
        ranking = scoring.Ranking(order=order, final=ranking.final, semantic=ranking.semantic)
        explanations = self._explain(state, ranking, vectors, has_vector) if opts.explain else None
        items = RankedItems(
            take_ids(candidates.item_ids, order),
            ranking.final[order],
            ranking.semantic[order],
            candidates.scores[order],
            keep[order],
            explanations,
        )
        score_ms = 1000.0 * (time.perf_counter() - score_started)
        return RerankResult(
            items=items,
            variant=Variant.RERANKED,
            model_version=self.model_version if arm is None else arm.model_version,
            request_id=query.request_id,
            cold_user=user_vector is None,
            timing=Timing(1000.0 * (time.perf_counter() - started), encode_ms, score_ms),
            cache_hits=hits,
            encoded=encoded,
            without_vector=int((~has_vector).sum()),
            bucket=bucket,
            arm=arms_module.TREATMENT if arm is None else arm.name,
            consumed_candidates=consumed_count,
            consumed_dropped=dropped,
        )

    def _repeat_rate(self, state: UserState) -> float:
        """The user's repeat rate shrunk towards the population's: (r + n g) / (e + n)."""
        assert self.profiles is not None
        store, prior = self.profiles, self.settings.consumed_prior_events
        population = store.repeats / store.consumed_events if store.consumed_events else 0.0
        consumed = state.consumed
        return (consumed.repeats + prior * population) / max(consumed.events + prior, 1e-12)

    def _user_vector(self, state: UserState) -> np.ndarray | None:
        vector = user_vector_of(state, self.settings)
        if vector is not None:
            vector.flags.writeable = False  # shared by every request until the user's next event
        return vector

    def _decayed_weights(self, state: UserState) -> np.ndarray:
        weights = usermodel.decayed_weights(state.history, state.ref_time, self._decay_rate)
        weights.flags.writeable = False
        return weights

    @property
    def _decay_rate(self) -> float:
        return usermodel.decay_rate(self.settings.half_life_seconds)

    def _explain(
        self, state: UserState | None, ranking: scoring.Ranking, vectors: np.ndarray, has_vector: np.ndarray
    ) -> list[Explanation]:
        history_ids: list[str] = []
        history = np.zeros((0, vectors.shape[1]), dtype=np.float32)
        if state is not None:
            positive = np.flatnonzero(state.history.weights > 0)
            history_ids = [state.history.item_ids[i] for i in positive.tolist()]
            history = state.history.vectors[positive]
        order = ranking.order
        out = []
        nearest_idx = nearest_sim = None
        if history_ids:
            nearest_idx, nearest_sim = scoring.nearest(history, vectors[order])
        for pos, i in enumerate(order.tolist()):
            if not has_vector[i]:
                out.append(Explanation(False, summary="no vector (no text, not cached): ranked by upstream score"))
                continue
            if nearest_idx is None or nearest_sim is None:
                out.append(Explanation(True, summary="cold user: ranked by upstream score"))
                continue
            hist_id, sim = history_ids[int(nearest_idx[pos])], float(nearest_sim[pos])
            summary = f"semantic {ranking.semantic[i]:.3f}; most like recent item {hist_id} ({sim:.3f})"
            out.append(Explanation(True, hist_id, sim, summary))
        return out

    def _upstream_result(
        self,
        query: RerankQuery,
        candidates: CandidateColumns,
        keep: np.ndarray,
        variant: Variant,
        reason: FallbackReason,
        detail: str,
        bucket: int,
        started: float,
        arm: str = "",
        model_version: str | None = None,
    ) -> RerankResult:
        limit = query.top_k or len(candidates)
        scores = candidates.scores[:limit]
        items = RankedItems(candidates.item_ids[:limit], scores, np.zeros_like(scores), scores, keep[:limit])
        if variant is Variant.FALLBACK:
            log.warning("fail-open for request %r: %s (%s)", query.request_id, reason.name, detail)
        return RerankResult(
            items=items,
            variant=variant,
            model_version=self.model_version if model_version is None else model_version,
            request_id=query.request_id,
            fallback_reason=reason,
            fallback_detail=detail,
            timing=Timing(total_ms=1000.0 * (time.perf_counter() - started)),
            bucket=bucket,
            arm=arm,
        )

    # --- vectors ---------------------------------------------------------------------------------
    def _resolve_vectors(
        self,
        item_ids: Sequence[str],
        texts: Sequence[str | None],
        timeout_s: float,
        cancel: CancelToken | None = None,
        *,
        may_block: bool = True,
        lookup: Lookup | None = None,
        keys_out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Cached or freshly encoded vectors; returns (vectors, has_vector, cache hits, encoded count).

        `lookup` is a lookup of these ids already made; may_block=False raises WouldBlock (with
        the lookup) where texts would have to be encoded. `keys_out` receives the cached ids'
        item keys (ItemVectorCache.lookup; left 0 when `lookup` was given)."""
        assert self.items is not None
        vectors, hit = lookup if lookup is not None else self.items.lookup(item_ids, texts, keys_out)
        if self.catalog is not None and not hit.all():
            hit = self.catalog.fill(item_ids, texts, vectors, hit)  # keys of those rows stay 0: hashed later
        has_vector = hit.copy()
        if hit.all():
            return vectors, has_vector, len(item_ids), 0
        misses = [i for i in np.flatnonzero(~hit).tolist() if texts[i] is not None]
        if misses and not may_block:
            raise WouldBlock((vectors, hit))
        # The same item may appear twice among misses (e.g. events): encode each text once.
        unique: dict[tuple[str, str], list[int]] = {}
        for i in misses:
            unique.setdefault((item_ids[i], texts[i]), []).append(i)  # type: ignore[arg-type]
        if unique:
            assert self._encoding is not None
            keys = list(unique)
            encoded = self._encoding.encode([k[0] for k in keys], [k[1] for k in keys], timeout_s, cancel)
            for row, key in enumerate(keys):
                for i in unique[key]:
                    vectors[i] = encoded[row]
                    has_vector[i] = True
        return vectors, has_vector, int(hit.sum()), len(unique)

    def _schedule_missing(self, candidates: CandidateColumns) -> None:
        """A fail-open answer still warms the cache: candidates' texts that are neither cached nor
        in the catalog are queued as late work (bounded, deduplicated with what is in flight)."""
        if self._encoding is None or self.items is None or all(t is None for t in candidates.texts):
            return
        vectors, hit = self.items.lookup(candidates.item_ids, candidates.texts, count=False)
        if self.catalog is not None and not hit.all():  # not counted as catalog lookups either
            hit = self.catalog.current.fill(candidates.item_ids, candidates.texts, vectors, hit)
        todo = [i for i in np.flatnonzero(~hit).tolist() if candidates.texts[i] is not None]
        if todo:
            ids, texts = candidates.item_ids, candidates.texts
            self._encoding.schedule([ids[i] for i in todo], [texts[i] for i in todo])  # type: ignore[misc]

    # --- events, items, profiles ---------------------------------------------------------------
    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.load_error or "model is loading; retry shortly")

    def _record(
        self,
        events: Sequence[Event],
        time_remaining: float | None,
        cancel: CancelToken | None = None,
        *,
        may_block: bool = True,
        lookup: Lookup | None = None,
    ) -> RecordResult:
        assert self.profiles is not None
        now = self._clock()
        stamped = self._stamped(events, now)
        vectors, has_vector, _, _ = self._resolve_vectors(
            [e.item_id for e in stamped],
            [e.text for e in stamped],
            WRITE_TIMEOUT_S if time_remaining is None else time_remaining,
            cancel,
            may_block=may_block,
            lookup=lookup,
        )
        pairs = [(e, vectors[i] if has_vector[i] else None) for i, e in enumerate(stamped)]
        result = self.profiles.apply(pairs, now)
        if self.training_log is not None:
            self.training_log.events(stamped)
        return result

    def _stamped(self, events: Sequence[Event], now: float) -> list[Event]:
        """Events with their time stamped (none given) or clamped (after now) to `now`; refused
        (InvalidRequest) beyond the time / weight policy (eventpolicy.py; the servicer checked it
        already with the request's field names, this guards the Python API)."""
        s = self.settings
        out, clamped = [], 0
        for i, e in enumerate(events):
            if e.weight is not None:
                check_event_weight(e.weight, f"events[{i}].weight", self._weight_limit)
            if e.timestamp > now or e.timestamp != e.timestamp:
                check_event_time(e.timestamp, f"events[{i}].timestamp", now, s.max_event_skew_seconds)
                clamped += 1
            out.append(e if 0 < e.timestamp <= now else _with_timestamp(e, now))
        if clamped:
            self.metrics.event_times_clamped.inc(clamped)
        return out

    def record_events(
        self, events: Sequence[Event], time_remaining: float | None = None, cancel: CancelToken | None = None
    ) -> RecordResult:
        """Fold events into user profiles; the very next Rerank sees them (read-your-writes)."""
        self._require_ready()
        return self._record(events, time_remaining, cancel)

    def upsert_items(
        self, items: Sequence[Item], time_remaining: float | None = None, cancel: CancelToken | None = None
    ) -> UpsertResult:
        self._require_ready()
        assert self.items is not None
        latest = {it.item_id: it.text for it in items}  # last text wins for repeated ids
        ids, texts = list(latest), list(latest.values())
        _, hit = self.items.lookup(ids, texts)
        todo = [i for i in np.flatnonzero(~hit).tolist()]
        if todo:
            assert self._encoding is not None
            timeout = WRITE_TIMEOUT_S if time_remaining is None else time_remaining
            self._encoding.encode([ids[i] for i in todo], [texts[i] for i in todo], timeout, cancel)
        return UpsertResult(upserted=len(ids), encoded=len(todo))

    def user_profile(self, user_id: str, include_vector: bool = False) -> UserProfileView:
        """Profile summary; `vector` is the user vector Rerank uses (long-term and session mixed)."""
        self._require_ready()
        assert self.profiles is not None
        state = self.profiles.get(user_id)
        if state is None:
            return UserProfileView(user_id=user_id, found=False)
        vector: tuple[float, ...] = ()
        if include_vector:
            user_vector = user_vector_of(state, self.settings)
            vector = () if user_vector is None else tuple(float(x) for x in user_vector)
        return UserProfileView(
            user_id=user_id, found=True, event_count=state.event_count, recent_events=state.recent,
            vector=vector, updated_at=state.updated_at,
        )


def _with_timestamp(event: Event, now: float) -> Event:
    return Event(event.user_id, event.item_id, event.type, now, event.event_id, event.text, event.weight)
