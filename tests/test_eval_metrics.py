"""Ranking metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reranker.evaluation import metrics


def test_ndcg_single_relevant_item_at_each_position() -> None:
    ranked = ["a", "b", "c", "d"]
    assert metrics.ndcg_at(ranked, {"a"}) == pytest.approx(1.0)
    assert metrics.ndcg_at(ranked, {"b"}) == pytest.approx(1 / math.log2(3))
    assert metrics.ndcg_at(ranked, {"d"}) == pytest.approx(1 / math.log2(5))
    assert metrics.ndcg_at(ranked, {"d"}, k=3) == 0.0
    assert metrics.ndcg_at(ranked, {"zz"}) == 0.0


def test_ndcg_two_relevant_items_normalized_by_ideal() -> None:
    # relevant at positions 1 and 3 (0-based): DCG = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert metrics.ndcg_at(["x", "a", "y", "b"], {"a", "b"}) == pytest.approx(expected)


def test_recall_and_reciprocal_rank() -> None:
    ranked = [str(i) for i in range(20)]
    assert metrics.recall_at(ranked, {"3", "15"}, k=10) == 0.5
    assert metrics.recall_at(ranked, {"3"}, k=10) == 1.0
    assert metrics.reciprocal_rank(ranked, {"15", "4"}) == pytest.approx(1 / 5)
    assert metrics.reciprocal_rank(ranked, {"missing"}) == 0.0


def test_auc_counts_correctly_ordered_pairs() -> None:
    # positives a, c; negatives b, d, e. Pairs ordered right: a>b,d,e (3) + c>d,e (2) = 5 of 6.
    assert metrics.auc(["a", "b", "c", "d", "e"], {"a", "c"}) == pytest.approx(5 / 6)
    assert metrics.auc(["a", "b"], {"a"}) == 1.0
    assert metrics.auc(["b", "a"], {"a"}) == 0.0
    assert metrics.auc(["a", "b"], {"a", "b"}) is None
    assert metrics.auc(["a", "b"], set()) is None


def test_coverage_and_exposure_entropy() -> None:
    lists = [["a", "b"], ["a", "c"]]
    assert metrics.coverage(lists, catalog_size=6) == pytest.approx(0.5)
    # counts a=2, b=1, c=1 -> H = -(.5 ln .5 + 2 * .25 ln .25) / ln 3
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    assert metrics.exposure_entropy(lists) == pytest.approx(expected)
    assert metrics.exposure_entropy([["a"], ["a"]]) == 0.0


def test_percentiles_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    p = metrics.percentiles(values)
    assert (p["p50"], p["p90"], p["p99"], p["max"]) == (50.0, 90.0, 99.0, 100.0)
    assert p["mean"] == pytest.approx(50.5)
    assert metrics.percentiles([]) == {}


def test_accumulator_averages_and_takes_auc_only_for_labelled_lists() -> None:
    acc = metrics.MetricAccumulator(k=2)
    acc.add(["a", "b", "c"], {"a"})  # ndcg 1, recall 1, rr 1
    acc.add(["a", "b", "c"], {"c"})  # ndcg 0 (beyond k), recall 0, rr 1/3
    summary = acc.summary(catalog_size=4)
    assert summary["ndcg@2"] == pytest.approx(0.5)
    assert summary["recall@2"] == pytest.approx(0.5)
    assert summary["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert summary["auc"] is None
    assert summary["coverage@2"] == pytest.approx(0.5)
    acc.add(["x", "y"], {"y"}, labelled=True)
    assert acc.summary(4)["auc"] == 0.0


def test_standard_error_of_the_mean() -> None:
    # values 0, 1, 0, 1: sample sd = sqrt(1/3), se = sd / 2
    assert metrics.standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert metrics.standard_error([0.5]) == 0.0
    acc = metrics.MetricAccumulator(k=10)
    acc.add(["a", "b"], {"a"})  # ndcg 1
    acc.add(["a", "b"], {"z"})  # ndcg 0
    assert acc.summary(2)["ndcg@10_se"] == pytest.approx(0.5)


def test_paired_ratio_interval() -> None:
    base = [0.0, 0.2, 0.5, 1.0, 0.3, 0.0, 0.7, 0.1]
    # Every list doubled: every resample has ratio exactly 2.
    assert metrics.paired_ratio_ci(base, [2 * v for v in base]) == pytest.approx((2.0, 2.0))
    # Unrelated noise: the interval holds the point ratio and narrows with more lists.
    rng = np.random.default_rng(3)
    small_base, small_new = rng.random(50), rng.random(50) * 1.5
    big_base, big_new = rng.random(5000), rng.random(5000) * 1.5
    for b, n in ((small_base, small_new), (big_base, big_new)):
        low, high = metrics.paired_ratio_ci(b, n)
        assert low < n.mean() / b.mean() < high
    small_width = np.subtract(*metrics.paired_ratio_ci(small_base, small_new)[::-1])
    big_width = np.subtract(*metrics.paired_ratio_ci(big_base, big_new)[::-1])
    assert big_width < small_width / 4
    # ... and, on many lists, matches the normal (delta-method) interval of a ratio of means.
    ratio = big_new.mean() / big_base.mean()
    cov = np.cov(big_base, big_new) / big_base.size
    se = ratio * math.sqrt(cov[0, 0] / big_base.mean() ** 2 + cov[1, 1] / big_new.mean() ** 2
                           - 2 * cov[0, 1] / (big_base.mean() * big_new.mean()))
    assert big_width == pytest.approx(2 * 1.96 * se, rel=0.15)
    # The same seed gives the same interval (reports are reproducible).
    assert metrics.paired_ratio_ci(small_base, small_new, seed=1) == metrics.paired_ratio_ci(small_base, small_new, seed=1)
    assert metrics.paired_ratio_ci([0.0, 0.0], [1.0, 0.5]) is None  # no gain is defined over a zero base
    # One relevant hit among 10 base lists: a third of the resamples miss it, so the upper bound is unbounded.
    low, high = metrics.paired_ratio_ci([0.0] * 9 + [1.0], [1.0] * 10)
    assert math.isfinite(low) and high == math.inf
    with pytest.raises(ValueError):
        metrics.paired_ratio_ci([0.1, 0.2], [0.1])


def test_ndcg_ratio_is_ready_for_json() -> None:
    """The ratio of mean NDCG with its interval; an unbounded bound becomes None (JSON has no inf)."""
    base, new = metrics.MetricAccumulator(), metrics.MetricAccumulator()
    for hit in range(10):
        base.add(["a", "b"], {"a"} if hit == 9 else {"z"})  # one hit at rank 1 among ten lists
        new.add(["a", "b"], {"a"})
    gain = metrics.ndcg_ratio(base, new)
    assert gain["ratio"] == pytest.approx(10.0)
    low, high = gain["ci95"]
    assert math.isfinite(low) and high is None
    json.dumps(gain, allow_nan=False)
    rounded = metrics.ndcg_ratio(base, new, digits=1)
    assert rounded["ratio"] == 10.0 and rounded["ci95"] == [round(low, 1), None]
    misses = metrics.MetricAccumulator()
    for _ in range(10):
        misses.add(["a", "b"], {"z"})
    assert metrics.ndcg_ratio(misses, new) == {"ratio": None, "ci95": None}  # no gain over a zero base
