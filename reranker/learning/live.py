"""Learning from live traffic, wired for one service: the arm table requests read (its head files
hot-reloaded, its arms changed by runtime settings), and the training log with the online metrics
that served answers and events feed."""

from __future__ import annotations

from collections.abc import Callable

from reranker.config import RankingSettings, Settings
from reranker.learning.onlinemetrics import OnlineMetrics
from reranker.learning.traininglog import TrainingLog
from reranker.metrics import Metrics
from reranker.ranking import arms
from reranker.ranking.hotreload import HeadReloader


class LiveLearning:
    """`on_table(table)` hears of every new arm table (one reference: a request in flight keeps the
    table it read)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float], on_table: Callable[[arms.ArmTable], None]) -> None:
        self._metrics = metrics
        self._clock = clock
        self._on_table = on_table
        self.table: arms.ArmTable | None = None
        self.reloader: HeadReloader | None = None
        self.training_log: TrainingLog | None = None
        self.online_metrics: OnlineMetrics | None = None

    def set_table(self, table: arms.ArmTable) -> None:
        self.table = table
        self._on_table(table)

    def swap_table(self, table: arms.ArmTable) -> None:
        """A new table, and the model_info gauge naming every model version it serves."""
        self.set_table(table)
        self._metrics.name_models({table.default.model_version, *(a.model_version for a in table.arms)})

    def start(self, settings: Settings, model_version: str, dim: int) -> None:
        """The head reloader (where arms name head files), online metrics and the training log, as
        the settings ask."""
        registry = self._metrics.registry
        assert self.table is not None
        if self.table.paths():
            self._start_reloader(settings.ranking, model_version, dim)
        learning = settings.learning
        if learning.online_metrics_window_seconds > 0:
            self.online_metrics = OnlineMetrics(learning, registry, event_weights=settings.users.parsed_event_weights())
        if learning.training_log_dir or self.online_metrics is not None:
            sinks = [self.online_metrics] if self.online_metrics is not None else []
            self.training_log = TrainingLog(learning, registry, user_salt=settings.observability.log_user_salt,
                                            sinks=sinks, clock=self._clock)

    def _start_reloader(self, settings: RankingSettings, model_version: str, dim: int) -> None:
        self.reloader = HeadReloader(
            settings, model_version, dim, lambda: self.table, self.swap_table,  # type: ignore[arg-type,return-value]
            self._metrics.registry,
        )
        self.reloader.start()

    def retarget(self, new: Settings, model_version: str, dim: int) -> None:
        """Changed experiment arms: their table first (an unusable new arm head raises and nothing
        changes), through the reloader where one runs."""
        if self.table is None:
            return
        if self.reloader is not None:
            self.reloader.retarget(new.ranking)
            return
        self.swap_table(arms.rebuild_table(new.ranking, model_version, dim, self.table))
        if self.table.paths():
            self._start_reloader(new.ranking, model_version, dim)

    def reload_heads(self) -> bool:
        """Reload every head file now (SIGHUP); True when a new head was swapped in."""
        return self.reloader.check(force=True) if self.reloader is not None else False
