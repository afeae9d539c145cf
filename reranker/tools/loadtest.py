"""Load driver and soak test: many concurrent clients against a real server for a fixed time.

`reranker soak` (and tests/test_soak.py, with a short duration) starts `reranker serve` as a child
process, warms its caches, then runs `clients` threads (one channel each) that send Rerank and
RecordEvents calls over loopback for `duration` seconds. It checks every response (a valid
reordering of the request's candidates), counts errors and fail-open fallbacks, samples the
server's resident memory, and finally sends SIGTERM while requests are still in flight to check the
graceful shutdown: in-flight calls complete, later ones are refused, the process exits 0.

Nothing here is imported by the server itself.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from reranker.tools.harness import ServerProcess, rss_bytes  # noqa: F401  (loadtest.ServerProcess: the soak's server)
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

_WORDS = (
    "space war love crime comedy drama family music night city river road star dark light king queen "
    "ghost robot island summer winter secret last first little big red blue black white gold silver "
    "heart game story dream escape return rise fall brother sister father mother friend stranger"
).split()


# --- workload ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """What the clients send. Sizes are kept bounded so a healthy server reaches a memory plateau."""

    clients: int = 8
    duration_s: float = 3.0
    candidates: int = 50
    catalog: int = 2000
    users: int = 500
    # Share of candidates that are brand-new items (never seen, must be encoded).
    new_item_fraction: float = 0.02
    # Every n-th call of a client is a RecordEvents instead of a Rerank.
    record_every: int = 5
    deadline_s: float = 2.0
    seed: int = 0
    # Warm-up events per user: the server's recent_events_per_user, so per-user state is at its cap.
    warmup_events_per_user: int = 50


def item_text(item: int) -> str:
    rng = random.Random(item)
    return f"item {item}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))


@dataclass
class LoadReport:
    requests: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    variants: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def fallback_count(self) -> int:
        return sum(self.fallbacks.values())

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def merge(self, other: LoadReport) -> None:
        self.requests += other.requests
        self.ok += other.ok
        self.errors.update(other.errors)
        self.fallbacks.update(other.fallbacks)
        self.variants.update(other.variants)
        self.latencies_ms.extend(other.latencies_ms)

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": dict(self.errors),
            "fallbacks": dict(self.fallbacks),
            "variants": dict(self.variants),
            "rps": round(self.requests / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "p50_ms": round(self.percentile_ms(0.50), 2),
            "p99_ms": round(self.percentile_ms(0.99), 2),
        }


def check_reordering(request: pb.RerankRequest, response: pb.RerankResponse) -> str | None:
    """None if `response` is a valid reordering of the request's candidates, else what is wrong."""
    positions: dict[str, int] = {}
    ids = [c.item_id for c in request.candidates] or list(request.candidate_columns.item_ids)
    for i, item_id in enumerate(ids):
        positions.setdefault(item_id, i)
    if response.HasField("item_columns"):
        returned = list(response.item_columns.item_ids)
        ranks = list(response.item_columns.original_ranks)
    else:
        returned = [it.item_id for it in response.items]
        ranks = [it.original_rank for it in response.items]
    expected = min(len(positions), request.top_k or len(positions))
    if len(returned) != expected:
        return f"{len(returned)} items returned, expected {expected}"
    if len(set(returned)) != len(returned):
        return "duplicate items in the response"
    for item_id, rank in zip(returned, ranks):
        if item_id not in positions:
            return f"item {item_id!r} was not a candidate"
        if rank != positions[item_id]:
            return f"item {item_id!r} has original_rank {rank}, expected {positions[item_id]}"
    if response.variant == pb.VARIANT_UNSPECIFIED:
        return "variant unspecified"
    return None


