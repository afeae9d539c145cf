"""Instructions per warm Rerank, in process, counted by valgrind's callgrind: a steady measure
for small hot-path changes (wall time on a shared machine drifts up to 2x; instruction counts
move by well under 1%).

For each candidate form it runs the same script twice under callgrind, once with `--requests`
calls and once with `--requests * 2`, and reports the difference divided by `--requests`: setup,
imports and warm-up cancel out. One call = parse the serialized RerankRequest, convert it, rank
(RerankService.rerank with the fake encoder, every vector cached, a user with 5 clicks), encode
the response bytes: everything the servicer does, without gRPC.

    PYTHONPATH=$PWD python scripts/hot_path_instructions.py --candidates 500 --forms messages columns packed

`--edge` also runs each call through the handler layers the server wraps around Rerank (error
mapping, then observation: metrics and the access log) and the response serializer, as
servicer.add_to_server composes them, with the servicer driven without an event loop (a warm
Rerank never waits): `metrics` = access log off, `sampled` = on at the default share (0.01),
`every` = a JSON line per call (to /dev/null). Compare them with `--edge none` (the default).
Several edges are counted in one callgrind run on one service (dumped between the edges' calls:
`--dump-before=getppid`), so start-up is paid once.

With PYTHONPATH at another checkout (e.g. `git archive <commit> | tar -x -C /tmp/base`), the same
script counts that version's messages and columns forms, for a before/after comparison.

Needs valgrind on PATH. Instruction counts are not time (a cache miss costs no instructions):
compare forms and versions of the code with it, and measure latency with `reranker bench`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


EDGES = ("none", "metrics", "sampled", "every")


def _prepared(form: str, candidates: int, dim: int, edge: str = "none") -> tuple[object, list[bytes]]:
    from reranker.serving import convert
    from reranker.tools.bench import RerankWorkload, synthetic_titles
    from reranker.config import Settings
    from reranker.model.encoder import FakeEncoder
    from reranker.service import RerankService
    from reranker.types import Event, Item
    from reranker.v1 import reranker_pb2 as pb

    settings = Settings(encoder="fake", fake_dim=dim, metrics_address="", log_format="json")
    service = RerankService(settings, FakeEncoder(dim))
    service.load()
    try:
        workload = RerankWorkload(candidates, 1.0, max(2000, candidates), 50, synthetic_titles(2000), form=form)
    except TypeError:  # a version before the packed form (to compare against it): columns=bool
        workload = RerankWorkload(candidates, 1.0, max(2000, candidates), 50, synthetic_titles(2000), columns=form == "columns")  # type: ignore[call-arg]
    pool_id = getattr(workload, "pool_id", lambda k: f"item-{k}")
    # Under callgrind on a busy machine the 2,000 fake encodes can outlast the default 60 s write timeout.
    service.upsert_items([Item(i, t) for i, t in workload.pool_items()], time_remaining=3600.0)
    service.record_events([Event(f"user-{u}", pool_id((u * 7 + k) % 2000)) for u in range(50) for k in range(5)], time_remaining=3600.0)
    requests = [workload.request(0, i).SerializeToString() for i in range(20)]  # type: ignore[attr-defined]
    limits = convert.Limits.from_settings(settings.limits, settings.users)

    # Versions before them: rerank(may_block=False), and the answer's form in query.options.
    try_cached = getattr(service, "try_cached", None)
    rerank_request = getattr(convert, "rerank_request", None)

    def one(data: bytes) -> bytes:
        if rerank_request is not None:
            query, options = rerank_request(pb.RerankRequest.FromString(data), limits)
        else:
            query = convert.rerank_query(pb.RerankRequest.FromString(data), limits)  # type: ignore[attr-defined]
            options = query.options
        result = try_cached(query, None) if try_cached is not None else service.rerank(query, None, may_block=False)
        if getattr(options, "packed", False):
            return convert.encode_rerank_response(result, False, options).data
        return convert.encode_rerank_response(result, options.columns).data

    if edge == "all":  # every edge on this one service (--edge with several: one callgrind run)
        return {e: (one if e == "none" else _through_the_edge(service, settings, e)) for e in EDGES}, requests
    return (one if edge == "none" else _through_the_edge(service, settings, edge)), requests


def _through_the_edge(service: object, settings: object, edge: str) -> object:
    """One call as the server makes it: deserialize, guarded(observed(servicer.Rerank)), serialize."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from reranker.serving import convert
    from reranker.serving.errormapping import guarded
    from reranker.serving.logs import configure_logging
    from reranker.serving.observability import Observer
    from reranker.serving.servicer import RerankerServicer
    from reranker.v1 import reranker_pb2 as pb

    import random

    random.seed(0)  # the same access-log lines sampled in every run
    observability = settings.observability  # type: ignore[attr-defined]
    configure_logging(observability, stream=open(os.devnull, "w"))
    servicer = RerankerServicer(service, ThreadPoolExecutor(1))  # type: ignore[arg-type]
    observer_settings = dataclasses.replace(
        observability, access_log=edge in ("sampled", "every"), access_log_sample=1.0 if edge == "every" else 0.01,
    )
    handler = guarded(Observer(observer_settings, service.metrics).observed(servicer.Rerank, "Rerank", streaming=False),  # type: ignore[arg-type, attr-defined]
                      "Rerank", streaming=False)

    class Context:  # what the handlers read of a grpc.aio context on a warm call
        def time_remaining(self) -> None:
            return None

        def invocation_metadata(self) -> tuple[()]:
            return ()

    context = Context()

    def one(data: bytes) -> bytes:
        coro = handler(pb.RerankRequest.FromString(data), context)
        try:
            coro.send(None)
        except StopIteration as done:
            return convert.serialize_rerank_response(done.value)
        raise RuntimeError("a warm Rerank waited")

    return one


