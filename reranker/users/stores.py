"""make_profile_store: the in-process profile store, or the Redis store in front of it.

It lives apart from both stores so that neither imports the other: the Redis store builds on the
in-process one (its fallback), and this module picks between them. Both keep compact profiles
(compact.py): the one layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from reranker.config import RedisSettings, UserModelSettings
from reranker.users.compact import CompactProfileStore, VectorLookup
from reranker.users.profiles import ProfileConfig, ProfileStore

log = logging.getLogger(__name__)


def _nothing_found(item_ids: object) -> Any:
    raise RuntimeError("a profile store needs a vector lookup (the item cache / catalog)")


def make_profile_store(settings: UserModelSettings, redis: RedisSettings, dim: int,
                       now: Callable[[], float] | None = None, lookup: VectorLookup | None = None,
                       log_salt: str = "") -> ProfileStore:
    """The in-process store, or the Redis store when `redis_url` is set (`now`: the wall clock that
    a profile's decay clock is checked against, time.time by default); history vectors are read
    through `lookup` (the item cache, then the catalog)."""
    if settings.profile_layout == "full":
        log.warning("profile_layout=full is deprecated and ignored: profiles are compact (docs/user-model.md); "
                    "full-layout snapshots and Redis keys are converted as they are read")
    config = ProfileConfig.from_settings(settings, dim, log_salt)
    local = CompactProfileStore(config, lookup or _nothing_found, max_users=settings.user_cache_size,
                                ttl_seconds=settings.user_ttl_seconds, max_states=settings.user_state_cache_size)
    if not redis.redis_url:
        return local
    try:
        from reranker.users.compact_redis import CompactRedisProfileStore  # redis is an optional extra
    except ImportError as exc:  # the optional extra is not installed
        raise RuntimeError(f"redis_url is set but {exc}; install `reranker[redis]`") from exc

    extra: dict[str, Any] = {"ttl_seconds": settings.user_ttl_seconds, "snapshot_path": settings.snapshot_path}
    if now is not None:
        extra["now"] = now
    return CompactRedisProfileStore.from_settings(redis, config, fallback=local, lookup=local.lookup, **extra)