class _Client:
    def __init__(self, target: str, workload: Workload, index: int, credentials: grpc.ChannelCredentials | None) -> None:
        self.workload = workload
        self.rng = random.Random(workload.seed * 1000 + index)
        self.index = index
        self.channel = (
            grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
        )
        self.stub = pb_grpc.RerankerServiceStub(self.channel)
        self.report = LoadReport()
        self.calls = 0
        self.new_items = 0
        # (started, finished, outcome) of every call, only when asked (shutdown check).
        self.outcomes: list[tuple[float, float, str]] | None = None

    def rerank_request(self) -> pb.RerankRequest:
        w, rng = self.workload, self.rng
        user = f"user-{rng.randrange(w.users)}"
        items = rng.sample(range(w.catalog), min(w.candidates, w.catalog))
        request = pb.RerankRequest(user_id=user, request_id=f"c{self.index}-{self.calls}")
        for rank, item in enumerate(items):
            c = request.candidates.add(item_id=f"item-{item}", score=float(len(items) - rank))
            c.text = item_text(item)
        for c in request.candidates:
            if rng.random() < w.new_item_fraction:
                self.new_items += 1
                c.item_id = f"new-{self.index}-{self.new_items}"
                c.text = f"new {self.new_items} " + " ".join(rng.choice(_WORDS) for _ in range(6))
        if rng.random() < 0.2:
            clicked = rng.choice(items)
            request.context_events.add(user_id=user, item_id=f"item-{clicked}", type=pb.EVENT_TYPE_CLICK)
        return request

    def record_request(self) -> pb.RecordEventsRequest:
        w, rng = self.workload, self.rng
        user = f"user-{rng.randrange(w.users)}"
        item = rng.randrange(w.catalog)
        event_type = rng.choice([pb.EVENT_TYPE_VIEW, pb.EVENT_TYPE_CLICK, pb.EVENT_TYPE_PURCHASE, pb.EVENT_TYPE_SKIP])
        event = pb.Event(user_id=user, item_id=f"item-{item}", type=event_type, event_id=f"e{self.index}-{self.calls}")
        event.text = item_text(item)
        return pb.RecordEventsRequest(events=[event])

    def call_once(self) -> None:
        started = time.monotonic()
        outcome = self._call()
        if self.outcomes is not None:
            self.outcomes.append((started, time.monotonic(), outcome))

    def _call(self) -> str:
        self.calls += 1
        report = self.report
        report.requests += 1
        started = time.perf_counter()
        try:
            if self.calls % self.workload.record_every == 0:
                self.stub.RecordEvents(self.record_request(), timeout=self.workload.deadline_s)
                report.variants["record"] += 1
            else:
                request = self.rerank_request()
                response = self.stub.Rerank(request, timeout=self.workload.deadline_s)
                problem = check_reordering(request, response)
                if problem is not None:
                    report.errors["INVALID_RESPONSE: " + problem] += 1
                    return "INVALID_RESPONSE"
                report.variants[pb.Variant.Name(response.variant)] += 1
                if response.variant == pb.VARIANT_FALLBACK:
                    report.fallbacks[pb.FallbackReason.Name(response.fallback_reason)] += 1
        except grpc.RpcError as exc:
            code = exc.code().name  # type: ignore[attr-defined]
            report.errors[code] += 1
            return code
        report.ok += 1
        report.latencies_ms.append(1000.0 * (time.perf_counter() - started))
        return "OK"

    def run_until(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.call_once()


def warm_up(target: str, workload: Workload, credentials: grpc.ChannelCredentials | None = None) -> None:
    """Bring every bounded structure to its cap before memory is measured.

    Upserts the catalog plus as many filler items (the soak caps the item cache at twice the
    catalog, so it is full afterwards) and gives every user `warmup_events_per_user` events (their
    recent-event buffers are full). Growth after this is either a leak or allocator noise.
    """
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = pb_grpc.RerankerServiceStub(channel)
        ids = [f"item-{i}" for i in range(workload.catalog)] + [f"filler-{i}" for i in range(workload.catalog)]
        for start in range(0, len(ids), 500):
            batch = ids[start : start + 500]
            items = [pb.Item(item_id=item_id, text=item_text(i + start)) for i, item_id in enumerate(batch)]
            stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=600)
        rng = random.Random(workload.seed)
        events = [
            pb.Event(user_id=f"user-{u}", item_id=f"item-{rng.randrange(workload.catalog)}", type=pb.EVENT_TYPE_VIEW)
            for u in range(workload.users)
            for _ in range(workload.warmup_events_per_user)
        ]
        for start in range(0, len(events), 500):
            stub.RecordEvents(pb.RecordEventsRequest(events=events[start : start + 500]), timeout=600)


