"""Does the compact profile layout rank like the full one? Measured on ml-100k through real RerankServices.

What it showed (docs/user-model.md): scores within 9.7e-7, 943/943 users ranked identically. The
full layout is gone since (`profile_layout=full` now means compact): its ml-100k rankings are frozen in
tests/data/ml100k_full_layout_rankings.npz and tests/test_profile_reference.py compares against them;
this script still compares two services, or a service with a small item cache (degradation).

    python experiments/compact_profile_fidelity.py [--encoder transformer|fake] [--history all|N] [--item-cache-size 300] [--redis]

Two RerankService instances, one per `profile_layout` (full = today's, compact), plus a third
compact one whose item cache (--item-cache-size) is too small to hold the users' history items
(graceful degradation: history rows whose vector is gone at read time simply do not count).
The 1682 titles are encoded once by the real encoder (--encoder, default the packaged
all-MiniLM-L6-v2) and every service gets the same vectors through a lookup-table encoder, so all
services hold bit-identical item vectors (a transformer's output for a text can move in the last
bits with the batch it was encoded in, which would blur a layout comparison); the catalog is
upserted into each service through `upsert_items`, and events and candidates carry their texts.

Every user's ratings but the last (--history all) or the last N before it are recorded through
`record_events` (CLICK events with event ids, in global time order, batches of 500). Then each
user gets one Rerank of --candidates items: the held-out last rating, 30 of the user's own recorded
items (the consumed-item / leave-one-out path; consumed_policy=learned demotes them for these
users, who never repeat): always the newest one (it dominates the session sum, so leaving it out is
the worst-conditioned case) and 29 random others; then random unrated items; in random order, all
with upstream score 0 (the order is the semantic score's alone: the strictest test). The same
candidates go to every service. Prints, per compared service against full: the largest |final score| and |semantic score|
difference over all users and candidates, the share of users whose whole ranking / top 10 is
identical, NDCG@10 of the held-out item under both and the paired difference with a 95% bootstrap
interval (over users). `--layouts full,full` is a self-check (must print zero differences). With
--redis the profiles live in a throw-away redis-server (one key prefix per service), not in process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Sequence

import numpy as np

from reranker.config import Settings
from reranker.evaluation.convert_ml100k import load_events, load_items
from reranker.model.encoder import Encoder
from reranker.model.loader import load_encoder
from reranker.service import RerankService
from reranker.tools.benches.profile_bytes import redis_server
from reranker.tools.harness import SHARED_DATA
from reranker.types import Candidate, Event, EventType, Item, RerankQuery, RerankResult


DATA = SHARED_DATA / "ml-100k"
OWN_CANDIDATES = 30  # of the user's own recorded items among the candidates
RECORD_BATCH = 500
K = 10


class TableEncoder:
    """The vectors an encoder gave once for a fixed set of texts; any other text goes to that encoder
    (counted in `fallbacks`: the runs here should never need it)."""

    def __init__(self, encoder: Encoder, texts: Sequence[str], batch: int = 64) -> None:
        self.dim, self.version, self._encoder = encoder.dim, encoder.version, encoder
        unique = list(dict.fromkeys(texts))
        vectors = [encoder.encode(unique[i : i + batch]) for i in range(0, len(unique), batch)]
        self._matrix = np.concatenate(vectors).astype(np.float32)
        self._row = {text: row for row, text in enumerate(unique)}
        self.fallbacks = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = [self._row.get(t, -1) for t in texts]
        out = self._matrix[np.maximum(rows, 0)]
        unknown = [i for i, row in enumerate(rows) if row < 0]
        if unknown:
            self.fallbacks += len(unknown)
            out[unknown] = self._encoder.encode([texts[i] for i in unknown])
        return out


def ndcg_at_k(result: RerankResult, target: str) -> float:
    ids = list(result.items.item_ids[:K])  # type: ignore[attr-defined]
    return 1.0 / math.log2(ids.index(target) + 2) if target in ids else 0.0


def swapped_gap(a: RerankResult, b: RerankResult) -> float:
    """The largest difference in `a`'s final score between two candidates that `a` and `b` order
    differently (0 when the rankings agree): below the score tolerance, every disagreement is a near-tie."""
    ids = list(a.items.item_ids)  # type: ignore[attr-defined]
    pos_b = {item_id: k for k, item_id in enumerate(b.items.item_ids)}  # type: ignore[attr-defined]
    rank_b = np.array([pos_b[i] for i in ids])
    scores = np.asarray(a.items.scores)  # type: ignore[attr-defined]
    swapped = np.triu(rank_b[:, None] > rank_b[None, :], 1)  # a puts i before j, b puts j before i
    return float(np.abs(scores[:, None] - scores[None, :])[swapped].max(initial=0.0))


def bootstrap_interval(diffs: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(rounds, len(diffs)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclasses.dataclass
class Arm:
    """One service under test and what it answered."""

    label: str
    service: RerankService
    record_seconds: float = 0.0
    results: list[RerankResult] = dataclasses.field(default_factory=list)
    missing_rows: int = 0  # history rows whose item was not in the item cache when the profile was read
    rows: int = 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="transformer", choices=("transformer", "fake"))
    p.add_argument("--history", default="all", help="`all` ratings but the held-out last, or only the last N of them")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--users", type=int, default=0, help="the first N users only (0 = all 943)")
    p.add_argument("--item-cache-size", type=int, default=300,
                   help="item cache of the degraded compact service (0 = leave that service out)")
    p.add_argument("--layouts", default="compact,compact", help="reference,compared layouts (labels; both compact now)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redis", action="store_true",
                   help="profiles in a throw-away redis-server (one key prefix per service) instead of in process")
    p.add_argument("--tolerance", type=float, default=1e-3, help="issue 19's target: scores within this of full's")
    args = p.parse_args()
    reference, compared = args.layouts.split(",")
    items = dict(load_items(DATA))
    by_user: dict[str, list] = {}
    for e in load_events(DATA):  # per user, in time order
        by_user.setdefault(e.user_id, []).append(e)
    users = sorted(by_user, key=int)[: args.users or None]
    keep = None if args.history == "all" else int(args.history)
    history = {u: by_user[u][:-1][-keep:] if keep else by_user[u][:-1] for u in users}
    target = {u: by_user[u][-1].item_id for u in users}

    base = dict(encoder=args.encoder, fake_dim=384, metrics_address="", warmup=False, log_level="WARNING",
                access_log=False, user_cache_size=max(10_000, 2 * len(users)), redis_timeout_ms=2000.0,
                redis_write_timeout_ms=10_000.0)
    started = time.perf_counter()
    table = TableEncoder(load_encoder(Settings(**base).model), list(items.values()))
    encode_seconds = time.perf_counter() - started
    services = [(reference, {}), (compared, {})]
    if args.item_cache_size:
        services.append((f"{compared}, item cache {args.item_cache_size}", {"item_cache_size": args.item_cache_size}))
    resources = contextlib.ExitStack()
    redis_url = resources.enter_context(redis_server()) if args.redis else ""
    arms = [Arm(label, RerankService(Settings(**base, **extra, profile_layout=label.split(",")[0], redis_url=redis_url,
                                              redis_prefix=f"fidelity{k}"), table))
            for k, (label, extra) in enumerate(services)]
    catalog = [Item(i, t) for i, t in items.items()]
    for arm in arms:
        arm.service.load()
        for start in range(0, len(catalog), 200):
            arm.service.upsert_items(catalog[start : start + 200], time_remaining=600.0)

    events = sorted(
        (Event(f"u{u}", e.item_id, EventType.CLICK, e.timestamp, f"{u}-{k}", items[e.item_id])
         for u in users for k, e in enumerate(history[u])),
        key=lambda e: e.timestamp,
    )  # a stable sort: a user's equal-time ratings keep their order
    for arm in arms:
        t = time.perf_counter()
        for start in range(0, len(events), RECORD_BATCH):
            result = arm.service.record_events(events[start : start + RECORD_BATCH], time_remaining=600.0)
            assert result.duplicates == 0 and result.without_vector == 0, result
        arm.record_seconds = time.perf_counter() - t

    rng = np.random.default_rng(args.seed)
    ids = list(items)
    full_store = arms[0].service.profiles
    assert full_store is not None
    for u in users:
        own = [i for i in dict.fromkeys(e.item_id for e in reversed(history[u])) if i != target[u]]  # newest first
        rated = {e.item_id for e in by_user[u]}
        older = own[1:]
        picked = own[:1] + [older[k] for k in rng.choice(len(older), min(OWN_CANDIDATES - 1, len(older)), replace=False)]
        others = [i for i in rng.permutation(ids).tolist() if i not in rated][: args.candidates - 1 - len(picked)]
        chosen = [target[u], *picked, *others]
        chosen = [chosen[k] for k in rng.permutation(len(chosen))]
        query = RerankQuery(f"u{u}", tuple(Candidate(i, 0.0, items[i]) for i in chosen))
        state = full_store.get(f"u{u}", recent=False)
        rows = [] if state is None else list(state.history.item_ids)
        for arm in arms:
            result = arm.service.rerank(query)
            assert result.variant.name == "RERANKED" and not result.cold_user, (arm.label, u, result)
            arm.results.append(result)
            cache = arm.service.items
            assert cache is not None
            arm.rows += len(rows)  # the cache as the profile read saw it: nothing ran since
            arm.missing_rows += sum(not cache.known(i) for i in rows)
    for arm in arms:
        failovers = getattr(arm.service.profiles, "failovers", 0)
        if failovers:
            raise SystemExit(f"{arm.label}: Redis failed {failovers} times (the in-process fallback answered): rerun")
        arm.service.close()
    resources.close()

    ref = arms[0]
    print(f"{len(users)} ml-100k users, {'all ratings but the last' if keep is None else f'the last {keep} ratings'} "
          f"recorded ({len(events):,} events), {args.candidates} candidates per user ({OWN_CANDIDATES} of them the "
          f"user's own), upstream scores 0; profiles {'in Redis' if args.redis else 'in process'}; encoder {table.version} ({len(ids)} titles encoded once in "
          f"{encode_seconds:.1f} s; {table.fallbacks} texts encoded outside the table)\n")
    print(f"| {ref.label} vs | largest score diff | scores off by > {args.tolerance:g} (users) | largest semantic diff | "
          f"identical ranking | identical top {K} | "
          f"largest score gap of a swapped pair | "
          f"NDCG@{K} {ref.label} | NDCG@{K} compared | difference [95% bootstrap] | history rows without a vector |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ref_ndcg = np.array([ndcg_at_k(r, target[u]) for r, u in zip(ref.results, users)])
    verdict = ""
    for arm in arms[1:]:
        worst_score = worst_semantic = worst_swap = 0.0
        same = same_top = off_users = off_scores = 0
        for a, b in zip(ref.results, arm.results):
            ia, ib = a.items, b.items
            sa = dict(zip(ia.item_ids, zip(ia.scores.tolist(), ia.semantic_scores.tolist())))  # type: ignore[attr-defined]
            sb = dict(zip(ib.item_ids, zip(ib.scores.tolist(), ib.semantic_scores.tolist())))  # type: ignore[attr-defined]
            diffs = [abs(sa[i][0] - sb[i][0]) for i in sa]
            worst_score = max(worst_score, max(diffs))
            off = sum(d > args.tolerance for d in diffs)
            off_users += off > 0
            off_scores += off
            worst_semantic = max(worst_semantic, max(abs(sa[i][1] - sb[i][1]) for i in sa))
            order_a, order_b = list(ia.item_ids), list(ib.item_ids)  # type: ignore[attr-defined]
            same += order_a == order_b
            same_top += order_a[:K] == order_b[:K]
            worst_swap = max(worst_swap, swapped_gap(a, b))
        ndcg = np.array([ndcg_at_k(r, target[u]) for r, u in zip(arm.results, users)])
        low, high = bootstrap_interval(ndcg - ref_ndcg, seed=args.seed)
        missing = f"{arm.missing_rows:,}/{arm.rows:,} ({100 * arm.missing_rows / max(arm.rows, 1):.1f}%)"
        n = len(users)
        print(f"| {arm.label} | {worst_score:.2e} | {off_scores:,} of {sum(len(r.items) for r in arm.results):,} "
              f"(in {off_users} of {len(users)} users) | {worst_semantic:.2e} | {same}/{n} ({100 * same / n:.1f}%) | "
              f"{same_top}/{n} ({100 * same_top / n:.1f}%) | {worst_swap:.2e} | {ref_ndcg.mean():.4f} | {ndcg.mean():.4f} | "
              f"{ndcg.mean() - ref_ndcg.mean():+.4f} [{low:+.4f}, {high:+.4f}] | {missing} |")
        if not verdict:  # the target is about the service with every item cached
            verdict = (f"- target (issue 19): {arm.label} scores within {args.tolerance:g} of {ref.label}'s with every "
                       f"item cached: {'met' if worst_score <= args.tolerance else 'MISSED'} (largest difference "
                       f"{worst_score:.2e}; rankings differ only by swaps of candidates whose scores are within "
                       f"{worst_swap:.2e})")
    print()
    print(verdict)
    for arm in arms:
        print(f"- {arm.label}: recorded {len(events):,} events in {arm.record_seconds:.1f} s "
              f"({len(events) / max(arm.record_seconds, 1e-9):,.0f} events/s; wall clock on a shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
