"""Generated traffic with a known truth: what the learner's decisions are tested and benchmarked on.

`Traffic` is a fake fleet of sidecars. `serve(n)` writes n served lists, each followed by its
user's next event, into training-log files in the sidecars' format (one subdirectory per pod,
rotating files), exactly as sidecars running `experiment_arms` would: a user's arm is the server's
(experiments.bucket_of, arms.build_table) and each arm serves what its head file holds at that
moment, as hot reload would (re-read at every `serve` call).

The truth: a head's quality q (by version; zero-shot: `quality[None]`) is the probability that the
user's next item is among the first k returned, at a rank uniform over 0..k-1; otherwise it is a
candidate below k. So online NDCG@k has mean q * mean_r 1 / log2(2 + r) exactly, and a head with
0.9 q is exactly 10% worse. `toy_head(seed)` makes small valid heads with distinct versions.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from reranker.config import Settings
from reranker.learning import publishing
from reranker.learning.traininglog import EVENT_COLUMNS, EVENTS_PREFIX, SERVED_COLUMNS, SERVED_PREFIX, RotatingTsv
from reranker.ranking import arms as arms_module
from reranker.ranking import head as ranking_head
from reranker.ranking.experiments import bucket_of

ENCODER_VERSION = "simulated"


def toy_head(seed: int, dim: int = 8, items: int = 0, encoder_version: str = ENCODER_VERSION) -> ranking_head.RankingHead:
    """A small valid head (its version differs by seed); `items` popularity entries make the file bigger;
    a server loads it when `dim` and `encoder_version` are its encoder's."""
    rng = np.random.default_rng(seed)
    f = len(ranking_head.FEATURES)
    popularity = {f"item{j}": float(rng.random()) for j in range(items)} or {"item0": 1.0}
    return ranking_head.RankingHead(
        weights=rng.normal(size=f), mean=np.zeros(f), std=np.ones(f),
        adapter_down=np.zeros((dim, 2), dtype=np.float32), adapter_up=np.zeros((2, dim), dtype=np.float32),
        prior=np.zeros(dim, dtype=np.float32), popularity=popularity, encoder_version=encoder_version,
    )


class Traffic:
    def __init__(
        self,
        settings: Settings,
        log_root: Path,
        quality: Mapping[str | None, float],
        *,
        seed: int = 0,
        pods: int = 2,
        users: int = 5000,
        list_size: int = 10,
        start: float = 1.0e9,
        step: float = 0.01,
    ) -> None:
        self.settings = settings
        self.quality = dict(quality)
        self.k = settings.learning.online_metrics_k
        self.list_size = max(list_size, self.k + 1)
        self.rng = random.Random(seed)
        self.users = [f"user{j}" for j in range(users)]
        self.now, self.step = start, step
        self.heads = {name: publishing.HeadFile(Path(path)) for name, _, path in settings.ranking.parsed_experiment_arms()}
        self.served = 0
        common = dict(max_bytes=1 << 20, max_seconds=1e12)
        self.pods = [
            (RotatingTsv(log_root / f"pod-{p}", SERVED_PREFIX, SERVED_COLUMNS, **common),  # type: ignore[arg-type]
             RotatingTsv(log_root / f"pod-{p}", EVENTS_PREFIX, EVENT_COLUMNS, **common))  # type: ignore[arg-type]
            for p in range(pods)
        ]

    def _table(self) -> arms_module.ArmTable:
        heads = {name: f.head() for name, f in self.heads.items()}
        return arms_module.build_table(self.settings.ranking, ENCODER_VERSION, {n: h for n, h in heads.items() if h is not None})

    def serve(self, lists: int) -> None:
        """`lists` more lists and their events, flushed to the files at the end (a sidecar flushes every second)."""
        table = self._table()  # the heads as the sidecars have them now
        rng, k, size = self.rng, self.k, self.list_size
        for _ in range(lists):
            user = rng.choice(self.users)
            arm = table.for_bucket(bucket_of(self.settings.ranking.experiment_salt, user))
            version = arm.head.version if arm.head is not None else None
            items = [f"i{j}" for j in rng.sample(range(1000), size)]
            self.now += self.step
            self.served += 1
            list_id = f"l{self.served}"
            served, events = self.pods[int(user[4:]) % len(self.pods)]
            served.write("".join(
                f"{user}\t{item}\t{size - r}\t\t{self.now!r}\t{list_id}\t{r}\treranked\t{arm.model_version}\t{arm.name}\t{size}\n"
                for r, item in enumerate(items)
            ))
            q = self.quality.get(version, self.quality[None])
            target = items[rng.randrange(k)] if rng.random() < q else items[rng.randrange(k, size)]
            events.write(f"{user}\t{target}\t{self.now + self.step / 2!r}\tclick\n")
        for served, events in self.pods:
            served.flush()
            events.flush()

    def close(self) -> None:
        for served, events in self.pods:
            served.close()
            events.close()
