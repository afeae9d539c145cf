"""Offline check of the user-model settings on MovieLens 100K (next-item ranking by semantic score).

    python scripts/eval_user_model.py [--data ../shared/data/ml-100k] [--encoder transformer|fake]

For every user, events are replayed in time order (rating >= 4 -> like, 3 -> view, <= 2 ->
dislike) through the same pure functions the server uses (reranker/usermodel.py, scoring.py).
At each of the user's last `--targets` liked items the model ranks that item among `--negatives`
random items the user never rated, by semantic score alone (the upstream score is constant), and
HR@10 / NDCG@10 are averaged. Item text: "title (year). Genres: ...". The data is read in place
(never copied); item vectors are cached under /tmp.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reranker import scoring, usermodel  # noqa: E402
from reranker.config import Settings  # noqa: E402
from reranker.encoder import load_encoder  # noqa: E402

RATING_WEIGHT = {5: 2.0, 4: 2.0, 3: 0.5, 2: -1.5, 1: -1.5}  # like / view / dislike with default weights


def load(data: Path) -> tuple[dict[str, str], dict[str, list[tuple[float, str, int]]]]:
    texts = {}
    for line in (data / "ml-100k.item").read_text(encoding="utf-8").splitlines()[1:]:
        item_id, title, year, genres = line.split("\t")
        texts[item_id] = f"{title} ({year}). Genres: {genres}."
    users: dict[str, list[tuple[float, str, int]]] = {}
    for line in (data / "ml-100k.inter").read_text(encoding="utf-8").splitlines()[1:]:
        user, item, rating, ts = line.split("\t")
        users.setdefault(user, []).append((float(ts), item, int(float(rating))))
    for events in users.values():
        events.sort(key=lambda e: e[0])
    return texts, users


@dataclasses.dataclass(frozen=True)
class Config:
    session_mix: float
    attention_weight: float = 0.0
    temperature: float = 0.1
    session_size: int = 10
    history: int = 20


def evaluate(vectors: dict[str, np.ndarray], users: dict[str, list[tuple[float, str, int]]], configs: list[Config],
             targets: int, negatives: int, half_life: float, gap: float, seed: int = 0) -> dict[Config, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    all_items = np.array(sorted(vectors))
    matrix = np.stack([vectors[i] for i in all_items])
    index = {item: k for k, item in enumerate(all_items)}
    rate = usermodel.decay_rate(half_life)
    hits = {c: [] for c in configs}
    gains = {c: [] for c in configs}
    max_history = max(c.history for c in configs)
    for events in users.values():
        liked_positions = [k for k, e in enumerate(events) if e[2] >= 4 and k > 0][-targets:]
        seen = {e[1] for e in events}
        unseen = np.array([index[i] for i in all_items if i not in seen])
        long_term, ref, hist = np.zeros(matrix.shape[1]), 0.0, []
        k_done = 0
        for pos in liked_positions:
            for ts, item, rating in events[k_done:pos]:
                v = matrix[index[item]]
                ref = usermodel.fold(long_term, ref, not hist, ts, RATING_WEIGHT[rating], v, rate)
                hist.append((ts, item, RATING_WEIGHT[rating], v))
            k_done = pos
            recent = hist[-max_history:]
            cand = np.concatenate([[index[events[pos][1]]], rng.choice(unseen, negatives, replace=False)])
            cand_vectors = matrix[cand]
            for c in configs:
                rows = recent[-c.history:]
                history = usermodel.History(tuple(r[1] for r in rows), np.array([r[0] for r in rows]),
                                            np.array([r[2] for r in rows]), np.stack([r[3] for r in rows]))
                session = usermodel.session_vector(history, c.session_size, gap)
                user = usermodel.mix(long_term, session, c.session_mix)
                if user is None:
                    scores = np.zeros(len(cand))
                else:
                    scores = scoring.personal_semantic(
                        cand_vectors, np.ones(len(cand), bool), user, history.vectors,
                        usermodel.decayed_weights(history, ref, rate), attention_weight=c.attention_weight,
                        temperature=c.temperature,
                    )
                rank = int((scores > scores[0]).sum() + 0.5 * (scores == scores[0]).sum() - 0.5)
                hits[c].append(rank < 10)
                gains[c].append(1.0 / np.log2(rank + 2) if rank < 10 else 0.0)
    return {c: (float(np.mean(hits[c])), float(np.mean(gains[c]))) for c in configs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"))
    parser.add_argument("--encoder", default="transformer", choices=["transformer", "fake"])
    parser.add_argument("--targets", type=int, default=5)
    parser.add_argument("--negatives", type=int, default=99)
    parser.add_argument("--half-life-days", type=float, default=7.0)
    parser.add_argument("--gap-seconds", type=float, default=1800.0)
    args = parser.parse_args()
    texts, users = load(Path(args.data))
    cache = Path(f"/tmp/reranker-ml100k-{args.encoder}.npz")
    if cache.is_file():
        with np.load(cache) as f:
            ids, matrix = list(f["ids"]), f["vectors"]
    else:
        encoder = load_encoder(Settings(encoder=args.encoder))
        ids = sorted(texts)
        matrix = np.concatenate([encoder.encode([texts[i] for i in ids[k : k + 64]]) for k in range(0, len(ids), 64)])
        np.savez(cache, ids=np.array(ids), vectors=matrix)
    vectors = dict(zip(ids, matrix))
    configs = [Config(m) for m in (0.0, 0.25, 0.5, 0.75, 1.0)]
    configs += [Config(0.5, a, t) for a in (0.25, 0.5, 1.0) for t in (0.05, 0.1, 0.3)]
    configs += [Config(0.5, 0.0, 0.1, s) for s in (3, 5, 20)]
    results = evaluate(vectors, users, configs, args.targets, args.negatives, args.half_life_days * 86400.0,
                       args.gap_seconds)
    print("| session_mix | attention_weight | temperature | session_size | HR@10 | NDCG@10 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c, (hr, ndcg) in results.items():
        print(f"| {c.session_mix} | {c.attention_weight} | {c.temperature} | {c.session_size} | {hr:.4f} | {ndcg:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
