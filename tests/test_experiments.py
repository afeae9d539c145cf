from __future__ import annotations

from reranker.ranking.experiments import BUCKETS, bucket_of, decide
from reranker.types import Variant


def test_buckets_are_stable_and_salted() -> None:
    assert bucket_of("exp-a", "user-1") == bucket_of("exp-a", "user-1")
    assert 0 <= bucket_of("exp-a", "user-1") < BUCKETS
    differing = sum(bucket_of("exp-a", f"u{i}") != bucket_of("exp-b", f"u{i}") for i in range(200))
    assert differing > 190


def test_treatment_share_matches_the_percentage() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    treated = sum(
        decide(user_id=u, experiment="", bypass=False, kill_switch=False, treatment_percent=30.0, default_salt="s")[0]
        is None
        for u in users
    )
    assert abs(treated / len(users) - 0.30) < 0.015


def test_bypass_and_kill_switch_win_over_treatment() -> None:
    common = dict(user_id="u", experiment="", treatment_percent=100.0, default_salt="s")
    assert decide(bypass=False, kill_switch=False, **common)[0] is None
    assert decide(bypass=True, kill_switch=False, **common)[0] is Variant.BYPASSED
    assert decide(bypass=False, kill_switch=True, **common)[0] is Variant.BYPASSED
    assert decide(bypass=False, kill_switch=False, **{**common, "treatment_percent": 0.0})[0] is Variant.CONTROL


def test_buckets_are_the_sha256_of_salt_and_user_every_time() -> None:
    """The bucket is remembered per (salt, user): asked again, or after others pushed it out of the
    memo, it is still the sha256 bucket every replica computes."""
    import hashlib

    def expected(salt: str, user: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{salt}/{user}".encode()).digest()[:8], "big") % BUCKETS

    users = [f"user-{i}" for i in range(40_000)]  # more than the memo holds
    for _ in range(2):
        assert all(bucket_of("exp-a", u) == expected("exp-a", u) for u in users[::97])
    assert all(bucket_of("s", u) == expected("s", u) for u in users)
    assert [bucket_of("s", u) for u in users[:50]] == [expected("s", u) for u in users[:50]]
    assert bucket_of("reranker", "u3") == expected("reranker", "u3") and bucket_of("", "") == expected("", "")
