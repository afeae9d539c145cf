"""`reranker learn`: train, canary, promote or roll back a ranking head from the sidecars' own traffic.

Arms (the sidecars' `experiment_arms`, read from the same settings): `learn_main_arm` serves the
promoted head (its file; no file = zero-shot), `learn_canary_arm` serves the candidate under test,
and what is left of treatment (no head_path) serves zero-shot: the floor every head is held to.
While no candidate is under test the canary arm mirrors main (same file, or none).

One look (`tick`), every `learn_interval_seconds`:
1. read what the logs gained (logsource.py) and judge every list (the online join);
2. floor: while main serves a head, compare it with the zero-shot arm since its first list; when
   it is worse (the always-valid interval is below 0), withdraw it: main serves zero-shot again;
3. online gate, while the canary serves a head that main does not: compare canary and main on the
   lists they served side by side since the canary's first list (confseq.py, NDCG@k and hits@k):
   - worse on either: roll back (the canary mirrors main again);
   - better on NDCG@k, not worse on hits@k, and both arms past `learn_min_lists`: promote
     (the candidate is renamed onto main's path; the canary keeps it, so it mirrors main);
   - past `learn_max_canary_lists` with neither: withdraw it (a tie: main is left alone);
4. otherwise, when `learn_retrain_lists` lists arrived after the last candidate's window: train a
   candidate on the newest `learn_window_lists` lists but the held-out newest
   `learn_holdout_percent` (and the events before them), with `reranker train --training-log`'s
   served-list path; score the held-out lists with the candidate, the current head and zero-shot
   (offlinegate.py); publish it to the canary arm only when it beats the current head and the
   paired 95% interval of the gain is above 0.

Every decision is logged, counted (`reranker_learner_decisions_total`) and appended to the history
(publishing.py) after its file operation. At start, files and history are reconciled: a decision
whose file operation happened but whose entry was lost is recorded as `recovered`; temporary files
of a killed learner are deleted (they were never watched by a sidecar).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from reranker.config import Settings
from reranker.evaluation import formats
from reranker.learner import offlinegate
from reranker.learning import confseq, publishing
from reranker.learning.logsource import LogSource, Outcome, join
from reranker.ranking import arms as arms_module
from reranker.ranking import head as ranking_head

log = logging.getLogger(__name__)

# Lists per arm before a look can decide anything (the interval relies on the CLT).
BURN_IN = 100
DECISIONS = ("canary", "rejected", "promote", "rollback", "withdrawn", "floor", "recovered")
Trainer = Callable[[Sequence[formats.Interaction], Sequence[formats.ServedList]], ranking_head.RankingHead]


def matches(model_version: str, head_version: str | None) -> bool:
    """Does a logged model_version (`<encoder>` or `<encoder>+<head>`) name this head (None = zero-shot)?"""
    if head_version is None:
        return "+" not in model_version
    return model_version.endswith("+" + head_version)


class LearnerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter("reranker_learner_decisions", "Learner decisions by kind.", ["decision"], registry=registry)
        for d in DECISIONS:
            self.decisions.labels(decision=d)
        self.looks = Counter("reranker_learner_looks", "Looks at the logs (ticks).", registry=registry)
        self.training_seconds = Counter("reranker_learner_training_seconds", "Time spent training and gating.", registry=registry)
        self.ndcg = Gauge("reranker_learner_online_ndcg", "Online NDCG@k at the last look, per role.", ["role"], registry=registry)
        self.lists = Gauge("reranker_learner_judged_lists", "Judged lists at the last look, per role.", ["role"], registry=registry)
        self.log_errors = Gauge("reranker_learner_unreadable_log_files", "Log files left out at the last look.", registry=registry)


class Learner:
    def __init__(
        self,
        settings: Settings,
        *,
        trainer: Trainer | None = None,
        candidate: ranking_head.RankingHead | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        arms = {name: Path(path) for name, _, path in settings.ranking.parsed_experiment_arms()}
        missing = [a for a in (settings.learning.learn_main_arm, settings.learning.learn_canary_arm) if a not in arms]
        if missing or settings.learning.learn_main_arm == settings.learning.learn_canary_arm:
            raise ValueError(f"learn: experiment_arms must name the main and canary arms ({', '.join(missing)} missing)")
        if settings.ranking.head_path:
            raise ValueError("learn: head_path must be empty: the rest of treatment is the zero-shot floor")
        if not settings.learning.learn_log_root:
            raise ValueError("learn: learn_log_root (the sidecars' training logs) is required")
        self.settings = settings
        self.k = settings.learning.online_metrics_k
        self.window = settings.learning.online_metrics_window_seconds or 3600.0
        weights = settings.users.parsed_event_weights()
        self.positive = {name for name, w in weights.items() if w > 0} | ({"click"} if "click" not in weights else set())
        self.main = publishing.HeadFile(arms[settings.learning.learn_main_arm])
        self.canary = publishing.HeadFile(arms[settings.learning.learn_canary_arm])
        self.source = LogSource(settings.learning.learn_log_root, self.k)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = LearnerMetrics(self.registry)
        self._trainer = trainer
        self._candidate = candidate  # given by the operator: canaried once, with no offline gate
        self._clock = clock
        for directory in {self.main.path.parent, self.canary.path.parent}:
            for path in publishing.remove_stale_tmp(directory):
                log.warning("learner: deleted %s, left by a learner that was killed while publishing", path)
        self.history = publishing.History(Path(settings.learning.learn_history_path))
        self.reconcile()

    # --- state -------------------------------------------------------------------------------------
    def versions(self) -> tuple[str | None, str | None]:
        return self.main.version(), self.canary.version()

    def _last(self, *decisions: str) -> dict[str, Any] | None:
        for entry in reversed(self.history.entries):
            if entry.get("decision") in decisions:
                return entry
        return None

    def reconcile(self) -> None:
        """Record what the files show but the history lacks (a learner killed between the two):
        every entry holds the state after it (`main_version`, and `canary`: the head under test)."""
        main_v, canary_v = self.versions()
        testing = canary_v if canary_v != main_v else None
        last = self.history.entries[-1] if self.history.entries else {}
        was_main, was_testing = last.get("main_version"), last.get("canary")
        if (main_v, testing) == (was_main, was_testing):
            return
        if was_testing is not None and main_v == was_testing:
            reason = f"canary {was_testing} was promoted but the decision was not recorded"
        elif was_testing is not None and testing is None:
            reason = f"canary {was_testing} was withdrawn but the decision was not recorded"
        elif testing is not None and testing != was_testing:
            reason = f"canary {testing} is published but its decision was not recorded; watching it"
        else:
            reason = (f"main serves {main_v or 'zero-shot'}, not {was_main or 'zero-shot'} as last recorded "
                      "(changed outside the learner, or a decision was not recorded)")
        self._record("recovered", reason, testing or was_testing or main_v, main_v, testing)

    def _record(
        self, decision: str, reason: str, version: str | None, main_version: str | None, canary: str | None, **extra: Any
    ) -> dict[str, Any]:
        """Append a decision: `version` is the head it is about, `main_version` and `canary` (the
        head under test, None when the canary mirrors main) the state after it."""
        now = self._clock()
        entry = {"time": round(now, 3), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "decision": decision,
                 "reason": reason, "version": version, "main_version": main_version, "canary": canary, **extra}
        self.history.append(entry)
        self.metrics.decisions.labels(decision=decision).inc()
        log.info("learner: %s %s: %s", decision, version or "zero-shot", reason)
        return entry

    # --- one look ----------------------------------------------------------------------------------
    def tick(self) -> dict[str, Any] | None:
        """Look at the logs once; the decision taken (its history entry), or None."""
        self.metrics.looks.inc()
        self.source.refresh()
        self.metrics.log_errors.set(self.source.errors)
        try:
            main_v, canary_v = self.versions()
        except ranking_head.HeadError as exc:
            log.error("learner: a head file is unusable (%s); no decision until it is fixed", exc)
            return None
        outcomes = join(self.source.lists, self.source.events, self.positive, self.window, self.k)
        floor = self._floor(outcomes, main_v, canary_v)
        if floor is not None:
            return floor
        if canary_v is not None and canary_v != main_v:
            return self._online(outcomes, main_v, canary_v)
        if self._candidate is not None:
            candidate, self._candidate = self._candidate, None
            publishing.publish_head(candidate, self.canary.path)
            return self._record("canary", "given by the operator (--candidate): no offline gate", candidate.version, main_v,
                                candidate.version, offline=None)
        if self._due():
            return self._train_and_gate(main_v)
        return None

    def _arm(self, outcomes: Sequence[Outcome], arm: str, version: str | None, since: float = -math.inf) -> list[Outcome]:
        return [o for o in outcomes if o.arm == arm and o.served_at >= since and matches(o.model_version, version)]

    def _compare(self, a: list[Outcome], b: list[Outcome], baseline: list[Outcome]) -> dict[str, confseq.Interval]:
        """Always-valid intervals of mean(a) - mean(b) for NDCG@k and hits@k; tau from `baseline`
        (lists before the comparison began) when there are enough, else from both arms pooled."""
        s = self.settings
        out = {}
        for metric in ("ndcg", "hit"):
            ref = baseline if len(baseline) >= BURN_IN else a + b
            level = sum(getattr(o, metric) for o in ref) / len(ref) if ref else 0.0
            tau = max(s.learning.learn_effect * level, 1e-3)
            out[metric] = confseq.compare(
                confseq.Moments.of([getattr(o, metric) for o in a]), confseq.Moments.of([getattr(o, metric) for o in b]),
                tau=tau, alpha=s.learning.learn_alpha,
            )
        return out

    def _online_numbers(self, names: tuple[str, str], cmp: dict[str, confseq.Interval]) -> dict[str, Any]:
        ndcg, hit = cmp["ndcg"], cmp["hit"]
        k = self.k
        return {
            "k": k, "lists": {names[0]: ndcg.n_a, names[1]: ndcg.n_b},
            f"ndcg@{k}": {names[0]: round(ndcg.mean_a, 5), names[1]: round(ndcg.mean_b, 5)},
            f"hits@{k}": {names[0]: round(hit.mean_a, 5), names[1]: round(hit.mean_b, 5)},
            f"ndcg@{k}_diff": ndcg.as_dict(), f"hits@{k}_diff": hit.as_dict(),
            "alpha": self.settings.learning.learn_alpha, "test": "normal-mixture confidence sequence (mSPRT)",
        }

    def _floor(self, outcomes: Sequence[Outcome], main_v: str | None, canary_v: str | None) -> dict[str, Any] | None:
        if main_v is None:
            return None
        served = self._arm(outcomes, self.settings.learning.learn_main_arm, main_v)
        if not served:
            return None
        since = served[0].served_at
        floor = self._arm(outcomes, arms_module.TREATMENT, None, since)
        self.metrics.ndcg.labels(role="zero_shot").set(_mean(floor))
        self.metrics.lists.labels(role="zero_shot").set(len(floor))
        if min(len(served), len(floor)) < BURN_IN:
            return None
        before = [o for o in self._arm(outcomes, arms_module.TREATMENT, None) if o.served_at < since]
        cmp = self._compare(served, floor, before)
        if not (cmp["ndcg"].loss or cmp["hit"].loss):
            return None
        publishing.withdraw(self.main.path)
        if canary_v == main_v:
            publishing.withdraw(self.canary.path)
        testing = canary_v if canary_v != main_v else None
        return self._record("floor", "the promoted head fell below zero-shot online: main serves zero-shot again",
                            main_v, None, testing, online=self._online_numbers(("main", "zero_shot"), cmp))

    def _online(self, outcomes: Sequence[Outcome], main_v: str | None, canary_v: str) -> dict[str, Any] | None:
        s = self.settings
        canary = self._arm(outcomes, s.learning.learn_canary_arm, canary_v)
        if not canary:
            return None  # the sidecars have not reloaded it yet, or no traffic
        since = canary[0].served_at
        main = self._arm(outcomes, s.learning.learn_main_arm, main_v, since)
        before = [o for o in self._arm(outcomes, s.learning.learn_main_arm, main_v) if o.served_at < since]
        for role, values in (("canary", canary), ("main", main)):
            self.metrics.ndcg.labels(role=role).set(_mean(values))
            self.metrics.lists.labels(role=role).set(len(values))
        if min(len(canary), len(main)) < BURN_IN:
            return None
        cmp = self._compare(canary, main, before)
        online = self._online_numbers(("canary", "main"), cmp)
        ndcg, hit = cmp["ndcg"], cmp["hit"]
        if ndcg.loss or hit.loss:
            self._mirror_main(main_v)
            which = f"NDCG@{self.k}" if ndcg.loss else f"hits@{self.k}"
            return self._record("rollback", f"the canary is worse than main on {which} (always-valid interval below 0)",
                                canary_v, main_v, None, online=online)
        if ndcg.gain and min(len(canary), len(main)) >= s.learning.learn_min_lists:
            publishing.publish_copy(self.canary.path, self.main.path)
            return self._record("promote", f"the canary beats main on NDCG@{self.k} (interval above 0) and is not "
                                f"worse on hits@{self.k}", canary_v, canary_v, None, online=online)
        if len(canary) >= s.learning.learn_max_canary_lists:
            self._mirror_main(main_v)
            return self._record("withdrawn", f"no difference after {len(canary)} judged canary lists (a tie): main "
                                "is left alone", canary_v, main_v, None, online=online)
        return None

    def _mirror_main(self, main_v: str | None) -> None:
        if main_v is None:
            publishing.withdraw(self.canary.path)
        else:
            publishing.publish_copy(self.main.path, self.canary.path)

    # --- training and the offline gate -------------------------------------------------------------
    def _due(self) -> bool:
        last = self._last("canary", "rejected")
        after = last["window"]["stop"] if last is not None and last.get("window") else -math.inf
        new = sum(1 for x in self.source.lists if x.served_at > after)
        return new >= self.settings.learning.learn_retrain_lists

    def _train_and_gate(self, main_v: str | None) -> dict[str, Any]:
        s = self.settings
        started = time.perf_counter()
        lists = self.source.lists[-s.learning.learn_window_lists :]
        held = max(1, math.ceil(len(lists) * s.learning.learn_holdout_percent / 100.0))
        start, split, stop = lists[0].served_at, lists[-held].served_at, lists[-1].served_at
        window = {"start": start, "split": split, "stop": stop, "lists": len(lists), "held_out": held,
                  "log_files": self.source.file_count, "pods": len(self.source.directories())}
        train_lists = self.source.served_lists(start, split)
        held_lists = self.source.served_lists(split, math.nextafter(stop, math.inf))
        events = self.source.events
        try:
            candidate = (self._trainer or self._train)([e for e in events if e.timestamp < split], train_lists)
        except ValueError as exc:
            self.metrics.training_seconds.inc(time.perf_counter() - started)
            return self._record("rejected", f"training failed: {exc}", None, main_v, None, window=window, offline=None)
        current = self.main.head()
        heads = {"candidate": candidate, "current": current, "zero_shot": None}
        if current is None:
            del heads["current"]
        scores = offlinegate.score_lists(s, self._encoder(), self._items(), heads, events, held_lists, self.k)
        scores.setdefault("current", scores["zero_shot"])
        gain = offlinegate.paired(scores["candidate"], scores["current"])
        k = self.k
        offline = {
            "held_out_lists": int(scores["candidate"].size), "k": k,
            f"ndcg@{k}": {name: round(float(v.mean()), 5) if v.size else 0.0 for name, v in scores.items()},
            "candidate_vs_current": gain.as_dict(),
            "candidate_vs_zero_shot": offlinegate.paired(scores["candidate"], scores["zero_shot"]).as_dict(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        self.metrics.training_seconds.inc(time.perf_counter() - started)
        if gain.diff > 0 and gain.low > 0:
            publishing.publish_head(candidate, self.canary.path)
            return self._record("canary", f"offline gate passed: NDCG@{k} {gain.mean_a:.4f} vs {gain.mean_b:.4f} "
                                f"(gain {gain.diff:+.4f}, 95% [{gain.low:+.4f}, {gain.high:+.4f}])",
                                candidate.version, main_v, candidate.version, window=window, offline=offline)
        return self._record("rejected", f"offline gate: NDCG@{k} {gain.mean_a:.4f} vs {gain.mean_b:.4f} (gain "
                            f"{gain.diff:+.4f}, 95% [{gain.low:+.4f}, {gain.high:+.4f}]): no sure gain",
                            candidate.version, main_v, None, window=window, offline=offline)

    def _encoder(self) -> offlinegate.CachedEncoder:
        if not hasattr(self, "_cached_encoder"):
            from reranker.model.loader import load_encoder

            self._cached_encoder = offlinegate.CachedEncoder(load_encoder(self.settings.model))
        return self._cached_encoder

    def _items(self) -> dict[str, str]:
        if not hasattr(self, "_catalog"):
            if not self.settings.learning.learn_items:
                raise ValueError("learn: learn_items (items.tsv) is required to train")
            self._catalog = formats.read_items(Path(self.settings.learning.learn_items))
        return self._catalog

    def _train(self, events: Sequence[formats.Interaction], lists: Sequence[formats.ServedList]) -> ranking_head.RankingHead:
        """`reranker train --training-log`'s path: the served lists alone (no built-in retrievers)."""
        from threadpoolctl import threadpool_limits

        from reranker.evaluation import train

        cfg = train.TrainConfig(retrievers=(), threads=self.settings.model.torch_threads or 1)
        with threadpool_limits(1, "blas"):
            head, report = train.train(self._items(), events, self.settings, cfg, encoder=self._encoder(),
                                       data_id=f"training log {self.settings.learning.learn_log_root}", served_lists=lists)
        log.info("learner: trained %s on %d served lists (%s)", head.version, len(lists), report.get("served_lists"))
        return head

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, stop: Callable[[], bool] = lambda: False, sleep: Callable[[float], None] = time.sleep) -> None:
        while not stop():
            try:
                self.tick()
            except Exception:  # one bad look (a log file, a training error) never ends the learner
                log.exception("learner: this look failed; the next one is in %.0f s", self.settings.learning.learn_interval_seconds)
            sleep(self.settings.learning.learn_interval_seconds)


def _mean(outcomes: Sequence[Outcome]) -> float:
    return sum(o.ndcg for o in outcomes) / len(outcomes) if outcomes else 0.0


def status_lines(entries: Sequence[dict[str, Any]]) -> list[str]:
    """`reranker learn status`: one line per decision, then where things stand."""
    lines = []
    for e in entries:
        online = e.get("online") or {}
        k = online.get("k", 10)
        numbers = ""
        if online:
            diff = online.get(f"ndcg@{k}_diff", {})
            numbers = f" online ndcg@{k} {online.get(f'ndcg@{k}')} diff {diff.get('diff')} [{diff.get('low')}, {diff.get('high')}]"
        offline = e.get("offline") or {}
        if offline:
            k = offline.get("k", 10)
            numbers += f" offline ndcg@{k} {offline.get(f'ndcg@{k}')}"
        lines.append(f"{e.get('at', '?')}  {e.get('decision', '?'):9s} {e.get('version') or 'zero-shot'}  "
                     f"{e.get('reason', '')}{numbers}")
    main = entries[-1].get("main_version") if entries else None
    lines.append(f"main serves {main or 'zero-shot'}; {len(entries)} decisions")
    return lines

