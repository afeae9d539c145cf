"""Drives a real reranker gRPC server through an offline evaluation.

1. Read items/events (and candidates), split leave-last-out.
2. Build candidate lists: from candidates.tsv, or per built-in retriever fitted on histories only
   (and/or the LLMRank `sampled` protocol: target + random negatives).
3. Start a server in-process on 127.0.0.1:0 with the given settings, or connect to `--address`.
4. UpsertItems every item text once, RecordEvents every evaluated user's history (never the
   target), then one Rerank per user and list, timing each call.
5. Metrics for the upstream order and the server's order, plus latency, variants, model version.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from reranker.config import Settings
from reranker.evaluation import formats, retrievers
from reranker.evaluation.metrics import MetricAccumulator, ndcg_ratio, percentiles
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

Progress = Callable[[str, int, int], None]
BATCH = 500  # items / events per write RPC (under the default max_events_per_request of 1000)


@dataclass(frozen=True)
class EvalConfig:
    items: Path
    events: Path
    candidates: Path | None = None
    retrievers: tuple[str, ...] = retrievers.RETRIEVERS
    num_candidates: tuple[int, ...] = (100,)
    sampled_negatives: int = 19
    max_users: int = 0  # 0 = all users
    address: str = ""  # empty = start a server in-process
    seed: int = 0
    include_seen: bool = False  # built-in retrievers keep the user's consumed items, as real upstreams do
    k: int = 10
    rpc_timeout_s: float = 30.0


@dataclass
class ListSet:
    name: str
    lists: dict[str, list[formats.CandidateRow]]
    labelled: bool = False
    num_candidates: int = 0


@dataclass
class EvalData:
    items: dict[str, str]
    split: formats.Split
    users: list[str]
    list_sets: list[ListSet] = field(default_factory=list)


def _candidates_file_list_set(cfg: EvalConfig, data: EvalData) -> None:
    """The lists of `cfg.candidates`, for the users that have one (the only users evaluated then)."""
    rows = formats.read_candidates(cfg.candidates)
    lists = {u: rows[u] for u in data.users if rows.get(u)}
    labelled = any(r.label is not None for rs in lists.values() for r in rs)
    data.users = [u for u in data.users if u in lists]
    data.list_sets.append(ListSet(Path(cfg.candidates).stem, lists, labelled))


def _sampled_list_set(cfg: EvalConfig, data: EvalData, histories: dict[str, list[str]], catalog: list[str]) -> ListSet:
    """Each user's target among `cfg.sampled_negatives` items drawn at random (seeded)."""
    rng = np.random.default_rng(cfg.seed)
    index = {item: j for j, item in enumerate(catalog)}
    lists = {
        u: retrievers.sampled_candidates(
            histories[u], data.split.target[u].item_id, catalog, cfg.sampled_negatives, rng, index
        )
        for u in data.users
    }
    return ListSet(f"sampled-1+{cfg.sampled_negatives}", lists, num_candidates=cfg.sampled_negatives + 1)


def _retriever_list_sets(
    name: str, cfg: EvalConfig, data: EvalData, histories: dict[str, list[str]], catalog: list[str],
    progress: Progress | None,
) -> list[ListSet]:
    """Retriever `name`'s top lists, fitted once, cut at each of `cfg.num_candidates`."""
    if progress:
        progress(f"fit {name}", 0, 1)
    fitted = retrievers.make_retriever(name, seed=cfg.seed).fit(histories, catalog)
    top = fitted.recommend(data.users, max(cfg.num_candidates), include_seen=cfg.include_seen)
    if progress:
        progress(f"fit {name}", 1, 1)
    sets = []
    for n in cfg.num_candidates:
        label = name if len(cfg.num_candidates) == 1 else f"{name}@{n}"
        sets.append(ListSet(label, {u: top[u][:n] for u in data.users if top[u]}, num_candidates=n))
    return sets


def load_data(cfg: EvalConfig, progress: Progress | None = None) -> EvalData:
    items = formats.read_items(cfg.items)
    split = formats.leave_last_out(formats.read_events(cfg.events))
    users = split.users[: cfg.max_users] if cfg.max_users > 0 else split.users
    data = EvalData(items, split, users)
    if cfg.candidates is not None:
        _candidates_file_list_set(cfg, data)
        return data
    histories = {u: [e.item_id for e in h] for u, h in split.history.items()}  # all users, targets excluded
    catalog = list(items)
    for name in cfg.retrievers:
        if name == retrievers.SAMPLED:
            data.list_sets.append(_sampled_list_set(cfg, data, histories, catalog))
        else:
            data.list_sets.extend(_retriever_list_sets(name, cfg, data, histories, catalog, progress))
    return data


def relevant_items(data: EvalData, list_set: ListSet, user: str) -> set[str]:
    if list_set.labelled:
        return {r.item_id for r in list_set.lists[user] if r.label == 1}
    return {data.split.target[user].item_id}


@contextmanager
def connect(cfg: EvalConfig, settings: Settings) -> Iterator[tuple[pb_grpc.RerankerServiceStub, str]]:
    """A stub to `cfg.address`, or to a fresh in-process server built from `settings`."""
    if cfg.address:
        with grpc.insecure_channel(cfg.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=cfg.rpc_timeout_s)
            yield pb_grpc.RerankerServiceStub(channel), cfg.address
        return
    from reranker.serving.server import build_server
    from reranker.service import RerankService

    # Loopback on a free port; no /metrics or health side listeners, no per-RPC access log lines.
    local = dataclasses.replace(settings, address="127.0.0.1:0", metrics_address="", health_address="", access_log=False)
    running = build_server(local, RerankService(local))
    try:
        running.loader.join()
        if not running.service.ready:
            raise RuntimeError(f"in-process server failed to load: {running.service.load_error}")
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb_grpc.RerankerServiceStub(channel), f"in-process 127.0.0.1:{running.port}"
    finally:
        running.stop(0)


