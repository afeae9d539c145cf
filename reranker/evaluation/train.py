"""`reranker train`: fit a ranking head on the histories of an events file (never on targets).

Simulation on histories only: for every user, the leave-last-out target of the events file is
dropped first (that is what `reranker eval` measures). Of the remaining history, the last
`labels_per_user` items are training labels (one list per label, each with the history before it)
and the events before the earliest of them are the training history:

1. Adapter: a low-rank residual map v -> v + (v @ down) @ up on the frozen item vectors, trained with a
   full-catalog softmax next-item objective on the training histories (context = mean of the
   last `session_length` adapted items; logit = cosine / T + learned item prior).
2. Collaborative tables (covisit, transition; see reranker.ranking.head) counted on the training histories.
3. Blend: for every user and label, candidates from each configured retriever fitted on the
   histories before that label; features exactly as the server computes them (reranker.ranking.head), from
   a profile store fed with that history; linear weights fitted with a listwise softmax loss.

A slice of the training users (by stable hash) is held out of step 3 to report validation numbers
(still on history labels, never eval targets); the final weights are then refitted on everyone.
The shipped artefact's popularity and collaborative tables are recounted on all histories.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from reranker.ranking import head as head_module
from reranker.config import Settings
from reranker.model.encoder import Encoder
from reranker.model.loader import load_encoder
from reranker.evaluation import formats, retrievers
from reranker.evaluation.metrics import MetricAccumulator
from reranker.evaluation.offline import gather_vectors
from reranker.users import profiles
from reranker.ranking import scoring
from reranker.users.compact import CompactProfileStore, table_lookup
from reranker.users.profiles import ProfileConfig
from reranker.types import Event, EventType

log = logging.getLogger(__name__)
T = TypeVar("T")

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainConfig:
    retrievers: tuple[str, ...] = retrievers.RETRIEVERS + (retrievers.SAMPLED,)
    num_candidates: int = 100
    sampled_negatives: int = 19
    adapter_epochs: int = 3
    adapter_rank: int = 64
    adapter_lr: float = 3e-3
    adapter_temperature: float = 0.05
    session_length: int = 10
    blend_steps: int = 300
    blend_l2: float = 1e-3
    validation_percent: float = 10.0
    neighbours: int = 50  # top-k neighbours kept per item in the covisit / transition tables
    transition_window: int = 10  # an item "follows" h when it comes at most this many events after h
    transition_decay: float = 0.8  # weight of a follower at gap g: decay ** (g - 1)
    history_length: int = 50  # newest history ids the collaborative features use (request time)
    history_decay: float = 0.8  # their weight: decay ** age (newest = 0)
    mf_factors: int = 32  # implicit-ALS factors for the mf_foldin feature (0 = off)
    adapter_negatives: int = 2048  # full softmax up to this many items, else this many sampled negatives
    adapter_examples: int = 100_000  # next-item examples per adapter epoch (a fresh random subset when more; 0 = all)
    include_seen: bool = True  # retriever training lists keep the users' consumed items, as real upstream lists do
    blend_users: int = 5000  # users whose lists and profiles the blend is fitted on (memory bound); 0 = all
    max_served_lists: int = 20_000  # served lists (--candidates) the blend is fitted on, a seeded sample; 0 = all
    labels_per_user: int = 1  # training lists per user and source: one per each of the last K history events
    seed: int = 0
    threads: int = 1  # torch threads; more than 1 is slower on a busy machine (spin-waiting)


def data_hash(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def encode_catalog(encoder: Encoder, texts: Sequence[str], batch: int = 64, progress: Progress | None = None) -> np.ndarray:
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    for start in range(0, len(texts), batch):
        out[start : start + batch] = encoder.encode(list(texts[start : start + batch]))
        if progress:
            progress("encode items", min(start + batch, len(texts)), len(texts))
    return out


def _is_validation(user_id: str, percent: float) -> bool:
    return int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:4], "big") % 10_000 < percent * 100


def popularity_table(histories: Mapping[str, Sequence[str]]) -> dict[str, float]:
    counts: dict[str, int] = {}
    for items in histories.values():
        for item in items:
            counts[item] = counts.get(item, 0) + 1
    top = max(counts.values(), default=1)
    return {item: float(np.log1p(c) / np.log1p(top)) for item, c in counts.items()}


def _top_k_triplets(
    rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (row, col, value) triplets among the k largest positive values of each row, sorted by row,
    then value descending (ties by column)."""
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(rows, rows)  # first position of each row's run (rows are sorted)
    keep = np.arange(rows.size) - starts < k
    return rows[keep], cols[keep], vals[keep]


