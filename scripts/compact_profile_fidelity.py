"""Does a compact profile rank like today's? Measured on ml-100k through the real RerankService.

    PYTHONPATH=$PWD .venv/bin/python scripts/compact_profile_fidelity.py [--encoder transformer] [--users 943]

For each user: the last --history events (ratings, in time order, titles as item texts) are
recorded, then one Rerank of --candidates items (the user's held-out last item plus random others,
all cached) is scored with the profile as stored today (L and S float64, history vectors float32),
and again with the same profile reduced the way a compact profile would store it:

- L and S rounded to float32 / float16 / bfloat16;
- hist16: the history vectors as a float16 shared catalog would give them back;
- both together.

Prints the largest score difference, the share of users whose ranking of the candidates is
identical, and the per-user bytes each variant implies for dim d (the layout in docs/experiments.md's
compact-profile note).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from reranker.config import Settings  # noqa: E402
from reranker.evaluation.convert_ml100k import load_events, load_items  # noqa: E402
from reranker.service import RerankService  # noqa: E402
from reranker.types import Candidate, Event, EventType, Item, RerankQuery  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ml-100k"


def bf16(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32).astype(np.float64)


def f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float16).astype(np.float64)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="fake")
    p.add_argument("--users", type=int, default=943)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--candidates", type=int, default=100)
    args = p.parse_args()
    items = dict(load_items(DATA))
    events = load_events(DATA)
    by_user: dict[str, list] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    users = sorted(by_user, key=lambda u: int(u))[: args.users]
    settings = Settings(encoder=args.encoder, fake_dim=384, metrics_address="", vector_history_size=args.history,
                        warmup=False)
    service = RerankService(settings)
    t = time.perf_counter()
    service.load()
    ids = list(items)
    for start in range(0, len(ids), 200):  # chunks: each within the encode deadline on a busy machine
        service.upsert_items([Item(i, items[i]) for i in ids[start : start + 200]], time_remaining=600.0)
    print(f"encoder {service.model_version}: {len(ids)} titles encoded in {time.perf_counter() - t:.1f} s")
    rng = np.random.default_rng(0)
    variants = {
        "L,S float32": lambda s: dataclasses.replace(s, long_term=f32(s.long_term), session=f32(s.session), derived={}),
        "L,S float16": lambda s: dataclasses.replace(s, long_term=f16(s.long_term), session=f16(s.session), derived={}),
        "L,S bfloat16": lambda s: dataclasses.replace(s, long_term=bf16(s.long_term), session=bf16(s.session), derived={}),
        "history float16": lambda s: dataclasses.replace(s, history=dataclasses.replace(
            s.history, vectors=s.history.vectors.astype(np.float16).astype(np.float32)), derived={}),
        "L,S float16 + history float16": lambda s: dataclasses.replace(
            s, long_term=f16(s.long_term), session=f16(s.session),
            history=dataclasses.replace(s.history, vectors=s.history.vectors.astype(np.float16).astype(np.float32)),
            derived={}),
    }
    worst = {name: 0.0 for name in variants}
    same = {name: 0 for name in variants}
    store = service.profiles
    assert store is not None
    original_get = store.get
    for u in users:
        history, target = by_user[u][:-1][-args.history :], by_user[u][-1]
        service.record_events([Event(f"u{u}", e.item_id, EventType.CLICK, e.timestamp, f"{u}-{k}")
                               for k, e in enumerate(history)])
        others = rng.choice(len(ids), args.candidates - 1, replace=False)
        cands = tuple(Candidate(i, 0.0) for i in [target.item_id, *[ids[k] for k in others if ids[k] != target.item_id]])
        query = RerankQuery(f"u{u}", cands[: args.candidates])
        store.get = original_get  # type: ignore[method-assign]
        base = {it.item_id: it.score for it in service.rerank(query).items}
        base_order = sorted(base, key=lambda i: -base[i])
        for name, reduce in variants.items():
            store.get = lambda user_id, recent=True, _r=reduce: (  # type: ignore[method-assign]
                None if (s := original_get(user_id, recent=recent)) is None else _r(s))
            got = {it.item_id: it.score for it in service.rerank(query).items}
            worst[name] = max(worst[name], max(abs(got[i] - base[i]) for i in base))
            same[name] += sorted(got, key=lambda i: -got[i]) == base_order
    store.get = original_get  # type: ignore[method-assign]
    service.close()
    print(f"{len(users)} ml-100k users, last {args.history} ratings each, {args.candidates} candidates; encoder "
          f"{settings.encoder}")
    print("| profile stored as | largest score difference | users with the identical ranking |\n|---|---|---|")
    for name in variants:
        print(f"| {name} | {worst[name]:.2e} | {same[name]}/{len(users)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