def _chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def load_server_state(
    stub: pb_grpc.RerankerServiceStub, data: EvalData, max_text_chars: int, progress: Progress | None
) -> dict[str, int]:
    """UpsertItems all texts, then RecordEvents the evaluated users' histories (targets never sent)."""
    items = [pb.Item(item_id=i, text=t[:max_text_chars]) for i, t in data.items.items() if t]
    done = encoded = 0
    for chunk in _chunks(items, BATCH):
        encoded += stub.UpsertItems(pb.UpsertItemsRequest(items=chunk), timeout=600).encoded
        done += len(chunk)
        if progress:
            progress("upsert items", done, len(items))
    events = []
    for user in data.users:
        for i, e in enumerate(data.split.history[user]):
            msg = pb.Event(
                event_id=f"eval:{user}:{i}", user_id=user, item_id=e.item_id,
                type=int(formats.EVENT_TYPES[e.event_type]),
            )
            msg.timestamp.FromNanoseconds(int(max(e.timestamp, 1.0) * 1e9))
            events.append(msg)
    accepted = without_vector = done = 0
    for chunk in _chunks(events, BATCH):
        reply = stub.RecordEvents(pb.RecordEventsRequest(events=chunk), timeout=600)
        accepted += reply.accepted
        without_vector += reply.without_vector
        done += len(chunk)
        if progress:
            progress("record histories", done, len(events))
    return {"items": len(items), "encoded": encoded, "events": len(events), "accepted": accepted, "events_without_vector": without_vector}


def evaluate_list_set(
    stub: pb_grpc.RerankerServiceStub, data: EvalData, list_set: ListSet, cfg: EvalConfig, progress: Progress | None
) -> dict[str, Any]:
    upstream, reranked = MetricAccumulator(cfg.k), MetricAccumulator(cfg.k)
    latencies, server_ms = [], []
    variants: Counter[str] = Counter()
    cold = 0
    model_version = ""
    users = [u for u in data.users if u in list_set.lists]
    for n, user in enumerate(users, start=1):
        rows = list_set.lists[user]
        relevant = relevant_items(data, list_set, user)
        ids = [r.item_id for r in rows]
        consumed = {e.item_id for e in data.split.history.get(user, ())}
        upstream.add(ids, relevant, list_set.labelled, consumed)
        request = pb.RerankRequest(
            user_id=user,
            candidates=[pb.Candidate(item_id=r.item_id, score=r.score) for r in rows],
            request_id=f"eval:{list_set.name}:{user}",
        )
        started = time.perf_counter()
        reply = stub.Rerank(request, timeout=cfg.rpc_timeout_s)
        latencies.append(1000.0 * (time.perf_counter() - started))
        server_ms.append(reply.timing.total_ms)
        variants[pb.Variant.Name(reply.variant)] += 1
        cold += reply.cold_user
        model_version = reply.model_version
        reranked.add([it.item_id for it in reply.items], relevant, list_set.labelled, consumed)
        if progress and (n % 20 == 0 or n == len(users)):
            progress(f"rerank {list_set.name}", n, len(users))
    catalog = len(data.items)
    return {
        "num_candidates": list_set.num_candidates or None,
        "labelled": list_set.labelled,
        "users": len(users),
        "upstream": upstream.summary(catalog),
        "reranked": reranked.summary(catalog),
        # reranked / upstream NDCG@k, with a 95% paired bootstrap interval over users
        "ndcg_ratio": ndcg_ratio(upstream, reranked, seed=cfg.seed),
        "latency_ms": percentiles(latencies),
        "server_total_ms": percentiles(server_ms),
        "variants": dict(variants),
        "cold_users": cold,
        "model_version": model_version,
    }


def run(cfg: EvalConfig, settings: Settings, progress: Progress | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    data = load_data(cfg, progress)
    report: dict[str, Any] = {
        "config": {
            "items": str(cfg.items),
            "events": str(cfg.events),
            "candidates": None if cfg.candidates is None else str(cfg.candidates),
            "protocol": "leave-last-out" if cfg.candidates is None else "candidates file",
            "retrievers": [s.name for s in data.list_sets],
            "include_seen": cfg.include_seen,
            "users": len(data.users),
            "k": cfg.k,
            "seed": cfg.seed,
            "head_path": settings.ranking.head_path or None,
            "encoder": settings.model.encoder,
            "blend_weight": settings.ranking.blend_weight,
            "consumed_policy": settings.ranking.consumed_policy,
        },
        "results": {},
    }
    with connect(cfg, settings) as (stub, where):
        report["server"] = {"address": where}
        report["loaded"] = load_server_state(stub, data, settings.limits.max_text_chars, progress)
        for list_set in data.list_sets:
            report["results"][list_set.name] = evaluate_list_set(stub, data, list_set, cfg, progress)
    versions = {r["model_version"] for r in report["results"].values()}
    report["server"]["model_version"] = ", ".join(sorted(versions))
    report["elapsed_s"] = time.perf_counter() - started
    return report