def _top_k_rows(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int, k: int) -> head_module.NeighbourTable:
    """CSR of the k largest positive values per row from (row, col, value) triplets."""
    rows, cols, vals = _top_k_triplets(rows, cols, vals, k)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
    return head_module.NeighbourTable(indptr, cols.astype(np.int32), vals.astype(np.float32))


def item_graph(histories: Mapping[str, Sequence[str]], cfg: TrainConfig, block: int = 4096) -> head_module.ItemGraph:
    """The head's collaborative tables, counted on `histories` (per user, oldest first).

    covisit: cosine on the binary user x item matrix (scipy.sparse; item x item products in blocks
    of `block` items, each cut to its top k at once: memory ~ events + one block's co-occurrences),
    top-k per item. transition: weighted counts of (h -> item within `transition_window` events),
    divided by (h's total outgoing weight + 1), top-k per item.
    """
    ids = list(dict.fromkeys(i for h in histories.values() for i in h))
    n, k = len(ids), cfg.neighbours
    if n == 0:
        return head_module.ItemGraph()
    _, index, _, _, counts = retrievers.interaction_matrix(histories, ids)
    binary = retrievers.binary_matrix(counts)
    norm = 1.0 / np.sqrt(np.maximum(np.asarray(binary.sum(axis=0)).ravel(), 1.0))
    normalized = (binary @ sp.diags(norm.astype(np.float32))).tocsc()
    parts_r, parts_c, parts_v = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sim = (normalized[:, start:stop].T @ normalized).tocoo()
        rows = sim.row.astype(np.int64) + start
        off_diagonal = rows != sim.col
        top = _top_k_triplets(rows[off_diagonal], sim.col[off_diagonal].astype(np.int64), sim.data[off_diagonal], k)
        parts_r.append(top[0])
        parts_c.append(top[1])
        parts_v.append(top[2])
    covisit = _top_k_rows(np.concatenate(parts_r), np.concatenate(parts_c), np.concatenate(parts_v), n, k)

    seqs = [np.array([index[i] for i in h], dtype=np.int64) for h in histories.values()]
    flat = np.concatenate(seqs)
    owner = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    keys, weights = [], []
    for gap in range(1, cfg.transition_window + 1):
        same = owner[:-gap] == owner[gap:]
        a, b = flat[:-gap][same], flat[gap:][same]
        differ = a != b
        keys.append(a[differ] * n + b[differ])
        weights.append(np.full(int(differ.sum()), cfg.transition_decay ** (gap - 1)))
    keys_all = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    unique, inverse = np.unique(keys_all, return_inverse=True)
    summed = np.bincount(inverse, weights=np.concatenate(weights) if weights else None, minlength=unique.size)
    src, dst = unique // n, unique % n
    outgoing = np.bincount(src, weights=summed, minlength=n)
    transition = _top_k_rows(src, dst, summed / (outgoing[src] + 1.0), n, k)
    factors = np.zeros((n, 0), dtype=np.float32)
    if cfg.mf_factors > 0:
        als = retrievers.ImplicitALS(factors=cfg.mf_factors, seed=cfg.seed, threads=cfg.threads).fit(histories, ids)
        assert als.items == ids
        factors = als.item_factors.astype(np.float32)
    return head_module.ItemGraph(tuple(ids), covisit, transition, factors, alpha=10.0, reg=0.1)


