"""A/B decisions: kill switch, per-request bypass, stable experiment buckets."""

from __future__ import annotations

import functools
import hashlib

from reranker.types import Variant

BUCKETS = 10_000


# A user's bucket is asked for on every Rerank; the sha256 (an OpenSSL context per call) is paid once
# per (salt, user) among the recent ones. Bounded: about 100 bytes an entry.
@functools.lru_cache(maxsize=16_384)
def bucket_of(salt: str, user_id: str) -> int:
    """Stable bucket in [0, 10000) from sha256("salt/user_id"): same on every replica and restart."""
    digest = hashlib.sha256(f"{salt}/{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def decide(
    *, user_id: str, experiment: str, bypass: bool, kill_switch: bool, treatment_percent: float, default_salt: str
) -> tuple[Variant | None, int]:
    """Return (variant that skips reranking, or None for treatment; the user's bucket)."""
    bucket = bucket_of(experiment or default_salt, user_id)
    if kill_switch or bypass:
        return Variant.BYPASSED, bucket
    if bucket >= treatment_percent * (BUCKETS / 100.0):
        return Variant.CONTROL, bucket
    return None, bucket