def _worker(form: str, candidates: int, dim: int, calls: int, edge: str = "none") -> None:
    one, requests = _prepared(form, candidates, dim, edge)
    for data in requests:  # warm-up: caches, memoized user values
        one(data)  # type: ignore[operator]
    for i in range(calls):
        one(requests[i % len(requests)])  # type: ignore[operator]


def _phases_worker(form: str, candidates: int, dim: int, calls: int, edges: list[str]) -> None:
    """Every edge on one service: `calls` calls each, a getppid() (a callgrind dump) between them."""
    ones, requests = _prepared(form, candidates, dim, "all")
    for edge in edges:  # warm-up: caches, memoized user values, every edge's series and labels
        for data in requests:
            ones[edge](data)  # type: ignore[index]
    for edge in edges:
        os.getppid()
        for i in range(calls):
            ones[edge](requests[i % len(requests)])  # type: ignore[index]
    os.getppid()


def _instructions_by_edge(form: str, candidates: int, dim: int, calls: int, edges: list[str]) -> dict[str, float]:
    """Instructions per call of each edge, from one callgrind run dumped between the edges' calls."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "valgrind", "--tool=callgrind", "--dump-before=getppid", f"--callgrind-out-file={tmp}/out",
            sys.executable, __file__, "--phases", form, str(candidates), str(dim), str(calls), *edges,
        ]
        subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True)
        parts: dict[int, int] = {}
        for path in os.listdir(tmp):
            text = open(os.path.join(tmp, path)).read()
            part, total = re.search(r"^part: (\d+)", text, re.M), re.search(r"^(?:summary|totals): (\d+)", text, re.M)
            if part and total:
                parts[int(part.group(1))] = int(total.group(1))
        # The last part runs from the last marker to the exit; the edges' parts come just before it.
        first = max(parts, default=0) - len(edges)
        if not all(first + k in parts for k in range(len(edges))) or first < 2:
            raise RuntimeError(f"callgrind dumps: parts {sorted(parts)} in {sorted(os.listdir(tmp))}")
    return {edge: parts[first + k] / calls for k, edge in enumerate(edges)}


def _instructions(form: str, candidates: int, dim: int, calls: int, edge: str = "none") -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable, __file__,
            "--worker", form, str(candidates), str(dim), str(calls), edge,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    if len(sys.argv) > 6 and sys.argv[1] == "--phases":
        _phases_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
        return 0
    if len(sys.argv) in (6, 7) and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), *sys.argv[6:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forms", nargs="+", default=["messages", "columns", "packed"])
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--dim", type=int, default=384, help="vector size (the packaged model's is 384)")
    parser.add_argument("--requests", type=int, default=100, help="calls counted (the run doubles them)")
    parser.add_argument(
        "--edge", nargs="+", choices=EDGES, default=["none"],
        help="none: the in-process call only; else also the server's handler layers, with the access log "
        "off (metrics), sampled at the default share (sampled) or on for every call (every)",
    )
    args = parser.parse_args()
    for form in args.forms:
        if len(args.edge) > 1:  # one run, dumped between the edges (start-up is counted once)
            for edge, count in _instructions_by_edge(form, args.candidates, args.dim, args.requests, args.edge).items():
                print(f"{form}: candidates={args.candidates} edge={edge} instructions_per_request={count:,.0f}", flush=True)
            continue
        for edge in args.edge:
            low = _instructions(form, args.candidates, args.dim, args.requests, edge)
            high = _instructions(form, args.candidates, args.dim, 2 * args.requests, edge)
            print(
                f"{form}: candidates={args.candidates} edge={edge} "
                f"instructions_per_request={(high - low) / args.requests:,.0f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