def train_adapter(
    sequences: Sequence[Sequence[int]], vectors: np.ndarray, cfg: TrainConfig, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-item softmax; returns (adapter down d x r, up r x d, prior d).

    Over the whole catalog when it has at most `cfg.adapter_negatives` items; otherwise a sampled
    softmax: the target against `adapter_negatives` items drawn uniformly for the batch (shared),
    their logits corrected by log(n / K) (logQ: each sampled item stands for n / K of the catalog),
    accidental hits of the target masked. Per step it adapts only the rows the batch touches, so
    its cost does not grow with the catalog."""
    import torch

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    dim, window = vectors.shape[1], cfg.session_length
    # Every position t >= 1 of every sequence is a target; its context is seq[max(0, t - window):t],
    # left-aligned and padded with -1 (built with numpy: no Python list per position).
    lengths = np.array([len(seq) for seq in sequences], dtype=np.int64)
    flat = np.fromiter((i for seq in sequences for i in seq), dtype=np.int64, count=int(lengths.sum()))
    seq_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.flatnonzero(np.arange(flat.size) > seq_start)
    first = np.maximum(seq_start[positions], positions - window)
    columns = first[:, None] + np.arange(window)[None, :]
    contexts = np.where(columns < positions[:, None], flat[np.minimum(columns, flat.size - 1)], -1)
    targets = flat[positions]
    if not targets.size:
        zeros = np.zeros((dim, cfg.adapter_rank), dtype=np.float32)
        return zeros, zeros.T.copy(), np.zeros(dim, dtype=np.float32)
    ctx = torch.from_numpy(contexts)
    tgt = torch.from_numpy(targets)
    items = torch.from_numpy(np.vstack([vectors, np.zeros((1, dim), dtype=np.float32)]))  # row -1 = padding
    # Low-rank residual: adapted = v + (v @ down) @ up (cheap to train and to apply at request time).
    down = torch.nn.Parameter(torch.randn(dim, cfg.adapter_rank) * 0.01)
    up = torch.nn.Parameter(torch.zeros(cfg.adapter_rank, dim))
    prior = torch.nn.Parameter(torch.zeros(dim))
    optim = torch.optim.Adam([down, up, prior], lr=cfg.adapter_lr)
    n_items = vectors.shape[0]
    sampled = n_items > cfg.adapter_negatives
    log_q = math.log(n_items / cfg.adapter_negatives) if sampled else 0.0  # uniform proposal: q = K / n

    def adapt(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(v + (v @ down) @ up, dim=-1)

    batch = 1024
    step = 0
    per_epoch = min(len(targets), cfg.adapter_examples) if cfg.adapter_examples > 0 else len(targets)
    steps = cfg.adapter_epochs * ((per_epoch + batch - 1) // batch)
    for _ in range(cfg.adapter_epochs):
        perm = torch.randperm(len(targets))[:per_epoch]
        for start in range(0, per_epoch, batch):
            idx = perm[start : start + batch]
            c = ctx[idx]
            if sampled:
                # Only the distinct items this batch touches are adapted (contexts, targets, negatives):
                # 5-10x cheaper than adapting every context slot, and independent of the catalog size.
                valid = (c >= 0).unsqueeze(-1)
                t_idx = tgt[idx]
                negatives = torch.randint(0, n_items, (cfg.adapter_negatives,))
                touched, where = torch.unique(torch.cat([c.clamp(min=0).ravel(), t_idx, negatives]), return_inverse=True)
                adapted = adapt(items[touched])
                context = adapted[where[: c.numel()]].view(*c.shape, dim) * valid
                target_vecs = adapted[where[c.numel() : c.numel() + len(t_idx)]]
                negative_vecs = adapted[where[c.numel() + len(t_idx) :]]
                pooled = context.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                positive = (pooled * target_vecs).sum(-1) / cfg.adapter_temperature + target_vecs @ prior
                negative = pooled @ negative_vecs.T / cfg.adapter_temperature + negative_vecs @ prior + log_q
                negative = negative.masked_fill(negatives[None, :] == t_idx[:, None], -torch.inf)
                logits = torch.cat([positive.unsqueeze(-1), negative], dim=1)
                loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(idx), dtype=torch.long))
            else:
                adapted = adapt(items)
                adapted = torch.cat([adapted[:-1], torch.zeros(1, dim)])
                pooled = adapted[c].sum(dim=1) / (c >= 0).sum(dim=1, keepdim=True).clamp(min=1)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                catalog = adapted[:-1]
                logits = pooled @ catalog.T / cfg.adapter_temperature + catalog @ prior
                loss = torch.nn.functional.cross_entropy(logits, tgt[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
            step += 1
            if progress:
                progress(f"adapter (loss {loss.item():.3f})", step, steps)
    return (
        down.detach().numpy().astype(np.float32),
        up.detach().numpy().astype(np.float32),
        prior.detach().numpy().astype(np.float32),
    )


def fit_blend(
    lists: Sequence[np.ndarray], labels: Sequence[int], cfg: TrainConfig, progress: Progress | None = None
) -> np.ndarray:
    """Linear weights on standardized features minimizing the listwise softmax loss of the label (+ L2).

    Plain numpy full-batch Adam: the problem is tiny (lists x candidates x features).
    """
    longest = max(x.shape[0] for x in lists)
    f = lists[0].shape[1]
    x = np.zeros((len(lists), longest, f))
    mask = np.zeros((len(lists), longest), dtype=bool)
    for i, feats in enumerate(lists):
        x[i, : feats.shape[0]] = feats
        mask[i, : feats.shape[0]] = True
    y = np.asarray(labels)
    rows = np.arange(len(lists))
    w = np.zeros(f)
    m = np.zeros(f)
    v = np.zeros(f)
    lr, beta1, beta2 = 0.05, 0.9, 0.999
    for step in range(1, cfg.blend_steps + 1):
        logits = np.where(mask, x @ w, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.log(p[rows, y] + 1e-12).mean() + cfg.blend_l2 * w @ w)
        grad = np.einsum("ln,lnf->f", p, x) / len(lists) - x[rows, y].mean(axis=0) + 2 * cfg.blend_l2 * w
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        w -= lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + 1e-8)
        if progress and (step % 20 == 0 or step == cfg.blend_steps):
            progress(f"blend (loss {loss:.3f})", step, cfg.blend_steps)
    return w


@dataclass(frozen=True)
class LabelledServedLists:
    """Served lists with their labels: `lists` holds (list, index of its label in its user's
    timeline); `timelines` every event of those users, sorted by time (stable); `earliest` per
    user (index of the earliest label, its time); `skipped` counts lists left out and why."""

    lists: list[tuple[formats.ServedList, int]]
    timelines: dict[str, list[formats.Interaction]]
    earliest: dict[str, tuple[int, float]]
    skipped: dict[str, int]


def label_served_lists(
    served_lists: Sequence[formats.ServedList], events: Sequence[formats.Interaction]
) -> LabelledServedLists:
    """Label each served list with its user's first event at or after the list's timestamp (no
    timestamp: the user's last event); lists with no such event, or no event before it, are skipped."""
    wanted = {sl.user_id for sl in served_lists}
    timelines: dict[str, list[formats.Interaction]] = {}
    for e in events:
        if e.user_id in wanted:
            timelines.setdefault(e.user_id, []).append(e)
    for timeline in timelines.values():
        timeline.sort(key=lambda e: e.timestamp)  # stable: equal times keep file order (as leave_last_out)
    times = {u: [e.timestamp for e in t] for u, t in timelines.items()}
    out: list[tuple[formats.ServedList, int]] = []
    earliest: dict[str, tuple[int, float]] = {}
    skipped = {"no_events": 0, "no_later_event": 0, "no_history": 0}
    for sl in served_lists:
        if sl.user_id not in timelines:
            skipped["no_events"] += 1
            continue
        at = len(times[sl.user_id]) - 1 if sl.timestamp is None else bisect.bisect_left(times[sl.user_id], sl.timestamp)
        if at >= len(times[sl.user_id]):
            skipped["no_later_event"] += 1
            continue
        if at == 0:
            skipped["no_history"] += 1
            continue
        out.append((sl, at))
        if sl.user_id not in earliest or at < earliest[sl.user_id][0]:
            earliest[sl.user_id] = (at, times[sl.user_id][at])
    return LabelledServedLists(out, timelines, earliest, skipped)


def _sample(items: Sequence[T], limit: int, seed: int) -> list[T]:
    """All of `items`, or a seeded random `limit` of them in their order (limit 0 = all)."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    picked = np.random.default_rng([seed, 2]).choice(len(items), size=limit, replace=False)
    return [items[j] for j in np.sort(picked)]


def _blend_users(history: Mapping[str, object], cfg: TrainConfig) -> list[str]:
    """All users in file order, or a seeded random `cfg.blend_users` of them (still in file order)."""
    users = list(history)
    if cfg.blend_users <= 0 or len(users) <= cfg.blend_users:
        return users
    picked = np.random.default_rng([cfg.seed, 1]).choice(len(users), size=cfg.blend_users, replace=False)
    return [users[j] for j in np.sort(picked)]


@dataclass(frozen=True)
class _Histories:
    """What `train` learns from: `split` (leave-last-out: the eval targets are dropped), `history` (the
    users whose cuts make retriever lists: at least two history events; none without retrievers),
    `train_hist` (item ids before each user's earliest label, for the adapter and the tables the
    training lists use) and `served` (the labelled served lists)."""

    split: formats.Split
    history: dict[str, list[formats.Interaction]]
    train_hist: dict[str, list[str]]
    served: LabelledServedLists


def _histories(
    events: Sequence[formats.Interaction], served_lists: Sequence[formats.ServedList], cfg: TrainConfig
) -> _Histories:
    """Cut k = 1..K: the label is the k-th last history event, the user's profile and candidates come
    from the events before it. The adapter, popularity and the collaborative tables used for the
    training lists are fitted on the events before the *earliest* label of each user (a cut or a
    served list's label), so no label is in them (just as no eval target is in the shipped artefact)."""
    split = formats.leave_last_out(events)  # the eval targets are dropped right here
    history = {u: split.history[u] for u in split.users if len(split.history[u]) >= 2} if cfg.retrievers else {}
    cuts = max(1, cfg.labels_per_user)
    served = label_served_lists(served_lists, events)
    train_hist = {u: [e.item_id for e in h[: len(h) - cuts if u in history else len(h)]] for u, h in split.history.items()}
    for u, (start, _) in served.earliest.items():
        train_hist[u] = [e.item_id for e in served.timelines[u][: min(start, len(split.history.get(u, [])))]]
    return _Histories(split, history, train_hist, served)


def _provisional_head(
    adapter: tuple[np.ndarray, np.ndarray, np.ndarray], train_hist: Mapping[str, Sequence[str]], encoder: Encoder,
    cfg: TrainConfig,
) -> head_module.RankingHead:
    """The head the training features are computed with: no weights yet, identity scaling (features are
    standardized later with statistics of the training lists)."""
    down, up, prior = adapter
    return head_module.RankingHead(
        weights=np.zeros(len(head_module.FEATURES)),
        mean=np.zeros(len(head_module.FEATURES)),
        std=np.ones(len(head_module.FEATURES)),
        adapter_down=down,
        adapter_up=up,
        prior=prior,
        popularity=popularity_table(train_hist),
        encoder_version=encoder.version,
        session_length=cfg.session_length,
        graph=item_graph(train_hist, cfg),
        history_length=cfg.history_length,
        history_decay=cfg.history_decay,
    )


@dataclass
class _TrainingLists:
    """The blend's training lists, featurized exactly as the server computes them: profiles built in
    `store` as the server builds them from RecordEvents, features from the provisional `head`."""

    settings: Settings
    store: CompactProfileStore
    head: head_module.RankingHead
    index: dict[str, int]
    vectors: np.ndarray
    features: list[np.ndarray] = field(default_factory=list)
    has_vector: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # position of the label in its list
    users: list[str] = field(default_factory=list)
    upstream: list[list[str]] = field(default_factory=list)  # each list's ids, in upstream order

    def feed(self, profile_id: str, events_before: Sequence[formats.Interaction]) -> None:
        """Record `events_before` into the profile `profile_id`."""
        pairs = []
        for e in events_before:
            j = self.index.get(e.item_id)
            event = Event(profile_id, e.item_id, EventType[e.event_type.upper()], e.timestamp)
            pairs.append((event, None if j is None else self.vectors[j]))
        self.store.apply(pairs, now=time.time())

    def feed_cuts(self, history: Mapping[str, Sequence[formats.Interaction]], users: Sequence[str], cuts: int) -> None:
        """One profile per user and cut k = 1..`cuts`, fed with the user's history before the cut."""
        for k in range(1, cuts + 1):
            for u in users:
                self.feed(f"{u}\x1f{k}", history[u][:-k])

    def add(self, profile_id: str, user: str, rows: Sequence[formats.CandidateRow], label: str) -> None:
        """Features of one training list exactly as the server computes them (first occurrences); a
        list without its label, or for a profile without a user vector, is left out."""
        keep = scoring.first_occurrences([r.item_id for r in rows])
        ids = [rows[i].item_id for i in keep]
        if label not in ids:
            return
        state = self.store.get(profile_id)
        user_vector = profiles.user_vector(state, self.settings.users)
        if state is None or user_vector is None:
            return
        cand_vectors, has_vector = gather_vectors(ids, self.index, self.vectors)
        seen = profiles.candidate_history(state, self.settings.users, ids, cand_vectors, has_vector, user_vector)
        upstream = np.array([rows[i].score for i in keep])
        self.features.append(self.head.features(
            ids, upstream, cand_vectors, has_vector, user_vector, profiles.positive_history(state),
            profiles.positive_history_ids(state), profiles.on_liked_rows(seen, state),
        ))
        self.has_vector.append(has_vector)
        self.labels.append(ids.index(label))
        self.users.append(user)
        self.upstream.append(ids)


def _add_served_lists(
    lists: _TrainingLists, served: LabelledServedLists, picked: Sequence[tuple[formats.ServedList, int]],
    progress: Progress | None,
) -> None:
    """One profile per served user, fed forward in time: each list is scored from the events before
    its label, then the profile moves on to the next list's label (no rebuild per list)."""
    fed: dict[str, int] = {}
    for n_list, (served_list, label_at) in enumerate(sorted(picked, key=lambda pair: (pair[0].user_id, pair[1])), 1):
        user = served_list.user_id
        lists.feed(f"{user}\x1fs", served.timelines[user][fed.get(user, 0) : label_at])
        fed[user] = label_at
        lists.add(f"{user}\x1fs", user, served_list.rows, served.timelines[user][label_at].item_id)
        if progress and (n_list % 200 == 0 or n_list == len(picked)):
            progress("features (served lists)", n_list, len(picked))


def _retriever_candidates(
    name: str, cut_hist: Mapping[str, Sequence[str]], labels: Mapping[str, str], catalog: Sequence[str],
    index: Mapping[str, int], cfg: TrainConfig, rng: np.random.Generator,
) -> Mapping[str, Sequence[formats.CandidateRow]]:
    """Candidates of retriever `name` (fitted on `cut_hist`) for the users of `labels`."""
    if name == retrievers.SAMPLED:
        return {
            u: retrievers.sampled_candidates(cut_hist[u], labels[u], catalog, cfg.sampled_negatives, rng, index)
            for u in labels
        }
    fitted = retrievers.make_retriever(name, seed=cfg.seed, threads=cfg.threads).fit(cut_hist, catalog)
    return fitted.recommend(list(labels), cfg.num_candidates, include_seen=cfg.include_seen)


def _add_retriever_lists(
    lists: _TrainingLists, history: Mapping[str, Sequence[formats.Interaction]], blend_users: Sequence[str],
    catalog: Sequence[str], cfg: TrainConfig, progress: Progress | None,
) -> None:
    """For every cut k and retriever of `cfg.retrievers`: one list per blend user, fitted on the
    histories before the cut, labelled with the k-th last history event."""
    rng = np.random.default_rng(cfg.seed)
    for k in range(1, max(1, cfg.labels_per_user) + 1):
        cut_hist = {u: [e.item_id for e in h[:-k]] for u, h in history.items() if len(h) > k}
        users = [u for u in blend_users if u in cut_hist]
        labels = {u: history[u][-k].item_id for u in users}
        for name in cfg.retrievers:
            cands = _retriever_candidates(name, cut_hist, labels, catalog, lists.index, cfg, rng)
            for n_done, u in enumerate(users, start=1):
                lists.add(f"{u}\x1f{k}", u, cands[u], labels[u])
                if progress and n_done % 50 == 0:
                    progress(f"features ({name}, label {k})", n_done, len(users))


def _validation_metrics(
    lists: _TrainingLists, std_lists: Sequence[np.ndarray], val_idx: Sequence[int], weights: np.ndarray
) -> dict[str, object]:
    """NDCG@10 of the upstream order and of the head (weights fitted without these lists) on the
    validation lists; empty without validation lists."""
    if not val_idx:
        return {}
    up, rr = MetricAccumulator(), MetricAccumulator()
    for i in val_idx:
        ids, label = lists.upstream[i], {lists.upstream[i][lists.labels[i]]}
        up.add(ids, label)
        order = np.argsort(-(std_lists[i] @ weights), kind="stable")
        rr.add([ids[j] for j in order], label)
    return {
        "lists": len(val_idx),
        "upstream_ndcg@10": up.summary(1)["ndcg@10"],
        "head_ndcg@10": rr.summary(1)["ndcg@10"],
    }


def _fit_weights(
    lists: _TrainingLists, std_lists: Sequence[np.ndarray], cfg: TrainConfig, progress: Progress | None
) -> tuple[np.ndarray, dict[str, object]]:
    """The blend weights, fitted on every list, and the validation metrics of weights fitted without
    the validation users' lists (a stable hash picks them; when it picks everyone, all lists train)."""
    is_val = [_is_validation(u, cfg.validation_percent) for u in lists.users]
    train_idx = [i for i, v in enumerate(is_val) if not v] or list(range(len(std_lists)))
    val_idx = [i for i, v in enumerate(is_val) if v]
    w_train = fit_blend([std_lists[i] for i in train_idx], [lists.labels[i] for i in train_idx], cfg, progress)
    validation = _validation_metrics(lists, std_lists, val_idx, w_train)
    return fit_blend(std_lists, lists.labels, cfg, progress), validation


def train(
    items: Mapping[str, str],
    events: Sequence[formats.Interaction],
    settings: Settings,
    cfg: TrainConfig = TrainConfig(),
    *,
    encoder: Encoder | None = None,
    data_id: str = "",
    progress: Progress | None = None,
    served_lists: Sequence[formats.ServedList] = (),
) -> tuple[head_module.RankingHead, dict[str, object]]:
    """Train a head; returns it and a report (timings, validation metrics on history labels).

    `served_lists` are the deployment's own upstream lists (`reranker train --candidates`): each
    is labelled with its user's first event at or after the list's timestamp (without one: the
    user's last event) and scored from the events before that label. They train alongside the
    lists of `cfg.retrievers` (which may be empty)."""
    started = time.perf_counter()
    encoder = encoder or load_encoder(settings.model)
    hists = _histories(events, served_lists, cfg)
    history, served = hists.history, hists.served
    cuts = max(1, cfg.labels_per_user)

    catalog = list(items)
    index = {item: j for j, item in enumerate(catalog)}
    vectors = encode_catalog(encoder, [items[i] for i in catalog], progress=progress)
    timings = {"encode_s": time.perf_counter() - started}

    t = time.perf_counter()
    sequences = [[index[i] for i in seq if i in index] for seq in hists.train_hist.values()]
    adapter = train_adapter(sequences, vectors, cfg, progress)
    timings["adapter_s"] = time.perf_counter() - t

    # Profiles exactly as the server builds them from RecordEvents (one profile per user and cut), for
    # the users the blend is fitted on (at most cfg.blend_users: the profiles and the feature lists
    # are what grows with users; the retrievers still learn from everyone's history).
    t = time.perf_counter()
    blend_users = _blend_users(history, cfg)
    store = CompactProfileStore(
        ProfileConfig.from_settings(settings.users, encoder.dim), table_lookup(index, vectors),
        max_users=max(1, len(blend_users) * 2 * cuts + len(served.timelines)),
        ttl_seconds=settings.users.user_ttl_seconds,
    )
    provisional = _provisional_head(adapter, hists.train_hist, encoder, cfg)
    lists = _TrainingLists(settings, store, provisional, index, vectors)
    lists.feed_cuts(history, blend_users, cuts)
    picked = _sample(served.lists, cfg.max_served_lists, cfg.seed)
    _add_served_lists(lists, served, picked, progress)
    served_used = len(lists.features)
    _add_retriever_lists(lists, history, blend_users, catalog, cfg, progress)
    timings["features_s"] = time.perf_counter() - t
    if not lists.features:
        raise ValueError("no training list contains its label: too little history to train a head")

    stacked = np.vstack(lists.features)
    base = dict(provisional.__dict__)
    base.update(mean=stacked.mean(axis=0), std=np.maximum(stacked.std(axis=0), 1e-6))
    scaled_head = head_module.RankingHead(**base)
    std_lists = [scaled_head.standardize(x, h) for x, h in zip(lists.features, lists.has_vector)]

    t = time.perf_counter()
    weights, validation = _fit_weights(lists, std_lists, cfg, progress)
    timings["blend_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    t = time.perf_counter()
    full_history = {u: [e.item_id for e in h] for u, h in hists.split.history.items()}
    graph = item_graph(full_history, cfg)
    timings["final_tables_s"] = time.perf_counter() - t
    base.update(
        weights=weights,
        popularity=popularity_table(full_history),
        graph=graph,
        meta={
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "training_data": data_id,
            "retrievers": list(cfg.retrievers),
            "num_candidates": cfg.num_candidates,
            "training_users": len(history),
            "blend_users": len(blend_users),
            "include_seen": cfg.include_seen,
            "training_lists": len(std_lists),
            "served_lists": {"given": len(served_lists), "labelled": len(served.lists), "sampled": len(picked),
                             "used": served_used,
                             "skipped": served.skipped},
            "labels_per_user": cuts,
            "neighbours": cfg.neighbours,
            "transition_window": cfg.transition_window,
            "transition_decay": cfg.transition_decay,
            "weights": dict(zip(head_module.FEATURES, np.round(weights, 4).tolist())),
            "validation_on_history_labels": validation,
        },
    )
    trained = head_module.RankingHead(**base)
    report = {"version": trained.version, "timings": timings, **trained.meta}
    return trained, report
