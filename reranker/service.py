"""RerankService: the composition root. It loads the encoder, caches, profile store, catalog, arms
and head reloader, snapshots, training log, runtime settings and metrics wiring, and hands Rerank to
the pipeline of named stages (reranker/pipeline/).

Plain Python in, plain Python out: protobuf stays in convert.py / servicer.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from reranker.ranking import arms as arms_module
from reranker.ranking import head as ranking_head
from reranker.ranking import scoring
from reranker.model.batching import MicroBatcher
from reranker.model.itemencoding import ItemEncoding
from reranker.cancellation import CancelToken
from reranker.model.catalog import CatalogError, CatalogSource
from reranker.config import Settings
from reranker.model.encoder import Encoder
from reranker.model.loader import load_encoder
from reranker.errors import NotReady
from reranker.model.items import ItemVectorCache
from reranker.metrics import Metrics
from reranker.learning.onlinemetrics import OnlineMetrics
from reranker.users.profiles import ProfileStore
from reranker.users.compact import CompactProfileStore
from reranker.users.stores import make_profile_store
from reranker.users.snapshot import PeriodicSnapshots, SnapshotInfo, load_snapshot, save_snapshot
from reranker.learning.live import LiveLearning
from reranker.learning.traininglog import TrainingLog
from reranker.pipeline import ItemVectors, RerankPipeline, Resume
from reranker.pipeline.events import profile_view
from reranker.pipeline.events import record as record_into_profiles
from reranker.runtimesettings import RuntimeSettingsFile
from reranker.types import Event, Item, RecordResult, RerankQuery, RerankResult, UpsertResult, UserProfileView

log = logging.getLogger(__name__)

WARMUP_TEXTS = ["warm up the encoder", "a second, slightly longer warm-up text for the encoder"]
# Writes (RecordEvents, UpsertItems) have no fail-open path; without a caller deadline they wait this long.
WRITE_TIMEOUT_S = 60.0


class RerankService:
    def __init__(self, settings: Settings, encoder: Encoder | None = None, *, clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        # Settings an incident or experiment changes come from runtime_settings_file, on top of these;
        # apply_settings swaps the whole (frozen) object: a request reads `self.settings` once.
        self.runtime_settings: RuntimeSettingsFile | None = None
        if settings.server.runtime_settings_file:
            self.runtime_settings = RuntimeSettingsFile(settings, self.metrics.registry, clock=clock)
            settings = self.runtime_settings.initial()
        self.settings = settings
        self._settings_listeners: list[Callable[[Settings], None]] = []
        self._clock = clock
        self._encoder = encoder
        self._batcher: MicroBatcher | None = None
        self._encoding: ItemEncoding | None = None
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
        self.learning = LiveLearning(self.metrics, clock, self._set_arms)  # arms, head reloads, training log
        self.event_weight_limit = settings.users.event_weight_limit()
        self.vectors: ItemVectors | None = None  # cache, catalog, encoder: where a request's vectors come from
        self._pipeline = RerankPipeline(self)

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
            encoder = self._encoder if self._encoder is not None else load_encoder(self.settings.model)
            started = time.perf_counter()
            if self.settings.model.warmup:
                encoder.encode(WARMUP_TEXTS)
            log.info("encoder %s warmed in %.0f ms", encoder.version, 1000 * (time.perf_counter() - started))
            scoring.single_threaded_blas()
            table = arms_module.initial_table(self.settings.ranking, encoder.version, encoder.dim)
        except Exception as exc:
            self.load_error = str(exc)
            raise
        s = self.settings
        self._encoder = encoder
        self.learning.set_table(table)
        try:
            vectors = self.vectors = ItemVectors.open(s.model, encoder.version, encoder.dim, self.metrics)
        except CatalogError as exc:
            self.load_error = str(exc)
            raise
        self.items, self.catalog = vectors.items, vectors.catalog
        self.profiles = make_profile_store(s.users, s.redis, encoder.dim, self._clock, lookup=vectors.stored,
                                           log_salt=s.observability.log_user_salt)
        if s.users.snapshot_path:
            load_snapshot(
                s.users.snapshot_path, items=self.items, profiles=self._local_profiles(), model_version=self.model_version,
                dim=encoder.dim, now=self._clock(), ttl_seconds=s.users.user_ttl_seconds,
            )
            if s.users.snapshot_interval_seconds > 0:
                self._snapshots = PeriodicSnapshots(self.save_snapshot, s.users.snapshot_interval_seconds)
                self._snapshots.start()
        self._batcher = vectors.start_encoding(encoder, s.model, self.metrics)
        self._encoding = vectors.encoding  # texts -> item cache, through the batcher
        self.metrics.watch_caches(self._cache_counters)
        self.learning.start(s, encoder.version, encoder.dim)
        self.training_log, self.online_metrics = self.learning.training_log, self.learning.online_metrics
        self.metrics.watch_profile_repairs(lambda: int(getattr(self.profiles, "repairs", 0)))
        self.metrics.watch_unreadable_profiles(lambda: dict(getattr(self.profiles, "unreadable_reasons", {})))
        self._ready.set()
        if self.runtime_settings is not None:
            self.runtime_settings.start(self.apply_settings)
        self.metrics.model_loaded(time.perf_counter() - load_started, self.model_version)

    def _cache_counters(self) -> dict[str, tuple[int, int, int]]:
        """{cache: (hits, misses, entries)} for the metrics endpoint."""
        out = self.vectors.counters() if self.vectors is not None else {}
        if self.profiles is not None:
            out["users"] = (self.profiles.hits, self.profiles.misses, len(self.profiles))
        return out

    def _set_arms(self, table: arms_module.ArmTable) -> None:
        """A new arm table (LiveLearning): what a request reads, swapped whole."""
        self.arms = table
        self.head = table.default.head
        self.model_version = table.default.model_version

    def watch_settings(self, listener: Callable[[Settings], None]) -> None:
        """`listener(settings)` now and after every runtime settings change (edges that keep a copy)."""
        self._settings_listeners.append(listener)
        listener(self.settings)

    def apply_settings(self, new: Settings) -> None:
        """Swap in new runtime settings (runtimesettings.py; called on its watcher thread). Changed
        experiment arms get their table first: an unusable new arm head raises and nothing changes."""
        encoder = self._encoder
        if new.ranking.experiment_arms != self.settings.ranking.experiment_arms and encoder is not None:
            self.learning.retarget(new, encoder.version, encoder.dim)
        self.settings = new
        if self.training_log is not None:
            self.training_log.sample = new.learning.training_log_sample
        for listener in self._settings_listeners:
            listener(new)

    def reload_heads(self) -> bool:
        """Reload every head file now (SIGHUP); True when a new head was swapped in."""
        return self.learning.reload_heads()

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
            ("head reloader", self.learning.reloader.stop if self.learning.reloader is not None else None),
            ("training log", self.training_log.close if self.training_log is not None else None),
            ("snapshot (the previous snapshot is kept)",
             self.save_snapshot if was_ready and self.settings.users.snapshot_path else None),
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

    def _local_profiles(self) -> CompactProfileStore | None:
        """The in-process store, when it is the store of record (with Redis, Redis persists profiles)."""
        return self.profiles if isinstance(self.profiles, CompactProfileStore) else None

    def save_snapshot(self) -> SnapshotInfo:
        """Write item vectors and in-process profiles to `snapshot_path` (atomic replace)."""
        assert self.items is not None and self.settings.users.snapshot_path
        return save_snapshot(
            self.settings.users.snapshot_path, items=self.items, profiles=self._local_profiles(),
            model_version=self.model_version, dim=self.items.dim,
        )

    # --- Rerank ----------------------------------------------------------------------------------
    @property
    def profiles_in_process(self) -> bool:
        """Profiles live in this process (no network round trip to read one)."""
        return self._local_profiles() is not None

    def rerank(
        self, query: RerankQuery, time_remaining: float | None = None, cancel: CancelToken | None = None,
        resume: Resume | None = None,
    ) -> RerankResult:
        """Personalized order, or the upstream order with the reason (RerankPipeline.run); the answer
        goes to the training log / online metrics when they are on."""
        return self._pipeline.run(query, time_remaining, cancel, resume)

    def try_cached(self, query: RerankQuery, time_remaining: float | None = None) -> RerankResult | Resume:
        """The answer where no blocking work is needed, else a Resume to hand to `rerank` on a thread
        where blocking is fine (RerankPipeline.try_cached). Only where `profiles_in_process`."""
        return self._pipeline.try_cached(query, time_remaining)

    # --- events, items, profiles ---------------------------------------------------------------
    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReady(self.load_error or "model is loading; retry shortly")

    def record_events(
        self, events: Sequence[Event], time_remaining: float | None = None, cancel: CancelToken | None = None
    ) -> RecordResult:
        """Fold events into user profiles; the very next Rerank sees them (read-your-writes)."""
        self._require_ready()
        return record_into_profiles(self, events, WRITE_TIMEOUT_S if time_remaining is None else time_remaining, cancel)

    def upsert_items(
        self, items: Sequence[Item], time_remaining: float | None = None, cancel: CancelToken | None = None
    ) -> UpsertResult:
        """Encode the items' texts into the item cache (those not cached with that text yet)."""
        self._require_ready()
        assert self.vectors is not None
        return self.vectors.upsert(items, WRITE_TIMEOUT_S if time_remaining is None else time_remaining, cancel)

    def user_profile(self, user_id: str, include_vector: bool = False) -> UserProfileView:
        """Profile summary; `vector` is the user vector Rerank uses (long-term and session mixed)."""
        self._require_ready()
        return profile_view(self, user_id, include_vector)
