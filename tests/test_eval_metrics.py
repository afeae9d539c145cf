"""Ranking metrics against hand-computed values."""

from __future__ import annotations

import math

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
