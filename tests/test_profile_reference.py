"""Compact profiles (the one layout) rank ml-100k as the full layout did: its rankings were saved once
(tests/data/ml100k_full_layout_rankings.npz, tests/data/README.md) and the scenario of
tests/profile_reference.py runs again against today's code."""

from __future__ import annotations

import numpy as np
import pytest

from profile_reference import ML100K, REFERENCE, rankings


@pytest.mark.integration
@pytest.mark.skipif(not (ML100K / "ml-100k.inter").exists(), reason="../shared/data/ml-100k is not there")
def test_compact_profiles_rank_every_ml100k_user_as_the_full_layout_did() -> None:
    reference = np.load(REFERENCE)
    got = rankings()
    assert (got["candidates"] == reference["candidates"]).all()  # the same requests
    same = (got["order"] == reference["order"]).all(axis=1)
    assert same.sum() == len(same) == 943, f"{len(same) - same.sum()} users ranked differently"
    assert float(np.abs(got["scores"] - reference["scores"]).max()) <= 1e-5
