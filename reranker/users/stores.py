"""make_profile_store: the in-process profile store, or the Redis store in front of it.

It lives apart from both stores so that neither imports the other: redis_store.py builds on
profiles.py (the in-process store is its fallback), and this module picks between them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reranker.config import RedisSettings, UserModelSettings
from reranker.users.compact import CompactProfileStore, VectorLookup
from reranker.users.profiles import InProcessProfileStore, ProfileConfig, ProfileStore


def _nothing_found(item_ids: object) -> Any:
    raise RuntimeError("profile_layout=compact needs a vector lookup (the item cache / catalog)")


def make_profile_store(settings: UserModelSettings, redis: RedisSettings, dim: int,
                       now: Callable[[], float] | None = None, lookup: VectorLookup | None = None,
                       log_salt: str = "") -> ProfileStore:
    """The in-process store, or the Redis store when `redis_url` is set (`now`: the wall clock that
    a profile's decay clock is checked against, time.time by default), in `profile_layout`; a
    compact layout reads history vectors through `lookup` (the item cache, then the catalog)."""
    config = ProfileConfig.from_settings(settings, dim, log_salt)
    compact = settings.profile_layout == "compact"
    sizes = dict(max_users=settings.user_cache_size, ttl_seconds=settings.user_ttl_seconds,
                 max_states=settings.user_state_cache_size)
    local: Any = (CompactProfileStore(config, lookup or _nothing_found, **sizes) if compact
                  else InProcessProfileStore(config, **sizes))
    if not redis.redis_url:
        return local  # type: ignore[no-any-return]
    try:
        from reranker.users.redis_store import RedisProfileStore  # redis is an optional extra
    except ImportError as exc:  # the optional extra is not installed
        raise RuntimeError(f"redis_url is set but {exc}; install `reranker[redis]`") from exc

    extra: dict[str, Any] = {"ttl_seconds": settings.user_ttl_seconds, "snapshot_path": settings.snapshot_path}
    if now is not None:
        extra["now"] = now
    if compact:
        from reranker.users.compact_redis import CompactRedisProfileStore

        return CompactRedisProfileStore.from_settings(redis, config, fallback=local, lookup=local.lookup, **extra)
    return RedisProfileStore.from_settings(redis, config, fallback=local, **extra)
