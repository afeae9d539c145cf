"""The user-model math checked against values computed by hand (orthonormal item vectors)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from reranker.ranking import scoring
from reranker.users import usermodel

E = np.eye(4, dtype=np.float32)  # e0..e3: orthonormal "items", so every component is one event's term


def fold_all(events: list[tuple[float, float, np.ndarray]], half_life: float) -> tuple[np.ndarray, float]:
    rate = usermodel.decay_rate(half_life)
    long_term, ref, first = np.zeros(4), 0.0, True
    for timestamp, weight, vector in events:
        ref = usermodel.fold(long_term, ref, first, timestamp, weight, vector, rate)
        first = False
    return long_term, ref


def test_decay_rate_halves_weight_every_half_life() -> None:
    rate = usermodel.decay_rate(3600.0)
    assert math.exp(-rate * 3600.0) == pytest.approx(0.5)
    assert math.exp(-rate * 7200.0) == pytest.approx(0.25)


def test_long_term_vector_matches_hand_computed_values_with_out_of_order_event() -> None:
    # click (w=1) at t=0, purchase (w=3) at t=100, then a dislike (w=-1.5) at t=50 arriving last.
    # Half-life 100 s, reference time 100: [1 * 2^-1, 3 * 2^0, -1.5 * 2^-0.5, 0]
    long_term, ref = fold_all([(0.0, 1.0, E[0]), (100.0, 3.0, E[1]), (50.0, -1.5, E[2])], half_life=100.0)
    assert ref == 100.0
    np.testing.assert_allclose(long_term, [0.5, 3.0, -1.5 / math.sqrt(2.0), 0.0], rtol=1e-12)


def test_long_term_vector_does_not_depend_on_arrival_order() -> None:
    events = [(0.0, 1.0, E[0]), (100.0, 3.0, E[1]), (50.0, -1.5, E[2]), (300.0, 0.5, E[3]), (300.0, 2.0, E[0])]
    expected = np.array([1.0 * 2**-3 + 2.0, 3.0 * 2**-2, -1.5 * 2**-2.5, 0.5])
    for perm in itertools.permutations(events):
        long_term, ref = fold_all(list(perm), half_life=100.0)
        assert ref == 300.0
        np.testing.assert_allclose(long_term, expected, rtol=1e-12)


def test_session_sum_is_folded_with_its_own_half_life_next_to_the_long_term_sum() -> None:
    # Half-lives: long-term 100 s, session 10 s. Events at t=0 (e0, w=1), t=20 (e1, w=2), then t=10
    # (e2, w=-1) arriving last. Reference time 20.
    rate, session_rate = usermodel.decay_rate(100.0), usermodel.decay_rate(10.0)
    long_term, session, ref = np.zeros(4), np.zeros(4), 0.0
    for i, (t, w, v) in enumerate([(0.0, 1.0, E[0]), (20.0, 2.0, E[1]), (10.0, -1.0, E[2])]):
        ref = usermodel.fold(long_term, ref, i == 0, t, w, v, rate, session, session_rate)
    assert ref == 20.0
    np.testing.assert_allclose(long_term, [2**-0.2, 2.0, -(2**-0.1), 0.0], rtol=1e-12)
    np.testing.assert_allclose(session, [2**-2, 2.0, -0.5, 0.0], rtol=1e-12)
    history = usermodel.History(("a", "c", "b"), np.array([0.0, 10.0, 20.0]), np.array([1.0, -1.0, 2.0]), E[[0, 2, 1]])
    np.testing.assert_allclose(usermodel.decayed_sum(history, 20.0, session_rate), session, rtol=1e-12)
    np.testing.assert_allclose(usermodel.decayed_sum(usermodel.History.empty(4), 0.0, 1.0), np.zeros(4))


def test_a_future_clock_is_repaired_exactly_when_it_is_near() -> None:
    # Folded by an older build: e0 at t=0 and e1 at t=1000 while "now" is 100. After the repair,
    # the state is what folding e0 at 0 and e1 at now (100) gives.
    rate, session_rate = usermodel.decay_rate(100.0), usermodel.decay_rate(30.0)
    long_term, session = np.zeros(4), np.zeros(4)
    ref = usermodel.fold(long_term, 0.0, True, 0.0, 1.0, E[0], rate, session, session_rate)
    ref = usermodel.fold(long_term, ref, False, 1000.0, 2.0, E[1], rate, session, session_rate)
    history = usermodel.History(("a", "b"), np.array([0.0, 1000.0]), np.array([1.0, 2.0]), E[[0, 1]])
    expected_l, expected_s = np.zeros(4), np.zeros(4)
    expected_ref = usermodel.fold(expected_l, 0.0, True, 0.0, 1.0, E[0], rate, expected_s, session_rate)
    expected_ref = usermodel.fold(expected_l, expected_ref, False, 100.0, 2.0, E[1], rate, expected_s, session_rate)
    fixed = usermodel.repair_future_clock(long_term, session, ref, history, 100.0, rate, rate)  # rate*900 = 6.2: exact
    assert fixed.exact and fixed.ref_time == expected_ref == 100.0
    np.testing.assert_allclose(fixed.long_term, expected_l, rtol=1e-9)
    np.testing.assert_array_equal(fixed.history.timestamps, [0.0, 100.0])
    # Year 9999: everything before now decayed to nothing; L and S are rebuilt from the history rows.
    long_term = np.array([0.0, 2.0, 0.0, 0.0])  # e0's term underflowed against the future clock
    far = usermodel.repair_future_clock(long_term, long_term.copy(), 253_402_300_799.0,
                                        usermodel.History(("a", "b"), np.array([0.0, 253_402_300_799.0]),
                                                          np.array([1.0, 2.0]), E[[0, 1]]), 100.0, rate, session_rate)
    assert not far.exact and far.ref_time == 100.0
    np.testing.assert_allclose(far.long_term, expected_l, rtol=1e-9)
    np.testing.assert_allclose(far.session, expected_s, rtol=1e-9)


def test_mix_of_long_term_and_session() -> None:
    long_term, session = np.array([3.0, 4.0, 0.0, 0.0]), np.array([0.0, 0.0, 2.0, 0.0])
    # 0.5 * [0.6, 0.8, 0] + 0.5 * [0, 0, 1] = [0.3, 0.4, 0.5], norm sqrt(0.5)
    np.testing.assert_allclose(
        usermodel.mix(long_term, session, 0.5), np.array([0.3, 0.4, 0.5, 0.0]) / math.sqrt(0.5), rtol=1e-6
    )
    np.testing.assert_allclose(usermodel.mix(long_term, session, 0.0), [0.6, 0.8, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(usermodel.mix(long_term, session, 1.0), [0.0, 0.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(usermodel.mix(long_term, np.zeros(4), 0.5), [0.6, 0.8, 0.0, 0.0], rtol=1e-6)
    assert usermodel.mix(np.zeros(4), np.zeros(4), 0.5) is None
    assert usermodel.mix(np.zeros(4), session, 0.0) is None  # long-term only, and it is empty


def test_decayed_history_weights() -> None:
    history = usermodel.History(("a", "b"), np.array([0.0, 100.0]), np.array([2.0, -1.0]), E[[0, 1]])
    np.testing.assert_allclose(usermodel.decayed_weights(history, 100.0, usermodel.decay_rate(100.0)), [1.0, -1.0])


def test_attention_scores_match_hand_computed_softmax() -> None:
    history, weights = E[[0, 1]], np.array([1.0, -1.0])  # liked e0, disliked e1
    candidates = np.stack([E[0], E[1], E[2], (E[0] + E[1]) / np.sqrt(2.0)]).astype(np.float32)
    att = scoring.attention_scores(candidates, history, weights, temperature=0.5)
    e2 = math.exp(2.0)
    s = 1 / math.sqrt(2.0)
    assert att[0] == pytest.approx(e2 / (e2 + 1.0))  # sims [1, 0]: softmax [e^2, 1] / (e^2 + 1)
    assert att[1] == pytest.approx(-e2 / (e2 + 1.0))  # sims [0, 1]: the disliked item dominates
    assert att[2] == pytest.approx(0.0)  # sims [0, 0]: (1*0 - 1*0) / 2
    assert att[3] == pytest.approx((s - s) / 2.0, abs=1e-7)  # equal similarity to a like and a dislike


def test_attention_temperature_moves_between_mean_and_nearest() -> None:
    history, weights = E[[0, 1]], np.array([1.0, 1.0])
    candidate = np.array([[0.8, 0.6, 0.0, 0.0]], dtype=np.float32)
    hot = scoring.attention_scores(candidate, history, weights, temperature=1e6)[0]
    cold = scoring.attention_scores(candidate, history, weights, temperature=1e-4)[0]
    assert hot == pytest.approx((0.8 + 0.6) / 2.0, rel=1e-4)
    assert cold == pytest.approx(0.8, rel=1e-4)


def test_personal_semantic_blends_cosine_and_attention() -> None:
    user = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    items = E[[0, 1]]
    has_vector = np.array([True, False])
    history, weights = E[[1]], np.array([1.0])
    plain = scoring.personal_semantic(items, has_vector, user, history, weights, attention_weight=0.0, temperature=1.0)
    np.testing.assert_allclose(plain, [1.0, 0.0])
    mixed = scoring.personal_semantic(items, np.array([True, True]), user, history, weights,
                                      attention_weight=0.25, temperature=1.0)
    np.testing.assert_allclose(mixed, [0.75 * 1.0 + 0.25 * 0.0, 0.75 * 0.0 + 0.25 * 1.0])
