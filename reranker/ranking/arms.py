"""Experiment arms: which ranking head a treatment bucket gets, as one immutable table.

The treatment buckets [0, treatment_percent * 100) are split in the order of `experiment_arms`:
arm 1 takes the first `percent * 100` buckets, arm 2 the next, ...; what is left of treatment is
the arm "treatment" (head_path, or the fixed blend without one). Control and bypass are decided
before (experiments.decide) and do not change.

A table is never changed in place: a hot reload builds a new one and the service swaps the
reference, so one request sees one table from start to end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from reranker.ranking import head as ranking_head
from reranker.config import RankingSettings
from reranker.ranking.experiments import BUCKETS

log = logging.getLogger(__name__)

TREATMENT = "treatment"
CONTROL = "control"


@dataclass(frozen=True)
class Arm:
    name: str
    head: ranking_head.RankingHead | None
    model_version: str
    path: str = ""  # the head file this arm reads ("" = no head: the fixed blend)
    end: int = BUCKETS  # the arm serves buckets below `end` (and at or above the previous arm's end)
    borrowed: bool = False  # its file has not arrived yet: it serves the treatment head


@dataclass(frozen=True)
class ArmTable:
    default: Arm  # "treatment": head_path
    arms: tuple[Arm, ...] = ()

    def for_bucket(self, bucket: int) -> Arm:
        for arm in self.arms:
            if bucket < arm.end:
                return arm
        return self.default

    def paths(self) -> dict[str, str]:
        """{arm name: head path} of every arm that reads a file."""
        return {a.name: a.path for a in (self.default, *self.arms) if a.path}

    def heads(self) -> dict[str, ranking_head.RankingHead | None]:
        """{arm name: the head loaded from its own file} (arms still borrowing the treatment head left out)."""
        return {a.name: a.head for a in (self.default, *self.arms) if not a.borrowed}


def model_version(encoder_version: str, head: ranking_head.RankingHead | None) -> str:
    return encoder_version if head is None else f"{encoder_version}+{head.version}"


def load_head(path: str, encoder_version: str, dim: int) -> ranking_head.RankingHead:
    """Load and validate one head file (HeadError with the reason when it is unusable)."""
    head = ranking_head.load(path)
    ranking_head.check_encoder(head, encoder_version, dim)
    return head


def build_table(
    settings: RankingSettings, encoder_version: str, heads: Mapping[str, ranking_head.RankingHead | None]
) -> ArmTable:
    """The table for `settings`, with the given head per arm name (a missing name: no head)."""
    default_head = heads.get(TREATMENT)
    default = Arm(TREATMENT, default_head, model_version(encoder_version, default_head), settings.head_path)
    arms, start = [], 0.0
    for name, percent, path in settings.parsed_experiment_arms():
        start += percent * (BUCKETS / 100.0)
        head = heads.get(name)
        if head is None:  # not there yet: serves like the rest of treatment, under its own name
            arms.append(Arm(name, default_head, default.model_version, path, int(round(start)), borrowed=True))
        else:
            arms.append(Arm(name, head, model_version(encoder_version, head), path, int(round(start))))
    return ArmTable(default, tuple(arms))


def initial_table(settings: RankingSettings, encoder_version: str, dim: int) -> ArmTable:
    """At start: head_path must load (else the server stays NOT_SERVING, as before arms existed);
    an arm's file may not exist yet (it is picked up by the reload watcher when it arrives), but an
    arm file that exists and is unusable fails the start like head_path."""
    heads: dict[str, ranking_head.RankingHead | None] = {}
    if settings.head_path:
        heads[TREATMENT] = load_head(settings.head_path, encoder_version, dim)
        log.info("ranking head %s loaded from %s", heads[TREATMENT].version, settings.head_path)  # type: ignore[union-attr]
    for name, _, path in settings.parsed_experiment_arms():
        if not os.path.exists(path):
            log.warning("experiment arm %s: %s does not exist yet; the arm serves like treatment until it does", name, path)
            continue
        heads[name] = load_head(path, encoder_version, dim)
        log.info("experiment arm %s: ranking head %s loaded from %s", name, heads[name].version, path)  # type: ignore[union-attr]
    return build_table(settings, encoder_version, heads)


def rebuild_table(settings: RankingSettings, encoder_version: str, dim: int, current: ArmTable) -> ArmTable:
    """The table for new `experiment_arms` while serving: an arm with the same name and file keeps
    its loaded head, a new arm's file is loaded now (HeadError when it exists and is unusable, so
    the caller keeps the table in force), a file not there yet borrows the treatment head."""
    heads: dict[str, ranking_head.RankingHead | None] = {TREATMENT: current.default.head}
    serving = {a.name: a for a in current.arms if not a.borrowed}
    for name, _, path in settings.parsed_experiment_arms():
        old = serving.get(name)
        if old is not None and old.path == path:
            heads[name] = old.head
        elif os.path.exists(path):
            heads[name] = load_head(path, encoder_version, dim)
    return build_table(settings, encoder_version, heads)
