"""`reranker bench`: numbers anyone can reproduce on their own machine.

Modes:
  rerank   drive a Rerank server over gRPC (one it starts, or --target) with N client threads, and a
           plain gRPC echo server with the same request and response sizes in the same run; prints
           QPS and p50/p90/p99/p999 latency of both and their ratio, and (for servers it started)
           each server process's CPU time per request.
  encoder  texts/s of our encoder path (micro-batcher, length-sorted batches) next to
           sentence-transformers' `encode` on the same model and machine, plus their cosine agreement.
  memory   process RSS with the model loaded, then with N cached item vectors.

Benchmarks print numbers; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

from reranker.config import Settings, flat_fields
from reranker.tools import stagecpu
from reranker.tools.harness import child_env, free_port, rss_bytes, wait_serving
from reranker.tools.stagecpu import StageCpuClient

ECHO_METHOD = "/reranker.v1.RerankerService/Rerank"
_WORDS = (
    "night return love story war city lost dark king summer house last man woman secret life "
    "blue river road dead girl boy world time dream heart fire star game little big wild"
).split()


# --- shared helpers -----------------------------------------------------------------------------
def percentiles_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {k: float("nan") for k in ("p50", "p90", "p99", "p999")}
    p50, p90, p99, p999 = np.percentile(arr, [50, 90, 99, 99.9])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "p999": float(p999)}


def load_texts(path: str, count: int) -> list[str]:
    """Texts to encode: lines of a text file, titles of a RecBole .item file, or synthetic titles."""
    texts = read_texts(path) if path else []
    if not texts:
        texts = synthetic_titles(count or 1000)
    if count and len(texts) < count:
        texts = [texts[i % len(texts)] + ("" if i < len(texts) else f" ({i // len(texts)})") for i in range(count)]
    return texts[:count] if count else texts


def read_texts(path: str) -> list[str]:
    """The non-empty lines of a text file, or the first token_seq column of a RecBole atomic file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if lines and ":token" in lines[0]:
        columns = lines[0].split("\t")
        col = next((i for i, c in enumerate(columns) if c.endswith(":token_seq")), 1)
        return [line.split("\t")[col] for line in lines[1:] if line.strip()]
    return [line for line in lines if line.strip()]


def synthetic_titles(count: int, seed: int = 7) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        words = rng.choice(_WORDS, size=int(rng.integers(1, 6)))
        out.append(" ".join(words).title() + f" ({1950 + i % 70})")
    return out


# --- echo server ----------------------------------------------------------------------------------
ECHO_KINDS = ("threads", "asyncio")


