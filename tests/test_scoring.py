from __future__ import annotations

import numpy as np
import pytest

from reranker.ranking import scoring


def unit(*values: float) -> np.ndarray:
    return scoring.l2_normalize(np.array(values, dtype=np.float32))


def test_minmax_scales_and_handles_constants() -> None:
    np.testing.assert_allclose(scoring.minmax(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(scoring.minmax(np.array([7.0, 7.0])), [0.5, 0.5])
    assert scoring.minmax(np.array([])).size == 0


def test_first_occurrences_keeps_the_first_of_each_id() -> None:
    assert scoring.first_occurrences(["a", "b", "a", "c", "b"]) == [0, 1, 3]


def test_order_is_stable_on_ties() -> None:
    assert scoring.order_by_score(np.array([0.5, 0.9, 0.5, 0.9])).tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize("seed", range(40))
def test_order_is_the_stable_descending_order_for_any_scores(seed: int) -> None:
    """Distinct scores, ties (equal and +/-0.0), NaN, one or no score: always the order a stable sort
    of the negated scores gives (ties in input order), whichever sort found it."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 600))
    scores = rng.random(n)
    if seed % 4 == 1 and n > 3:  # a few repeated values
        scores[rng.integers(0, n, n // 3)] = scores[0]
    elif seed % 4 == 2 and n > 3:  # coarse values: many ties, signed zeros
        scores = np.round(rng.normal(size=n), 1) * 0.0 if seed % 8 == 2 else np.round(rng.random(n), 1)
    elif seed % 4 == 3 and n > 3:
        scores[rng.integers(0, n, 2)] = np.nan
    expected = np.argsort(-scores, kind="stable")
    assert scoring.order_by_score(scores).tolist() == expected.tolist()


def test_has_duplicates_of_integer_ids() -> None:
    from reranker.types import DecimalIds

    assert not scoring.has_duplicates(DecimalIds(np.array([5, 3, 9], dtype=np.int64)))
    assert scoring.has_duplicates(DecimalIds(np.array([5, 3, 5], dtype=np.int64)))
    assert not scoring.has_duplicates(DecimalIds(np.array([7], dtype=np.int64)))


def test_blend_weights_both_signals() -> None:
    upstream = np.array([3.0, 2.0, 1.0])
    semantic = np.array([0.0, 0.5, 1.0])
    has = np.array([True, True, True])
    np.testing.assert_allclose(scoring.blend(upstream, semantic, has, 0.0), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(scoring.blend(upstream, semantic, has, 1.0), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(scoring.blend(upstream, semantic, has, 0.25), [0.75, 0.5, 0.25])


def test_items_without_vector_get_a_neutral_semantic_term() -> None:
    upstream = np.array([4.0, 3.0, 2.0, 1.0])
    semantic = np.array([0.0, 0.2, 0.0, 0.8])
    has = np.array([False, True, False, True])
    final = scoring.blend(upstream, semantic, has, 0.5)
    # vectorless items 0 and 2 keep their upstream order relative to each other, with the mean (0.5) semantic term
    assert final[0] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    assert final[2] == pytest.approx(0.5 * (1 / 3) + 0.5 * 0.5)


def test_rank_puts_similar_items_first_and_cuts_top_k() -> None:
    user = unit(1, 0, 0)
    items = np.stack([unit(0, 1, 0), unit(1, 0.1, 0), unit(0, 0, 1), unit(0.9, 0.3, 0)])
    ranking = scoring.rank(
        np.array([4.0, 3.0, 2.0, 1.0]), items, np.ones(4, bool), user, weight=0.9, top_k=2
    )
    assert ranking.order.tolist() == [1, 3]
    assert ranking.semantic[1] == pytest.approx(float(items[1] @ user))


def test_cold_user_keeps_upstream_order() -> None:
    items = np.eye(3, dtype=np.float32)
    ranking = scoring.rank(np.array([1.0, 3.0, 2.0]), items, np.ones(3, bool), None, weight=1.0)
    assert ranking.order.tolist() == [1, 2, 0]
    assert not ranking.semantic.any()


def test_mmr_breaks_up_near_duplicates() -> None:
    a, a2, b = unit(1, 0, 0), unit(1, 0.01, 0), unit(0, 1, 0)
    items = np.stack([a, a2, b])
    relevance = np.array([1.0, 0.95, 0.9])
    order = scoring.order_by_score(relevance)
    assert scoring.mmr_order(order, relevance, items, np.ones(3, bool), 0.0, 10).tolist() == [0, 1, 2]
    assert scoring.mmr_order(order, relevance, items, np.ones(3, bool), 0.5, 10).tolist() == [0, 2, 1]


def test_mmr_leaves_positions_beyond_the_window_in_relevance_order() -> None:
    rng = np.random.default_rng(0)
    items = scoring.l2_normalize(rng.standard_normal((20, 8)))
    relevance = np.linspace(1, 0, 20)
    order = scoring.order_by_score(relevance)
    out = scoring.mmr_order(order, relevance, items, np.ones(20, bool), 0.7, 5)
    assert sorted(out.tolist()) == list(range(20))
    rest = out[5:]
    assert (np.diff(relevance[rest]) <= 0).all()


def test_nearest_finds_the_most_similar_history_row() -> None:
    history = np.stack([unit(1, 0), unit(0, 1)])
    idx, sim = scoring.nearest(history, np.stack([unit(0.1, 1), unit(1, 0.2)]))
    assert idx.tolist() == [1, 0]
    assert sim[0] == pytest.approx(float(unit(0.1, 1) @ unit(0, 1)))


def test_attention_stays_finite_for_the_largest_event_weights() -> None:
    # Event weights are float32 on the wire; sums of several near float32's maximum overflow a
    # float32 accumulator (found by tests/test_input_hardening.py's fuzzing).
    rng = np.random.default_rng(3)
    items = scoring.l2_normalize(rng.standard_normal((4, 8)).astype(np.float32))
    history = scoring.l2_normalize(rng.standard_normal((3, 8)).astype(np.float32))
    huge = np.array([3.4e38, 3.4e38, -3.4e38])
    scores = scoring.attention_scores(items, history, huge, temperature=0.1)
    reference = scoring.attention_scores(items, history, huge / 3.4e38, temperature=0.1)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, reference, atol=1e-6)
    assert (scoring.attention_scores(items, history, np.zeros(3), temperature=0.1) == 0).all()


def test_attention_leaves_a_candidates_own_rows_out_of_its_pooling() -> None:
    # Each candidate's score is the pooling over the history rows that are not its own events,
    # computed here one candidate at a time; a candidate whose every row is its own scores 0.
    rng = np.random.default_rng(5)
    items = scoring.l2_normalize(rng.standard_normal((6, 8)).astype(np.float32))
    history = scoring.l2_normalize(rng.standard_normal((4, 8)).astype(np.float32))
    weights = np.array([1.0, -0.5, 0.25, 2.0])
    own = np.zeros((4, 6), dtype=bool)
    own[1, 0] = own[3, 0] = True  # two events on candidate 0
    own[2, 3] = True
    own[:, 5] = True  # every history row is an event on candidate 5
    scores = scoring.attention_scores(items, history, weights, temperature=0.1, own_rows=own)
    for c in range(5):
        rows = ~own[:, c]
        alone = scoring.attention_scores(items[c : c + 1], history[rows], weights[rows], temperature=0.1)
        assert scores[c] == pytest.approx(float(alone[0]), abs=1e-6)
    assert scores[5] == 0.0
    assert np.array_equal(scores, scoring.attention_scores(
        items, history, weights, 0.1, own, pooling_weights=scoring.attention_weights(weights)))
    assert scoring.attention_weights(np.zeros(4)) is None
