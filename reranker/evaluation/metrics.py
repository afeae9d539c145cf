"""Ranking metrics, pure functions of ranked item ids and the relevant set. No I/O.

All per-list metrics take `ranked` (item ids, best first) and `relevant` (a set of item ids).
A relevant item missing from the list counts as not retrieved (rank = infinity).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np


def ndcg_at(ranked: Sequence[str], relevant: set[str], k: int = 10) -> float:
    """Binary-relevance NDCG@k: DCG over the top k divided by the ideal DCG for |relevant| items."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(pos + 2) for pos, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(pos + 2) for pos in range(min(k, len(relevant))))
    return dcg / ideal


def recall_at(ranked: Sequence[str], relevant: set[str], k: int = 10) -> float:
    """Share of the relevant items found in the top k (= hit rate with one relevant item)."""
    if not relevant:
        return 0.0
    return sum(1 for item in ranked[:k] if item in relevant) / len(relevant)


def reciprocal_rank(ranked: Sequence[str], relevant: set[str]) -> float:
    """1 / (1-based position of the first relevant item); 0 when none is in the list."""
    for pos, item in enumerate(ranked):
        if item in relevant:
            return 1.0 / (pos + 1)
    return 0.0


def auc(ranked: Sequence[str], relevant: set[str]) -> float | None:
    """Share of (relevant, irrelevant) pairs ordered correctly; None without both kinds in the list."""
    positives = negatives = correct = 0
    for item in ranked:
        if item in relevant:
            positives += 1
        else:
            negatives += 1
            correct += positives  # every relevant item seen so far is ranked above this one
    if positives == 0 or negatives == 0:
        return None
    return correct / (positives * negatives)


def coverage(top_lists: Iterable[Sequence[str]], catalog_size: int) -> float:
    """Distinct items shown in any list / catalog size."""
    if catalog_size <= 0:
        return 0.0
    return len({item for ranked in top_lists for item in ranked}) / catalog_size


def exposure_entropy(top_lists: Iterable[Sequence[str]]) -> float:
    """Normalized Shannon entropy of how often each item is shown (1 = every item shown equally often)."""
    counts = Counter(item for ranked in top_lists for item in ranked)
    total = sum(counts.values())
    if len(counts) <= 1:
        return 0.0
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return entropy / math.log(len(counts))


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 95, 99)) -> dict[str, float]:
    """Nearest-rank percentiles plus mean and max (empty input -> empty dict)."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{q:g}": ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))] for q in qs}
    out["mean"] = sum(ordered) / len(ordered)
    out["max"] = ordered[-1]
    return out


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for fewer than 2 values."""
    if len(values) < 2:
        return 0.0
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def paired_ratio_ci(
    base: Sequence[float], new: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Bootstrap confidence interval of mean(new) / mean(base) over paired per-list values.

    Lists (users) are resampled with replacement, both orders together, so the interval reflects
    which users happened to be evaluated. None with fewer than 2 lists or when every base value is
    0 (no ratio is defined); a resample whose base mean is 0 counts as an infinite ratio, so a
    bound may be inf."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.shape} vs {b.shape}")
    if a.size < 2 or not a.any():
        return None
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory: 256 resamples of n indices at a time
        idx = rng.integers(0, a.size, size=(min(256, resamples - start), a.size))
        base_means = a[idx].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios[start : start + len(idx)] = np.where(base_means > 0, b[idx].mean(axis=1) / base_means, np.inf)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail], method="inverted_cdf")  # no interpolation: bounds may be inf
    return float(low), float(high)


def ndcg_ratio(
    base: MetricAccumulator, new: MetricAccumulator, *, seed: int = 0, digits: int | None = None
) -> dict[str, Any]:
    """Mean NDCG@k of `new` over `base` on the same lists, with its 95% paired bootstrap interval,
    ready for JSON: {"ratio": float | None, "ci95": [low, high] | None}, an unbounded bound as None
    (JSON has no inf); `digits` rounds the numbers for printing."""
    a, b = base.values["ndcg"], new.values["ndcg"]
    mean_a = sum(a) / max(len(a), 1)
    ci = paired_ratio_ci(a, b, seed=seed)

    def shown(x: float) -> float | None:
        if not np.isfinite(x):
            return None
        return x if digits is None else round(x, digits)

    return {
        "ratio": shown(sum(b) / max(len(b), 1) / mean_a) if mean_a else None,
        "ci95": None if ci is None else [shown(bound) for bound in ci],
    }


class MetricAccumulator:
    """Averages per-list metrics over users; AUC over the lists where it is defined."""

    def __init__(self, k: int = 10) -> None:
        self.k = k
        self.values: dict[str, list[float]] = {"ndcg": [], "recall": [], "mrr": [], "consumed": []}  # one per list
        self._auc_sum = 0.0
        self._auc_count = 0
        self.count = 0
        self.in_list = 0  # lists that contain at least one relevant item
        self.top_lists: list[list[str]] = []

    def add(
        self, ranked: Sequence[str], relevant: set[str], labelled: bool = False, consumed: Collection[str] = ()
    ) -> None:
        """Add one list; AUC is only taken for `labelled` lists (a label per candidate, as in MIND);
        `consumed`: the items in the user's history, for the share of them in the top k."""
        self.count += 1
        self.values["consumed"].append(sum(item in consumed for item in ranked[: self.k]) / self.k)
        self.in_list += any(item in relevant for item in ranked)
        self.values["ndcg"].append(ndcg_at(ranked, relevant, self.k))
        self.values["recall"].append(recall_at(ranked, relevant, self.k))
        self.values["mrr"].append(reciprocal_rank(ranked, relevant))
        value = auc(ranked, relevant) if labelled else None
        if value is not None:
            self._auc_sum += value
            self._auc_count += 1
        self.top_lists.append(list(ranked[: self.k]))

    def summary(self, catalog_size: int) -> dict[str, float | int | None]:
        n = max(self.count, 1)
        k = self.k
        return {
            f"ndcg@{k}": sum(self.values["ndcg"]) / n,
            f"ndcg@{k}_se": standard_error(self.values["ndcg"]),
            f"recall@{k}": sum(self.values["recall"]) / n,
            # share of the top k that the user already consumed (items in the history given to add)
            f"consumed@{k}": sum(self.values["consumed"]) / n,
            "mrr": sum(self.values["mrr"]) / n,
            "auc": self._auc_sum / self._auc_count if self._auc_count else None,
            f"coverage@{k}": coverage(self.top_lists, catalog_size),
            f"exposure_entropy@{k}": exposure_entropy(self.top_lists),
            "lists": self.count,
            "lists_with_relevant": self.in_list,
        }
