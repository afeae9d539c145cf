"""Rerank orders of every ml-100k user, written to a file, for a before/after comparison of a
change to the scoring code (float operation order): run it with PYTHONPATH at each checkout, then
`--compare A B` reports the largest score difference and every list whose order differs.

    PYTHONPATH=/tmp/before python experiments/rerank_orders.py --out /tmp/before.npz
    PYTHONPATH=$PWD python experiments/rerank_orders.py --out /tmp/after.npz
    python experiments/rerank_orders.py --compare /tmp/before.npz /tmp/after.npz

Each user's events but the last two are recorded (so profiles have history, a session and
consumed items); the list is 200 catalog items drawn per user (seeded), a third of them from the
user's own history (the leave-one-out path), with random upstream scores. The service is the
in-process RerankService with the fixed blend (and attention) of the default settings; `--encoder
transformer` uses the packaged model (vectors are cached in `--vectors`), `fake` the hashed words.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


class _Precomputed:
    """An encoder that answers from vectors computed once (so both runs see the same vectors)."""

    def __init__(self, texts: list[str], vectors: np.ndarray, version: str) -> None:
        self._row = {t: i for i, t in enumerate(texts)}
        self._vectors = vectors
        self.dim = vectors.shape[1]
        self.version = version

    def encode(self, texts: list[str]) -> np.ndarray:
        from reranker.model.encoder import FakeEncoder

        out = FakeEncoder(self.dim).encode(texts)  # texts outside the catalog (the warm-up)
        known = [i for i, t in enumerate(texts) if t in self._row]
        out[known] = self._vectors[[self._row[texts[i]] for i in known]]
        return out


def _read(data: Path) -> tuple[dict[str, str], dict[str, list[tuple[float, str]]]]:
    items: dict[str, str] = {}
    with (data / "ml-100k.item").open(encoding="latin-1") as fh:
        next(fh)
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            items[parts[0]] = f"{parts[1]} ({parts[2]}) {parts[3] if len(parts) > 3 else ''}".strip()
    events: dict[str, list[tuple[float, str]]] = defaultdict(list)
    with (data / "ml-100k.inter").open() as fh:
        next(fh)
        for line in fh:
            user, item, _, ts = line.split("\t")
            events[user].append((float(ts), item))
    for user in events:
        events[user].sort()
    return items, events


def run(args: argparse.Namespace) -> None:
    from reranker.config import Settings
    from reranker.model.encoder import FakeEncoder
    from reranker.service import RerankService
    from reranker.types import CandidateColumns, Event, Item, RerankQuery

    items, events = _read(Path(args.data))
    ids = sorted(items, key=int)
    texts = [items[i] for i in ids]
    if args.encoder == "fake":
        encoder: object = FakeEncoder(384)
    else:
        path = Path(args.vectors)
        if not path.exists():
            from reranker.model.loader import load_encoder

            model = load_encoder(Settings().model)
            np.save(path, np.asarray(model.encode(texts), dtype=np.float32))
            version = model.version
        else:
            version = "precomputed"
        encoder = _Precomputed(texts, np.load(path), version)
    settings = Settings(encoder="fake", fake_dim=encoder.dim, metrics_address="")  # type: ignore[attr-defined]
    service = RerankService(settings, encoder)  # type: ignore[arg-type]
    service.load()
    service.upsert_items([Item(i, t) for i, t in zip(ids, texts)])
    users = sorted(events, key=int)
    for user in users:
        history = events[user][:-2]
        service.record_events([Event(user, item, timestamp=ts) for ts, item in history])
    orders, scores, semantic = [], [], []
    for u, user in enumerate(users):
        rng = np.random.default_rng(u)
        own = sorted({item for _, item in events[user]}, key=int)
        mine = rng.choice(own, size=min(len(own), 66), replace=False).tolist()
        rest = [i for i in rng.choice(ids, size=400, replace=False).tolist() if i not in set(mine)]
        chosen = (mine + rest)[:200]
        rng.shuffle(chosen)
        upstream = rng.random(len(chosen))
        query = RerankQuery(user, CandidateColumns(chosen, upstream, [None] * len(chosen)))
        result = service.rerank(query)
        ranked = result.items
        orders.append(np.array([int(i) for i in ranked.item_ids], dtype=np.int64))  # type: ignore[attr-defined]
        scores.append(np.asarray(ranked.scores))  # type: ignore[attr-defined]
        semantic.append(np.asarray(ranked.semantic_scores))  # type: ignore[attr-defined]
    np.savez(args.out, users=np.array(users), orders=np.array(orders, dtype=object), scores=np.array(scores, dtype=object),
             semantic=np.array(semantic, dtype=object))
    print(f"{len(users)} users ranked -> {args.out}")


def compare(a: str, b: str) -> int:
    x, y = np.load(a, allow_pickle=True), np.load(b, allow_pickle=True)
    differ = [u for u, (p, q) in enumerate(zip(x["orders"], y["orders"])) if not np.array_equal(p, q)]
    score = max(float(np.abs(p - q).max()) for p, q in zip(x["scores"], y["scores"]))
    sem = max(float(np.abs(p - q).max()) for p, q in zip(x["semantic"], y["semantic"]))
    print(f"users {len(x['orders'])}, lists whose order differs {len(differ)}, max |final score diff| {score:.3g}, "
          f"max |semantic diff| {sem:.3g}")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="where this checkout's orders go (.npz)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--encoder", choices=("transformer", "fake"), default="transformer")
    parser.add_argument("--vectors", default="/tmp/ml100k_vectors.npy", help="cache of the packaged model's vectors")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