def run_load(
    target: str,
    workload: Workload,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    on_tick: object = None,
    tick_s: float = 1.0,
) -> LoadReport:
    """Run `workload.clients` client threads for `workload.duration_s` seconds; merged report.

    `on_tick`, if given, is called (with the elapsed seconds) about every `tick_s` seconds from
    the calling thread, e.g. to sample the server's memory.
    """
    clients = [_Client(target, workload, i, credentials) for i in range(workload.clients)]
    stop = threading.Event()
    threads = [threading.Thread(target=c.run_until, args=(stop,), name=f"load-{i}", daemon=True) for i, c in enumerate(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    while (elapsed := time.monotonic() - started) < workload.duration_s:
        time.sleep(min(tick_s, max(0.0, workload.duration_s - elapsed)))
        if callable(on_tick):
            on_tick(time.monotonic() - started)
    stop.set()
    for t in threads:
        t.join(workload.deadline_s + 30)
    report = LoadReport(elapsed_s=time.monotonic() - started)
    for c in clients:
        report.merge(c.report)
        c.channel.close()
    return report


# --- shutdown under load ------------------------------------------------------------------------------
@dataclass
class ShutdownReport:
    exit_code: int | None
    shutdown_s: float
    # Calls started before SIGTERM and finished after it: all must be OK.
    in_flight_ok: int
    in_flight_failed: dict[str, int]
    # Calls started after SIGTERM: answered (during the drain delay) or refused before any work:
    # UNAVAILABLE once the port is closed, CANCELLED for the few calls grpc had received but not yet
    # dispatched at the instant the server stopped.
    after_signal_ok: int
    refused: dict[str, int]
    other_errors: dict[str, int]

    @property
    def clean(self) -> bool:
        return self.exit_code == 0 and not self.in_flight_failed and not self.other_errors


def shutdown_under_load(server: ServerProcess, workload: Workload, grace_timeout_s: float = 60.0) -> ShutdownReport:
    """SIGTERM the server while clients keep calling.

    Calls in flight at the signal must complete OK; later calls may be answered or refused
    (UNAVAILABLE / CANCELLED), nothing else; the process must exit 0.
    """
    clients = [_Client(server.target, workload, 1000 + i, None) for i in range(workload.clients)]
    for c in clients:
        c.outcomes = []
    stop = threading.Event()
    threads = [threading.Thread(target=c.run_until, args=(stop,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    time.sleep(0.5)  # calls are in flight now
    signalled = time.monotonic()
    server.terminate()
    try:
        code: int | None = server.wait(grace_timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    shutdown_s = time.monotonic() - signalled
    time.sleep(0.2)  # a few calls against the stopped server
    stop.set()
    for t in threads:
        t.join(workload.deadline_s + 10)
    in_flight: Counter[str] = Counter()
    after: Counter[str] = Counter()
    for c in clients:
        c.channel.close()
        for started, finished, outcome in c.outcomes or []:
            if started < signalled <= finished:
                in_flight[outcome] += 1
            elif started >= signalled:
                after[outcome] += 1
    in_flight_ok = in_flight.pop("OK", 0)
    return ShutdownReport(
        exit_code=code,
        shutdown_s=round(shutdown_s, 3),
        in_flight_ok=in_flight_ok,
        in_flight_failed=dict(in_flight),
        after_signal_ok=after.pop("OK", 0),
        refused={code: after.pop(code) for code in ("UNAVAILABLE", "CANCELLED") if code in after},
        other_errors=dict(after),
    )


# --- the soak -------------------------------------------------------------------------------------------
@dataclass
class SoakResult:
    workload: dict[str, object]
    load: dict[str, object]
    rss_start_mb: float | None
    rss_end_mb: float | None
    rss_max_mb: float | None
    rss_growth_mb: float | None
    rss_bound_mb: float
    # (seconds into the load, MiB), about ten evenly spaced samples: a leak is a steady slope,
    # caches filling are a curve that flattens.
    rss_series_mb: list[tuple[float, float]]
    shutdown: dict[str, object]
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _rss_series(samples: list[tuple[float, int]]) -> list[tuple[float, float]]:
    """About ten evenly spaced (seconds, MiB) samples, and always the last one."""
    return [(round(t, 1), _mb(rss) or 0.0) for t, rss in samples[:: max(1, len(samples) // 10)]] + [
        (round(samples[-1][0], 1), _mb(samples[-1][1]) or 0.0)
    ]


def _soak_problems(
    report: LoadReport, growth_mb: float | None, rss_bound_mb: float, shutdown: ShutdownReport
) -> list[str]:
    """What fails a soak: errors or fallbacks under load, RSS growth over the bound, and a shutdown
    that did not exit 0, failed calls in flight, or answered later calls with anything but a refusal."""
    problems = []
    if report.error_count:
        problems.append(f"{report.error_count} errors: {dict(report.errors)}")
    if report.fallback_count:
        problems.append(f"{report.fallback_count} fallbacks: {dict(report.fallbacks)}")
    if growth_mb is not None and growth_mb > rss_bound_mb:
        problems.append(f"RSS grew {growth_mb:.1f} MiB (bound {rss_bound_mb} MiB)")
    if shutdown.exit_code != 0:
        problems.append(f"server exit code {shutdown.exit_code} after SIGTERM")
    if shutdown.in_flight_failed:
        problems.append(f"calls in flight at SIGTERM failed: {shutdown.in_flight_failed}")
    if shutdown.other_errors:
        problems.append(f"errors after SIGTERM other than a refusal: {shutdown.other_errors}")
    return problems


def soak(
    workload: Workload, server_args: Sequence[str] = (), *, rss_bound_mb: float = 64.0, env: dict[str, str] | None = None,
    log: object = None, server_log: str = "",
) -> SoakResult:
    """Start a server, warm it, run the load, check memory and a graceful shutdown under load.

    `server_log`, if set, is a file that receives the server's log at the end.
    """
    say = log if callable(log) else (lambda _msg: None)
    # Defaults for a bounded run (later flags win): health goes NOT_SERVING half a second before the
    # port stops accepting; the item cache holds 2x the catalog, so new items reach a plateau.
    # No /metrics listener by default (its fixed port may be taken by a running sidecar).
    defaults = ["--drain-delay-seconds", "0.5", "--item-cache-size", str(2 * workload.catalog), "--metrics-address="]
    with ServerProcess([*defaults, *server_args], env=env) as server:
        server.wait_serving()
        say(f"server pid {server.proc.pid} SERVING on {server.target}; warming caches")
        warm_up(server.target, workload)
        rss_start = server.rss()
        samples: list[tuple[float, int]] = [(0.0, rss_start or 0)]

        def tick(elapsed: float) -> None:
            rss = server.rss()
            samples.append((elapsed, rss or 0))
            if int(elapsed) % 30 == 0:
                say(f"t={elapsed:6.0f}s rss={_mb(rss)} MiB")

        say(f"running {workload.clients} clients for {workload.duration_s:.0f} s (rss start {_mb(rss_start)} MiB)")
        report = run_load(server.target, workload, on_tick=tick)
        rss_end = server.rss()
        samples.append((workload.duration_s, rss_end or 0))
        say("load done; SIGTERM under load")
        shutdown = shutdown_under_load(server, workload)
        if server_log:
            Path(server_log).write_text(server.log + "\n")
        growth = None if rss_start is None or rss_end is None else (rss_end - rss_start) / 2**20
        return SoakResult(
            workload=asdict(workload),
            load=report.summary(),
            rss_start_mb=_mb(rss_start),
            rss_end_mb=_mb(rss_end),
            rss_max_mb=_mb(max(rss for _, rss in samples)),
            rss_growth_mb=None if growth is None else round(growth, 1),
            rss_bound_mb=rss_bound_mb,
            rss_series_mb=_rss_series(samples),
            shutdown=asdict(shutdown),
            problems=_soak_problems(report, growth, rss_bound_mb, shutdown),
        )


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    d = Workload()
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=d.clients, help=f"concurrent clients (default {d.clients})")
    parser.add_argument("--candidates", type=int, default=d.candidates, help="candidates per Rerank")
    parser.add_argument("--catalog", type=int, default=d.catalog, help="distinct catalog items")
    parser.add_argument("--users", type=int, default=d.users, help="distinct users")
    parser.add_argument("--new-item-fraction", type=float, default=d.new_item_fraction, help="share of never-seen candidates")
    parser.add_argument("--deadline", type=float, default=d.deadline_s, help="client deadline per call, seconds")
    parser.add_argument("--rss-bound-mb", type=float, default=64.0, help="fail if server RSS grows more than this")
    parser.add_argument("--report", default="", help="also write the result as JSON to this file")
    parser.add_argument("--server-log", default="", help="write the server's log to this file at the end")
    parser.add_argument(
        "server_args", nargs=argparse.REMAINDER, help="after `--`: flags for the server, e.g. -- --encoder fake"
    )


def run_soak_command(args: argparse.Namespace) -> int:
    workload = Workload(
        clients=args.clients,
        duration_s=args.duration,
        candidates=args.candidates,
        catalog=args.catalog,
        users=args.users,
        new_item_fraction=args.new_item_fraction,
        deadline_s=args.deadline,
    )
    server_args = [a for a in args.server_args if a != "--"]
    result = soak(
        workload,
        server_args,
        rss_bound_mb=args.rss_bound_mb,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        server_log=args.server_log,
    )
    text = json.dumps(asdict(result), indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    print("PASS" if result.passed else "FAIL: " + "; ".join(result.problems), file=sys.stderr)
    return 0 if result.passed else 1
