"""make_profile_store: the in-process profile store, or the Redis store in front of it.

It lives apart from both stores so that neither imports the other: redis_store.py builds on
profiles.py (the in-process store is its fallback), and this module picks between them.
"""

from __future__ import annotations

from collections.abc import Callable

from reranker.config import Settings
from reranker.users.profiles import InProcessProfileStore, ProfileConfig, ProfileStore


def make_profile_store(settings: Settings, dim: int, now: Callable[[], float] | None = None) -> ProfileStore:
    """The in-process store, or the Redis store when `redis_url` is set (`now`: the wall clock that
    a profile's decay clock is checked against, time.time by default)."""
    config = ProfileConfig.from_settings(settings, dim)
    local = InProcessProfileStore(
        config, max_users=settings.user_cache_size, ttl_seconds=settings.user_ttl_seconds,
        max_states=settings.user_state_cache_size,
    )
    if not settings.redis_url:
        return local
    try:
        from reranker.users.redis_store import RedisProfileStore  # redis is an optional extra
    except ImportError as exc:  # the optional extra is not installed
        raise RuntimeError(f"redis_url is set but {exc}; install `reranker[redis]`") from exc

    if now is None:
        return RedisProfileStore.from_settings(settings, config, fallback=local)
    return RedisProfileStore.from_settings(settings, config, fallback=local, now=now)