def run_echo_server(port: int, response_path: str, workers: int, kind: str = "threads") -> None:
    """A plain gRPC server answering Rerank with fixed bytes: transport cost only, no work.

    `threads`: grpc's thread-pool server (the issue's "plain echo"). `asyncio`: grpc.aio on one
    event loop, the transport `reranker serve` itself runs on, so the ratio to it is the cost of
    the reranking work alone."""
    import grpc

    payload = Path(response_path).read_bytes()
    if kind == "asyncio":
        _run_asyncio_echo(port, payload)
        return

    def echo(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        return payload

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), handlers=[_echo_handler(echo)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def _echo_handler(echo: Callable[[bytes, Any], Any]) -> Any:
    """RerankerService.Rerank answered by `echo`, raw bytes in and out (no protobuf parsing)."""
    import grpc

    return grpc.method_handlers_generic_handler(
        "reranker.v1.RerankerService", {"Rerank": grpc.unary_unary_rpc_method_handler(echo, lambda b: b, lambda b: b)}
    )


def _run_asyncio_echo(port: int, payload: bytes) -> None:
    import asyncio

    from grpc import aio

    async def echo(_request: bytes, _context: aio.ServicerContext) -> bytes:
        return payload

    async def serve() -> None:
        server = aio.server()
        server.add_generic_rpc_handlers((_echo_handler(echo),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


# --- rerank mode ----------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadResult:
    requests: int
    errors: int
    fallbacks: int
    elapsed_s: float
    latencies_s: list[float]
    server_cpu_s: float | None = None  # CPU the server process used while measured (None: unknown)
    # --breakdown: what the server's stage timers counted while measured (stagecpu.delta), per slice
    stage_windows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __add__(self, other: LoadResult) -> LoadResult:
        known = self.server_cpu_s is not None and other.server_cpu_s is not None
        cpu = self.server_cpu_s + other.server_cpu_s if known else None  # type: ignore[operator]
        return LoadResult(
            self.requests + other.requests,
            self.errors + other.errors,
            self.fallbacks + other.fallbacks,
            self.elapsed_s + other.elapsed_s,
            self.latencies_s + other.latencies_s,
            cpu,
            self.stage_windows + other.stage_windows,
        )

    @property
    def cpu_us_per_request(self) -> float | None:
        """Server CPU time per request (user + system, all its threads), in microseconds."""
        if self.server_cpu_s is None or not self.requests:
            return None
        return 1e6 * self.server_cpu_s / self.requests

    @property
    def qps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Every figure of `line`, machine-readable (latencies in ms; None where unknown)."""
        return {
            "requests": self.requests, "errors": self.errors, "fallbacks": self.fallbacks, "qps": self.qps,
            **{f"{k}_ms": v for k, v in percentiles_ms(self.latencies_s).items()},
            "server_cpu_us_per_request": self.cpu_us_per_request,
        }

    def line(self, label: str) -> str:
        p = percentiles_ms(self.latencies_s)
        return (
            f"{label}: requests={self.requests} errors={self.errors} fallbacks={self.fallbacks} "
            f"qps={self.qps:.0f} p50_ms={p['p50']:.3f} p90_ms={p['p90']:.3f} p99_ms={p['p99']:.3f} "
            f"p999_ms={p['p999']:.3f}"
            + (f" server_cpu_us_per_req={self.cpu_us_per_request:.0f}" if self.cpu_us_per_request is not None else "")
        )


def drive(call: Callable[[int, int], bool | None], concurrency: int, duration_s: float, warmup_s: float) -> LoadResult:
    """Run `call(worker, i)` in `concurrency` threads; measure only after `warmup_s`.

    `call` returns True for a fallback answer; an exception counts as an error.
    """
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"errors": 0, "fallbacks": 0}

    def worker(w: int) -> None:
        local: list[float] = []
        errors = fallbacks = 0
        i = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            try:
                fallback = call(w, i)
            except Exception:
                fallback, errors = False, errors + (t0 >= measure_from)
            t1 = time.perf_counter()
            if t0 >= measure_from:
                local.append(t1 - t0)
                fallbacks += bool(fallback)
            i += 1
        with lock:
            latencies.extend(local)
            counts["errors"] += errors
            counts["fallbacks"] += fallbacks

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = max(1e-9, min(time.perf_counter(), stop_at + 0.0) - measure_from)
    return LoadResult(len(latencies), counts["errors"], counts["fallbacks"], elapsed, latencies)


FORMS = ("messages", "columns", "packed")
_FRESH_ID_BASE = 1_000_000_000  # packed ids of never-seen items (the pool's ids are 0, 1, 2, ...)


class RerankWorkload:
    """Requests of `candidates` items: a share `hit_ratio` drawn from a pre-upserted pool, the rest
    never seen before (they must be encoded), always with text, for users with a history.

    `form`: one message per candidate and per answered item; `columns` both ways; or `packed`
    both ways (integer ids: the pool is upserted with decimal string ids "0", "1", ..., and its
    items travel without text; only never-seen items carry one)."""

    def __init__(
        self, candidates: int, hit_ratio: float, pool: int, users: int, texts: list[str], form: str = "messages"
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.candidates, self.hit_ratio, self.users = candidates, hit_ratio, users
        self.form = form
        self.pool_texts = [texts[i % len(texts)] for i in range(pool)]
        self.texts = texts
        self._fresh = 0
        self._lock = threading.Lock()

    def pool_id(self, k: int) -> str:
        return str(k) if self.form == "packed" else f"item-{k}"

    def pool_items(self) -> list[tuple[str, str]]:
        return [(self.pool_id(i), t) for i, t in enumerate(self.pool_texts)]

    def request(self, worker: int, i: int) -> object:
        from reranker.v1 import reranker_pb2 as pb

        rng = np.random.default_rng(worker * 1_000_003 + i)
        warm = int(round(self.candidates * self.hit_ratio))
        cands = []
        for k in rng.choice(len(self.pool_texts), size=min(warm, len(self.pool_texts)), replace=False).tolist():
            cands.append(pb.Candidate(item_id=self.pool_id(k), score=float(rng.random()), text=self.pool_texts[k]))
        with self._lock:
            first = self._fresh
            self._fresh += self.candidates - len(cands)
        for n in range(first, first + self.candidates - len(cands)):
            text = self.texts[n % len(self.texts)] + f" #{n}"
            fresh_id = str(_FRESH_ID_BASE + n) if self.form == "packed" else f"new-{n}"
            cands.append(pb.Candidate(item_id=fresh_id, score=float(rng.random()), text=text))
        user, request_id = f"user-{(worker + i) % self.users}", f"{worker}-{i}"
        if self.form == "packed":
            from reranker.client import packed_candidates

            # Warm items go without text (the catalog was upserted: the point of the packed form is
            # no per-candidate payload); texts travel only when some candidate must be encoded.
            texts = [c.text if k >= len(cands) - (self.candidates - warm) else None for k, c in enumerate(cands)]
            packed = packed_candidates(
                [int(c.item_id) for c in cands], [c.score for c in cands], texts if any(texts) else None
            )
            return pb.RerankRequest(user_id=user, packed_candidates=packed, request_id=request_id)
        if self.form == "columns":
            from reranker.client import to_columns

            return pb.RerankRequest(
                user_id=user, candidate_columns=to_columns(cands), request_id=request_id,
                options=pb.RerankOptions(columns=True),
            )
        return pb.RerankRequest(user_id=user, candidates=cands, request_id=request_id)


def ratios(rerank: LoadResult, echo: LoadResult) -> dict[str, float | None]:
    """rerank / echo for every figure of LoadResult.summary (None where either is unknown)."""
    mine, theirs = rerank.summary(), echo.summary()
    out: dict[str, float | None] = {}
    for key in ("qps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "server_cpu_us_per_request"):
        a, b = mine[key], theirs[key]
        out[key] = None if a is None or b is None or not b else a / b
    return out


def _prepare_server(stub: object, workload: RerankWorkload) -> None:
    """Upsert the warm pool and give every user a short history."""
    from reranker.v1 import reranker_pb2 as pb

    items = workload.pool_items()
    for start in range(0, len(items), 500):
        chunk = items[start : start + 500]
        stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=i, text=t) for i, t in chunk]), timeout=600)  # type: ignore[attr-defined]
    events = [
        pb.Event(user_id=f"user-{u}", item_id=workload.pool_id((u * 7 + k) % len(items)), type=pb.EVENT_TYPE_CLICK)
        for u in range(workload.users)
        for k in range(5)
    ]
    for start in range(0, len(events), 1000):
        stub.RecordEvents(pb.RecordEventsRequest(events=events[start : start + 1000]), timeout=600)  # type: ignore[attr-defined]


def _echo_payload(stub: object, workload: RerankWorkload) -> bytes:
    """A real Rerank response for a workload request: the echo server sends these bytes back."""
    return stub.Rerank(workload.request(0, 0), timeout=60).SerializeToString()  # type: ignore[attr-defined]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere or if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _server_sample(pid: int | None, stage_cpu: StageCpuClient | None) -> tuple[float | None, dict[str, Any] | None]:
    """The server's CPU seconds so far and, with --breakdown, its stage timers' counters."""
    return (
        process_cpu_seconds(pid) if pid is not None else None,
        stage_cpu.snapshot() if stage_cpu is not None else None,
    )


def _measure(
    address: str,
    workload: RerankWorkload,
    args: argparse.Namespace,
    duration_s: float,
    warmup_s: float,
    server_pid: int | None = None,
    stage_cpu: StageCpuClient | None = None,
) -> LoadResult:
    """Drive `address`; with `server_pid`, also the CPU that process used while measured, and with
    `stage_cpu` what its stage timers counted meanwhile."""
    import grpc

    from reranker.v1 import reranker_pb2 as pb
    from reranker.v1 import reranker_pb2_grpc as pb_grpc

    # Requests are built before the clock starts (client-side protobuf building is not the server's cost).
    requests = [[workload.request(w, i) for i in range(args.distinct_requests)] for w in range(args.concurrency)]
    if workload.hit_ratio < 1.0:  # unseen items must stay unseen: one fresh request per call
        requests = []
    channels = [grpc.insecure_channel(address) for _ in range(args.channels)]
    stubs = [pb_grpc.RerankerServiceStub(ch) for ch in channels]

    def call(w: int, i: int) -> bool:
        req = requests[w][i % len(requests[w])] if requests else workload.request(w, i + 1)
        reply = stubs[w % len(stubs)].Rerank(req, timeout=args.timeout)
        return reply.variant == pb.VARIANT_FALLBACK

    at_start: list[tuple[float | None, dict[str, Any] | None]] = [(None, None)]
    sampler = threading.Timer(warmup_s, lambda: at_start.__setitem__(0, _server_sample(server_pid, stage_cpu)))
    sampler.start()
    try:
        result = drive(call, args.concurrency, duration_s, warmup_s)
    finally:
        for ch in channels:
            ch.close()
    sampler.join()
    (cpu_start, stages_start), (cpu_end, stages_end) = at_start[0], _server_sample(server_pid, stage_cpu)
    if cpu_start is not None and cpu_end is not None:
        result.server_cpu_s = cpu_end - cpu_start
    if stages_start is not None and stages_end is not None:
        result.stage_windows.append(stagecpu.delta(stages_start, stages_end))
    return result


def _start_server(
    args: argparse.Namespace, tmp: Path, children: list[subprocess.Popen[bytes]]
) -> tuple[str, subprocess.Popen[bytes] | None, StageCpuClient | None]:
    """The server to measure: --target, or a started `reranker serve` (with --breakdown, the same
    server with stage timers: reranker.tools.stagecpu). Returns its address, process and timers."""
    if args.target:
        wait_serving(args.target, args.startup_timeout, None, tmp / "server.log")
        return args.target, None, None
    address, log_path = f"127.0.0.1:{free_port()}", tmp / "server.log"
    # Its own metrics port (the default one may be taken); --server-args can override both.
    flags = ["--address", address, "--metrics-address", f"127.0.0.1:{free_port()}", *shlex.split(args.server_args)]
    with log_path.open("wb") as log:
        if args.breakdown:  # stdin / stdout: the timers' commands and answers
            cmd = [sys.executable, "-m", "reranker.tools.stagecpu", *flags]
            child = subprocess.Popen(cmd, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        else:
            cmd = [sys.executable, "-m", "reranker", "serve", *flags]
            child = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    children.append(child)
    wait_serving(address, args.startup_timeout, child, log_path)
    return address, child, StageCpuClient(child) if args.breakdown else None


def _start_echo(
    args: argparse.Namespace, payload: bytes, tmp: Path, children: list[subprocess.Popen[bytes]]
) -> tuple[str, int | None]:
    """The echo server answering `payload` (address and pid), or ("", None) with --no-echo."""
    import grpc

    if args.no_echo:
        return "", None
    echo_port = free_port()
    response_path = tmp / "response.bin"
    response_path.write_bytes(payload)
    echo_cmd = [
        sys.executable, "-m", "reranker.tools.bench", "--echo-server", str(echo_port), str(response_path),
        str(args.echo_workers), args.echo_kind,
    ]
    echo_child = subprocess.Popen(echo_cmd, env=child_env())
    children.append(echo_child)
    echo_address = f"127.0.0.1:{echo_port}"
    grpc.channel_ready_future(grpc.insecure_channel(echo_address)).result(timeout=30)
    return echo_address, echo_child.pid


def _ratio_line(ratio: dict[str, float | None]) -> str:
    return (
        "ratio rerank/echo: "
        + " ".join(f"{k}={ratio[k + '_ms']:.2f}x" for k in ("p50", "p90", "p99", "p999"))
        + f" qps={ratio['qps']:.2f}x"
        + (
            f" server_cpu_per_req={ratio['server_cpu_us_per_request']:.2f}x"
            if ratio["server_cpu_us_per_request"] is not None
            else ""
        )
    )


def _breakdown(
    stage_cpu: StageCpuClient, rerank: LoadResult, echo: LoadResult | None, args: argparse.Namespace
) -> dict[str, Any]:
    """--breakdown: the server's CPU per request by stage, the scoring floor measured in the same
    server process, and (with an echo) the issue's CPU target echo + 2 x floor; printed and returned."""
    timer_ns = float(stage_cpu.ask("timer")["timer_ns"])
    report = stagecpu.breakdown(stagecpu.combined(rerank.stage_windows), timer_ns)
    floor = stage_cpu.ask(f"floor {max(args.pool, args.candidates)} {args.candidates}")
    report["scoring_floor"] = floor
    print(stagecpu.table(report, floor), flush=True)
    echo_cpu = echo.cpu_us_per_request if echo is not None else None
    if echo_cpu is not None:
        report["target_cpu_us"] = echo_cpu + 2 * floor["median_us"]
        print(
            f"target: echo_cpu_us={echo_cpu:.1f} + 2 x floor = {report['target_cpu_us']:.1f} us/request "
            f"(server total {report['total_us']:.1f})",
            flush=True,
        )
    return report


def bench_rerank(args: argparse.Namespace) -> int:
    import grpc

    from reranker.v1 import reranker_pb2_grpc as pb_grpc

    if args.breakdown and args.target:
        print("reranker bench rerank: --breakdown needs a server the bench starts (no --target)", file=sys.stderr)
        return 2
    texts = load_texts(args.titles, 0)
    workload = RerankWorkload(
        args.candidates, args.hit_ratio, max(args.pool, args.candidates), args.users, texts, args.form
    )
    children: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.TemporaryDirectory(prefix="reranker-bench-")
    try:
        address, child, stage_cpu = _start_server(args, Path(tmp.name), children)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RerankerServiceStub(channel)
            _prepare_server(stub, workload)
            payload = _echo_payload(stub, workload)
        print(
            f"bench rerank: target={args.target or 'started ' + address} candidates={args.candidates} "
            f"hit_ratio={args.hit_ratio:.2f} form={args.form} concurrency={args.concurrency} "
            f"duration_s={args.duration:g} echo={'none' if args.no_echo else args.echo_kind} "
            f"response_bytes={len(payload)} server_args={args.server_args!r} breakdown={args.breakdown}",
            flush=True,
        )
        echo_address, echo_pid = _start_echo(args, payload, Path(tmp.name), children)
        # Alternate short slices of both servers so that both see the same background load.
        rounds = max(1, args.rounds)
        rerank, echo = LoadResult(0, 0, 0, 0.0, [], 0.0), LoadResult(0, 0, 0, 0.0, [], 0.0)
        for r in range(rounds):
            warmup = args.warmup if r == 0 else min(args.warmup, 0.2)
            slice_s = args.duration / rounds
            rerank = rerank + _measure(address, workload, args, slice_s, warmup, getattr(child, "pid", None), stage_cpu)
            if echo_address:
                echo = echo + _measure(echo_address, workload, args, slice_s, warmup, echo_pid)
        print(rerank.line("rerank"), flush=True)
        report: dict[str, Any] = {
            "config": {
                "target": args.target or "started", "candidates": args.candidates, "hit_ratio": args.hit_ratio,
                "form": args.form, "concurrency": args.concurrency, "duration_s": args.duration,
                "rounds": rounds, "echo": "none" if args.no_echo else args.echo_kind,
                "response_bytes": len(payload), "server_args": args.server_args, "breakdown": args.breakdown,
            },
            "rerank": rerank.summary(),
        }
        if echo_address:
            print(echo.line("echo"), flush=True)
            report["echo"], report["ratio"] = echo.summary(), ratios(rerank, echo)
            print(_ratio_line(report["ratio"]), flush=True)
        if stage_cpu is not None:
            report["breakdown"] = _breakdown(stage_cpu, rerank, echo if echo_address else None, args)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    finally:
        _stop(children)
        tmp.cleanup()


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.stdin is not None:
            child.stdin.close()  # the breakdown server stops at the end of its input
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
        if child.stdout is not None:
            child.stdout.close()


# --- encoder mode ---------------------------------------------------------------------------------
def _pass_rate(encode: Callable[[list[str]], np.ndarray], texts: list[str]) -> float:
    started = time.perf_counter()
    encode(texts)
    return len(texts) / (time.perf_counter() - started)


def _report_rates(label: str, rates: list[float]) -> str:
    return f"{label}: texts_per_s={max(rates):.0f} (best of {len(rates)}; median {float(np.median(rates)):.0f})"


def bench_encoder(args: argparse.Namespace, settings: Settings) -> int:
    """Passes over the same texts, alternating ours and the reference so both see the same load."""
    from reranker.model.batching import MicroBatcher
    from reranker.model.encoder import packaged_model_dir
    from reranker.model.loader import load_encoder

    texts = load_texts(args.titles, args.texts)
    encoder = load_encoder(settings.model)
    batcher = MicroBatcher(encoder, max_batch=settings.model.encode_batch_size, max_wait_s=0.0, max_pending=len(texts) + 1)
    print(
        f"bench encoder: texts={len(texts)} batch_size={settings.model.encode_batch_size} encoder={encoder.version} "
        f"torch_threads={settings.model.torch_threads or 'auto'}",
        flush=True,
    )
    reference: Callable[[list[str]], np.ndarray] | None = None
    if args.reference == "none" or settings.model.encoder == "fake":
        print("sentence-transformers: skipped (--reference none or fake encoder)")
    else:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            print("sentence-transformers: not installed; pip install 'reranker[bench]' to compare against it")
        else:
            model = SentenceTransformer(settings.model.model_dir or str(packaged_model_dir()), device="cpu")
            model.max_seq_length = settings.model.max_seq_length
            batch_size = settings.model.encode_batch_size

            def reference(t: list[str]) -> np.ndarray:
                return np.asarray(model.encode(t, batch_size=batch_size, normalize_embeddings=True), dtype=np.float32)

    def ours(t: list[str]) -> np.ndarray:
        return batcher.submit(t).result()

    try:
        our_vectors = ours(texts)  # warm-up passes, also the vectors compared below
        their_vectors = reference(texts) if reference is not None else None
        our_rates, their_rates = [], []
        for _ in range(args.repeats):
            our_rates.append(_pass_rate(ours, texts))
            if reference is not None:
                their_rates.append(_pass_rate(reference, texts))
    finally:
        batcher.close()
    print(_report_rates("ours", our_rates), flush=True)
    if reference is None or their_vectors is None:
        return 0
    print(_report_rates("sentence-transformers", their_rates) + f" float32 batch_size={settings.model.encode_batch_size}")
    cosine = (our_vectors * their_vectors).sum(axis=1)
    print(
        f"ratio ours/sentence-transformers: best={max(our_rates) / max(their_rates):.2f}x "
        f"median={float(np.median(our_rates)) / float(np.median(their_rates)):.2f}x  "
        f"cosine_to_reference mean={cosine.mean():.4f} min={cosine.min():.4f} p1={np.percentile(cosine, 1):.4f}",
        flush=True,
    )
    return 0


# --- memory mode ----------------------------------------------------------------------------------
def bench_memory(args: argparse.Namespace, settings: Settings) -> int:
    from reranker.model.loader import load_encoder
    from reranker.model.items import ItemVectorCache

    base = (rss_bytes() or 0)
    encoder = load_encoder(settings.model)
    encoder.encode(["warm up"])
    with_model = (rss_bytes() or 0)
    cache = ItemVectorCache(max(settings.model.item_cache_size, args.items), encoder.dim)
    rng = np.random.default_rng(0)
    for start in range(0, args.items, 10_000):
        n = min(10_000, args.items - start)
        vectors = rng.standard_normal((n, encoder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"item-{start + k:08d}" for k in range(n)]
        cache.put(ids, [f"Title of item {start + k} (1995)" for k in range(n)], vectors)
    with_items = (rss_bytes() or 0)
    mib = 1 / (1024 * 1024)
    print(f"bench memory: encoder={encoder.version} items={len(cache)} dim={encoder.dim}")
    print(
        f"rss_mib: interpreter={base * mib:.0f} model_loaded={with_model * mib:.0f} "
        f"with_items={with_items * mib:.0f} items_delta={(with_items - with_model) * mib:.0f} "
        f"vector_matrix={cache.nbytes * mib:.0f}",
        flush=True,
    )
    return 0


# --- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="mode", required=True)
    rerank = modes.add_parser("rerank", help="Rerank QPS and latency vs a plain gRPC echo server")
    rerank.add_argument("--target", default="", help="host:port of a running server (default: start one)")
    rerank.add_argument("--server-args", default="", help="flags for the started server, e.g. '--dtype int8'")
    rerank.add_argument("--concurrency", type=int, default=1, help="client threads")
    rerank.add_argument("--candidates", type=int, default=500, help="candidates per request")
    rerank.add_argument(
        "--form", choices=FORMS, default="messages",
        help="one message per candidate and per answered item, columns both ways "
        "(RerankRequest.candidate_columns and RerankOptions.columns), or packed both ways "
        "(RerankRequest.packed_candidates, RerankResponse.packed_items)",
    )
    rerank.add_argument("--json", default="", help="also write every figure (both servers, ratios) to this JSON file")
    rerank.add_argument("--hit-ratio", type=float, default=1.0, help="share of candidates whose vector is cached")
    rerank.add_argument("--duration", type=float, default=10.0, help="measured seconds per server")
    rerank.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before measuring")
    rerank.add_argument("--rounds", type=int, default=5, help="alternating rerank/echo slices the duration is split into")
    rerank.add_argument("--pool", type=int, default=2000, help="warm items upserted before measuring")
    rerank.add_argument("--users", type=int, default=50, help="distinct users (each gets 5 click events)")
    rerank.add_argument("--distinct-requests", type=int, default=20, help="prebuilt requests per client thread")
    rerank.add_argument("--channels", type=int, default=1, help="gRPC channels shared by the client threads")
    rerank.add_argument("--timeout", type=float, default=10.0, help="per-call deadline in seconds")
    rerank.add_argument("--titles", default="", help="texts: a text file (one per line) or a RecBole .item file")
    rerank.add_argument("--no-echo", action="store_true", help="skip the echo-server comparison")
    rerank.add_argument("--echo-workers", type=int, default=16, help="echo server threads (match --max-workers)")
    rerank.add_argument(
        "--echo-kind", choices=ECHO_KINDS, default="threads",
        help="the echo server: grpc's thread-pool server (the plain echo), or grpc.aio on one event loop "
        "(the transport reranker serve runs on: the ratio to it is the reranking work alone)",
    )
    rerank.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for SERVING")
    rerank.add_argument(
        "--breakdown", action="store_true",
        help="also the server's CPU per request by stage (transport, decode, arm, vectors, user state, scoring, "
        "consumed policy, ordering, encode, logs/metrics, training log) and the scoring floor (one gather + one "
        "GEMM) measured in the same server process: the started server runs with stage timers",
    )
    from reranker.config import settings_parser

    encoder = modes.add_parser("encoder", help="encoder texts/s vs sentence-transformers", parents=[settings_parser()])
    encoder.add_argument("--texts", type=int, default=2000, help="texts per pass")
    encoder.add_argument("--repeats", type=int, default=3, help="timed passes (best is reported)")
    encoder.add_argument("--titles", default="", help="texts: a text file (one per line) or a RecBole .item file")
    encoder.add_argument("--reference", choices=("sentence-transformers", "none"), default="sentence-transformers")
    memory = modes.add_parser("memory", help="RSS with the model loaded and N cached item vectors", parents=[settings_parser()])
    memory.add_argument("--items", type=int, default=100_000, help="cached item vectors")
    from reranker.tools.benches import BENCHES

    for name, (_, help_text) in BENCHES.items():  # their own flags (`reranker bench <name> --help`): see run_tool
        modes.add_parser(name, help=help_text, add_help=False)


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Entry point for `reranker bench ...`."""
    if args.mode == "rerank":
        return bench_rerank(args)
    if args.mode not in ("encoder", "memory"):
        return run_tool(args.mode, argv[1:])
    settings = _settings(args)
    if args.mode == "encoder":
        return bench_encoder(args, settings)
    return bench_memory(args, settings)


def run_tool(name: str, argv: Sequence[str]) -> int:
    """`reranker bench <name> ...` for a tool of reranker.tools.benches: its own parser reads `argv`."""
    import importlib

    from reranker.tools.benches import BENCHES

    module = importlib.import_module(f"reranker.tools.benches.{BENCHES[name][0]}")
    return int(module.main(list(argv)) or 0)


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the settings flags given to the bench."""
    flags = {
        f.name: getattr(args, f.name)
        for f in flat_fields()
        if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(Settings.from_sources((), os.environ), **flags)


if __name__ == "__main__":
    if len(sys.argv) in (5, 6) and sys.argv[1] == "--echo-server":
        run_echo_server(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
    else:
        print("usage: reranker bench {rerank,encoder,memory,...} ...", file=sys.stderr)
        sys.exit(2)
