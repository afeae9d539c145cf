"""The salted user hash that logs carry instead of user ids (the access log, the training log, the
profile stores' warnings)."""

from __future__ import annotations

import hashlib


def user_hash(salt: str, user_id: str) -> str:
    """Salted, truncated hash: lets an operator follow one user's lines without seeing the id."""
    return hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8, key=salt.encode()[:64]).hexdigest()
