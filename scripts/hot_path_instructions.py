"""Instructions per warm Rerank, in process, counted by valgrind's callgrind: a steady measure
for small hot-path changes (wall time on a shared machine drifts up to 2x; instruction counts
move by well under 1%).

For each candidate form it runs the same script twice under callgrind, once with `--requests`
calls and once with `--requests * 2`, and reports the difference divided by `--requests`: setup,
imports and warm-up cancel out. One call = parse the serialized RerankRequest, convert it, rank
(RerankService.rerank with the fake encoder, every vector cached, a user with 5 clicks), encode
the response bytes: everything the servicer does, without gRPC.

    PYTHONPATH=$PWD python scripts/hot_path_instructions.py --candidates 500 --forms messages columns packed

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


def _prepared(form: str, candidates: int, dim: int) -> tuple[object, list[bytes]]:
    from reranker.serving import convert
    from reranker.tools.bench import RerankWorkload, synthetic_titles
    from reranker.config import Settings
    from reranker.model.encoder import FakeEncoder
    from reranker.service import RerankService
    from reranker.types import Event, Item
    from reranker.v1 import reranker_pb2 as pb

    settings = Settings(encoder="fake", fake_dim=dim, metrics_address="")
    service = RerankService(settings, FakeEncoder(dim))
    service.load()
    try:
        workload = RerankWorkload(candidates, 1.0, max(2000, candidates), 50, synthetic_titles(2000), form=form)
    except TypeError:  # a version before the packed form (to compare against it): columns=bool
        workload = RerankWorkload(candidates, 1.0, max(2000, candidates), 50, synthetic_titles(2000), columns=form == "columns")  # type: ignore[call-arg]
    pool_id = getattr(workload, "pool_id", lambda k: f"item-{k}")
    # Under valgrind on a busy machine, encoding the pool takes minutes: no write deadline here.
    service.upsert_items([Item(i, t) for i, t in workload.pool_items()], 3600.0)
    service.record_events([Event(f"user-{u}", pool_id((u * 7 + k) % 2000)) for u in range(50) for k in range(5)])
    requests = [workload.request(0, i).SerializeToString() for i in range(20)]  # type: ignore[attr-defined]
    limits = convert.Limits.from_settings(settings)

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

    return one, requests


def _worker(form: str, candidates: int, dim: int, calls: int) -> None:
    one, requests = _prepared(form, candidates, dim)
    for data in requests:  # warm-up: caches, memoized user values
        one(data)  # type: ignore[operator]
    for i in range(calls):
        one(requests[i % len(requests)])  # type: ignore[operator]


def _instructions(form: str, candidates: int, dim: int, calls: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable, __file__,
            "--worker", form, str(candidates), str(dim), str(calls),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forms", nargs="+", default=["messages", "columns", "packed"])
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--dim", type=int, default=384, help="vector size (the packaged model's is 384)")
    parser.add_argument("--requests", type=int, default=100, help="calls counted (the run doubles them)")
    args = parser.parse_args()
    for form in args.forms:
        low = _instructions(form, args.candidates, args.dim, args.requests)
        high = _instructions(form, args.candidates, args.dim, 2 * args.requests)
        print(f"{form}: candidates={args.candidates} instructions_per_request={(high - low) / args.requests:,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
