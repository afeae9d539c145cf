"""Offline check of the user-model settings on MovieLens 100K (next-item ranking by semantic score).

    python experiments/eval_user_model.py [--data ../shared/data/ml-100k] [--encoder transformer|fake] [--split validation|test]

For every user, events are replayed in time order (rating >= 4 -> like, 3 -> view, <= 2 ->
dislike) through the same pure functions the server uses (reranker/users/usermodel.py, scoring.py).
At each of the user's last `--targets` liked items the model ranks that item among `--negatives`
random items the user never rated, by semantic score alone (the upstream score is constant), and
HR@10 / NDCG@10 are averaged. Item text: "title (year). Genres: ...". The data is read in place
(never copied); item vectors are cached under /tmp. `--split validation` ranks the 5 liked items
before those instead (for choosing settings); `test` (the default) is for reporting.

`session_half_life` is the session model since issue 17 (an exponentially decayed sum, see
usermodel.py); 0 selects the earlier model for comparison: the newest `session_size` events with no
pause over `--gap-seconds` between two of them (one out-of-order event could bridge a pause).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from reranker.config import Settings
from reranker.model.loader import load_encoder
from reranker.ranking import scoring
from reranker.users import usermodel


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
    session_size: int = 10  # only with session_half_life = 0 (the earlier windowed session)
    history: int = 20
    session_half_life: float = 1800.0


def window_session(history: usermodel.History, size: int, gap_seconds: float) -> np.ndarray:
    """The session vector before issue 17: the newest `size` events with no pause over `gap_seconds`."""
    times, n = history.timestamps, len(history)
    start = n - 1 if n else 0
    while start > 0 and n - start < size and times[start] - times[start - 1] <= gap_seconds:
        start -= 1
    rows = history.vectors[start:].astype(np.float64)
    return history.weights[start:] @ rows if len(rows) else np.zeros(history.vectors.shape[1])


def evaluate(vectors: dict[str, np.ndarray], users: dict[str, list[tuple[float, str, int]]], configs: list[Config],
             targets: int, negatives: int, half_life: float, gap: float, seed: int = 0,
             skip_last: int = 0) -> dict[Config, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    all_items = np.array(sorted(vectors))
    matrix = np.stack([vectors[i] for i in all_items])
    index = {item: k for k, item in enumerate(all_items)}
    rate = usermodel.decay_rate(half_life)
    hits = {c: [] for c in configs}
    gains = {c: [] for c in configs}
    max_history = max(c.history for c in configs)
    session_half_lives = sorted({c.session_half_life for c in configs if c.session_half_life})
    for events in users.values():
        liked = [k for k, e in enumerate(events) if e[2] >= 4 and k > 0]
        liked_positions = liked[: len(liked) - skip_last][-targets:] if skip_last else liked[-targets:]
        seen = {e[1] for e in events}
        unseen = np.array([index[i] for i in all_items if i not in seen])
        long_term, ref, hist = np.zeros(matrix.shape[1]), 0.0, []
        sessions = {h: np.zeros(matrix.shape[1]) for h in session_half_lives}
        scratch = np.zeros(matrix.shape[1])
        k_done = 0
        for pos in liked_positions:
            for ts, item, rating in events[k_done:pos]:
                v = matrix[index[item]]
                for h, session in sessions.items():  # the server's fold, one session sum per half-life
                    usermodel.fold(scratch, ref, not hist, ts, RATING_WEIGHT[rating], v, rate, session,
                                   usermodel.decay_rate(h))
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
                if c.session_half_life:
                    session = sessions[c.session_half_life]
                else:
                    session = window_session(history, c.session_size, gap)
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
    parser.add_argument("--gap-seconds", type=float, default=1800.0, help="pause that ends a session_half_life=0 session")
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    args = parser.parse_args()
    texts, users = load(Path(args.data))
    cache = Path(f"/tmp/reranker-ml100k-{args.encoder}.npz")
    if cache.is_file():
        with np.load(cache) as f:
            ids, matrix = list(f["ids"]), f["vectors"]
    else:
        encoder = load_encoder(Settings(encoder=args.encoder).model)
        ids = sorted(texts)
        matrix = np.concatenate([encoder.encode([texts[i] for i in ids[k : k + 64]]) for k in range(0, len(ids), 64)])
        np.savez(cache, ids=np.array(ids), vectors=matrix)
    vectors = dict(zip(ids, matrix))
    configs = [Config(m) for m in (0.0, 0.25, 0.5, 0.75, 1.0)]
    configs += [Config(0.5, a, t) for a in (0.25, 0.5, 1.0) for t in (0.05, 0.1, 0.3)]
    configs += [Config(m, 0.5, 0.1, session_half_life=h) for m in (0.5, 1.0) for h in (300.0, 1800.0, 7200.0, 86400.0)]
    configs += [Config(m, a, 0.1, session_half_life=0.0) for m in (0.5, 1.0) for a in (0.0, 0.5)]  # before issue 17
    results = evaluate(vectors, users, configs, args.targets, args.negatives, args.half_life_days * 86400.0,
                       args.gap_seconds, skip_last=args.targets if args.split == "validation" else 0)
    print("| session_mix | attention_weight | temperature | session | HR@10 | NDCG@10 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for c, (hr, ndcg) in results.items():
        session = f"half-life {c.session_half_life:g} s" if c.session_half_life else f"window {c.session_size}"
        print(f"| {c.session_mix} | {c.attention_weight} | {c.temperature} | {session} | {hr:.4f} | {ndcg:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
