"""Server CPU of one Rerank, by stage: the server side of `reranker bench rerank --breakdown`.

`python -m reranker.tools.stagecpu <serve flags>` runs the real server (build_server, the real
RerankService, servicer and grpc.aio transport) with thread-CPU timers wrapped around the parts
of a Rerank: the request deserializer, the handler layers (error mapping, observation, servicer),
convert.rerank_request, every stage of the pipeline's stage lists (whatever they are: a stage not
named in ROWS gets a row of its own), the training-log hook and the response encoding. The timers
are installed by this module, in this process only: `reranker serve` has none of them.

The bench talks to it over stdin / stdout, one JSON line per command:
  snapshot   cumulative counters: {"process_ns", "calls", "timer_calls", "blocked", "spans": {name: ns},
             "threads": {thread: ns}}
  floor R C  thread CPU of the scoring math alone (one gather of C rows of an R x D float32 matrix,
             D the served vectors' size, one GEMM against FLOOR_QUERY_ROWS query vectors), in this process
  timer      thread CPU of one timer read
End of input stops the server.

`breakdown(before, after)` turns two snapshots into rows of CPU per request. Transport and asyncio
is what the process used beyond the timed parts (grpc's threads, the event loop, the metrics
endpoint): total minus everything else. The timers' own cost (a thread-CPU clock read is a system
call, about 1 us) is a row of its own, so the rows add up to the process total. Cyclic garbage
collections (a gc.callbacks hook) and the freeing of one call's objects (request, result, response:
freed at the next call's start) are rows of their own too, and each snapshot has every thread's CPU
(/proc), so the transport row splits into the event loop's thread and grpc's own threads.

Exact for warm requests answered on the event loop (every vector cached, profiles in process, the
bench's default): where a request waits (encoding, Redis profiles) the handler spans also count
what the loop did for other requests meanwhile; `blocked` counts those requests.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# The query vectors of the scoring floor: long-term and session user vectors and ~20 history rows.
FLOOR_QUERY_ROWS = 22

TRANSPORT = "transport + asyncio"
DECODE = "request decode + validation"
ARM = "arm / experiment"
VECTORS = "vector lookup"
USER = "user state"
SCORING = "scoring math"
CONSUMED = "consumed policy"
ORDERING = "ordering"
ENCODE = "response encode"
OBSERVE = "logs, metrics, tracing"
TRAINING = "training-log hooks"
GLUE = "handler + pipeline glue"
TIMERS = "breakdown timers (bench only)"
GC = "garbage collection"
RELEASE = "freeing a call's objects"

# The server's event-loop thread (reranker.serving.server.EventLoopThread's default name).
LOOP_THREAD = "grpc-loop"
# Row of each timed span; a pipeline stage not listed here gets a row of its own ("stage <name>").
ROWS: dict[str, str] = {
    "deserialize": DECODE, "rerank_request": DECODE, "dedupe": DECODE,
    "choose_arm": ARM, "admit": ARM,
    "candidate_vectors": VECTORS, "context_events": VECTORS,
    "user_state": USER,
    "score": SCORING,
    "consumed_policy": CONSUMED,
    "cut_and_explain": ORDERING,
    "encode_response": ENCODE, "serialize": ENCODE,
    "training_log": TRAINING,
}
ROW_ORDER = (
    TRANSPORT, DECODE, ARM, VECTORS, USER, SCORING, CONSUMED, ORDERING, ENCODE, OBSERVE, TRAINING, GLUE, GC, RELEASE,
)
# Spans that contain others: their own share is what remains after their children.
_PARENTS = ("handler", "observe", "servicer", "pipeline")


class StageClock:
    """Cumulative thread-CPU nanoseconds per span name, and how many timer reads were made.

    Two rows are measured apart from the spans they happen in. A cyclic garbage collection (timed by a
    `gc.callbacks` hook) runs inside whatever allocated last: its time goes to the "gc" span and is
    taken out of every span open on that thread. And the objects of one Rerank (its request message,
    its result's arrays, the response) are kept when the handler returns and freed at the start of
    the next call, in the "release" span: otherwise grpc frees them after the handler, outside any span."""

    def __init__(self) -> None:
        self.spans: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.blocked = 0
        self._stage_names: list[str] = []
        self._open = threading.local()  # per thread: the names of the spans open, innermost last
        self._gc_started = 0
        self._kept: object = None
        self._timed_drop = self.timed("release", self._drop)  # wrapped once, not per call

    def add(self, name: str, ns: int) -> None:
        self.spans[name] = self.spans.get(name, 0) + ns
        self.counts[name] = self.counts.get(name, 0) + 1

    def open_spans(self) -> list[str]:
        stack: list[str] | None = getattr(self._open, "stack", None)
        if stack is None:
            stack = self._open.stack = []
        return stack

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock, add, open_spans = time.thread_time_ns, self.add, self.open_spans

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            stack = open_spans()
            depth = len(stack)
            stack.append(name)
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                add(name, clock() - t0)
                del stack[depth:]

        return run

    def timed_async(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock, add, open_spans = time.thread_time_ns, self.add, self.open_spans

        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> Any:
            stack = open_spans()
            depth = len(stack)
            stack.append(name)
            t0 = clock()
            try:
                return await fn(*args, **kwargs)
            finally:
                add(name, clock() - t0)
                del stack[depth:]  # a call that waited (blocked) may have seen others' spans meanwhile

        return run

    def stage(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """A pipeline stage, timed under its own name."""
        name = getattr(fn, "__name__", repr(fn))
        if name not in self._stage_names:
            self._stage_names.append(name)
        return self.timed(name, fn)

    def on_gc(self, phase: str, _info: dict[str, Any]) -> None:
        """gc.callbacks hook: a collection's CPU goes to "gc", out of the spans it ran in."""
        if phase == "start":
            self._gc_started = time.thread_time_ns()
            return
        ns = time.thread_time_ns() - self._gc_started
        self.add("gc", ns)
        for name in self.open_spans():  # (a span's first run may not have been added yet)
            self.spans[name] = self.spans.get(name, 0) - ns

    def keep(self, objects: object) -> None:
        """Hold one call's objects; the next call frees them, timed (`release`)."""
        self._kept = objects

    def release(self) -> None:
        """Free the previous call's objects in the "release" span."""
        if self._kept is not None:
            self._timed_drop()

    def _drop(self) -> None:
        self._kept = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "process_ns": time.process_time_ns(),
            "calls": self.counts.get("handler", 0),
            "timer_calls": 2 * sum(self.counts.values()),
            "blocked": self.blocked,
            "spans": dict(self.spans),
            "stages": list(self._stage_names),
            "threads": thread_cpu_ns(),
        }


def thread_cpu_ns() -> dict[str, int]:
    """CPU nanoseconds of each live thread of this process (Linux /proc; {} elsewhere), by the Python
    thread's name, or by the kernel's name for grpc's own threads."""
    import os

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, int] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            name = names.get(int(tid))
            if name is None:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        out[f"{name} ({tid})"] = ns
    return out


def instrument(clock: StageClock) -> None:
    """Wrap the parts of a Rerank with `clock`'s timers. Call before build_server (the handlers are
    bound when the server is built) and before RerankService is created."""
    from reranker.learning import traininglog
    from reranker.pipeline import pipeline, stages
    from reranker.serving import convert, observability, servicer

    for module in (stages, pipeline):  # whichever module the pipeline reads its stage lists from
        for attr in ("GATES", "STAGES"):
            found = getattr(module, attr, None)
            if isinstance(found, tuple):
                setattr(module, attr, tuple(clock.stage(s) for s in _unwrapped(found)))
    for entry in ("run", "try_cached"):
        if hasattr(pipeline.RerankPipeline, entry):
            setattr(pipeline.RerankPipeline, entry, clock.timed("pipeline", getattr(pipeline.RerankPipeline, entry)))
    traininglog.TrainingLog.served = clock.timed("training_log", traininglog.TrainingLog.served)  # type: ignore[method-assign]
    convert.rerank_request = clock.timed("rerank_request", convert.rerank_request)
    convert.encode_rerank_response = clock.timed("encode_response", convert.encode_rerank_response)
    servicer.RerankerServicer.Rerank = clock.timed_async("servicer", servicer.RerankerServicer.Rerank)  # type: ignore[method-assign]
    blocking = servicer.RerankerServicer._blocking

    async def counted_blocking(*args: Any, **kwargs: Any) -> Any:
        clock.blocked += 1
        return await blocking(*args, **kwargs)

    servicer.RerankerServicer._blocking = counted_blocking  # type: ignore[method-assign]
    convert.serialize_rerank_response = clock.timed("serialize", convert.serialize_rerank_response)
    tolerant, guarded = servicer.tolerant, servicer.guarded
    servicer.tolerant = lambda deserializer: clock.timed("deserialize", tolerant(deserializer))  # type: ignore[assignment]

    def timed_guarded(behavior: Any, method: str, **kw: Any) -> Any:
        handler = clock.timed_async("handler", guarded(behavior, method, **kw))
        if method != "Rerank":
            return handler

        async def rerank(request: Any, context: Any) -> Any:
            clock.release()
            response = await handler(request, context)
            clock.keep((request, response))
            return response

        return rerank

    servicer.guarded = timed_guarded  # type: ignore[assignment]
    gc.callbacks.append(clock.on_gc)
    observed = observability.Observer.observed

    def timed_observed(self: Any, behavior: Any, method: str, *, streaming: bool) -> Any:
        return clock.timed_async("observe", observed(self, behavior, method, streaming=streaming))

    observability.Observer.observed = timed_observed  # type: ignore[method-assign]


def _unwrapped(stage_list: Sequence[Callable[..., Any]]) -> list[Callable[..., Any]]:
    return [getattr(s, "__wrapped__", s) for s in stage_list]


def timer_cost_ns(reads: int = 20_000) -> float:
    """Thread CPU one thread_time_ns() read costs (a system call on Linux)."""
    clock = time.thread_time_ns
    t0 = clock()
    for _ in range(reads):
        clock()
    return (clock() - t0) / (reads + 1)


def scoring_floor_us(rows: int, dim: int, candidates: int, batches: int = 10, per_batch: int = 200) -> dict[str, float]:
    """Thread CPU of the scoring math alone: one gather of `candidates` rows of a rows x dim float32
    matrix, one GEMM of them against FLOOR_QUERY_ROWS stacked query vectors. Median and best of
    `batches` batches, in microseconds per request."""
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((max(rows, candidates), dim)).astype(np.float32)
    queries = rng.standard_normal((FLOOR_QUERY_ROWS, dim)).astype(np.float32)
    picks = [rng.choice(len(matrix), size=candidates, replace=False) for _ in range(16)]
    out = np.empty((candidates, FLOOR_QUERY_ROWS), dtype=np.float32)
    for idx in picks:  # warm-up
        np.matmul(matrix[idx], queries.T, out=out)
    means = []
    for _ in range(batches):
        t0 = time.thread_time_ns()
        for i in range(per_batch):
            np.matmul(matrix[picks[i % len(picks)]], queries.T, out=out)
        means.append((time.thread_time_ns() - t0) / per_batch / 1000.0)
    return {"median_us": float(np.median(means)), "best_us": float(min(means)), "rows": float(len(matrix)),
            "dim": float(dim), "candidates": float(candidates), "query_rows": float(FLOOR_QUERY_ROWS)}


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two snapshots (a snapshot itself is the delta from the start)."""
    out = {k: after[k] - before[k] for k in ("process_ns", "calls", "timer_calls", "blocked")}
    out["spans"] = {k: v - before["spans"].get(k, 0) for k, v in after["spans"].items()}
    out["stages"] = after["stages"]
    out["threads"] = {k: v - before.get("threads", {}).get(k, 0) for k, v in after.get("threads", {}).items()}
    return out


def combined(deltas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several deltas (the bench's measured slices)."""
    out: dict[str, Any] = {
        "process_ns": 0, "calls": 0, "timer_calls": 0, "blocked": 0, "spans": {}, "stages": [], "threads": {},
    }
    for d in deltas:
        for k in ("process_ns", "calls", "timer_calls", "blocked"):
            out[k] += d[k]
        for part in ("spans", "threads"):
            for k, v in d.get(part, {}).items():
                out[part][k] = out[part].get(k, 0) + v
        out["stages"] = d["stages"]
    return out


def breakdown(window: dict[str, Any], timer_ns: float) -> dict[str, Any]:
    """CPU per request (us) by row over a delta (or combined deltas); rows add up to `total_us`."""
    calls = window["calls"]
    if calls <= 0:
        raise ValueError("no Rerank in the measured window")
    spans = {k: v / calls / 1000.0 for k, v in window["spans"].items()}
    per = spans.get
    stages = {name: per(name, 0.0) for name in window["stages"]}
    rows = dict.fromkeys(ROW_ORDER, 0.0)
    for name in ("deserialize", "rerank_request", "encode_response", "serialize", "training_log", *stages):
        row = ROWS.get(name, f"stage {name}")
        rows[row] = rows.get(row, 0.0) + per(name, 0.0)
    rows[OBSERVE] = per("observe", 0.0) - per("servicer", 0.0)
    rows[GLUE] = (
        per("handler", 0.0) - per("observe", 0.0)
        + per("servicer", 0.0) - per("rerank_request", 0.0) - per("pipeline", 0.0) - per("encode_response", 0.0)
        + per("pipeline", 0.0) - sum(stages.values()) - per("training_log", 0.0)
    )
    rows[GC] = per("gc", 0.0)
    rows[RELEASE] = per("release", 0.0)
    total = window["process_ns"] / calls / 1000.0
    rows[TIMERS] = window["timer_calls"] / calls * timer_ns / 1000.0
    rows[TRANSPORT] = total - sum(v for k, v in rows.items() if k != TRANSPORT)
    threads = {k: v / calls / 1000.0 for k, v in window.get("threads", {}).items()}
    report = {
        "requests": calls, "total_us": total, "rows": rows, "stages_us": stages,
        "blocked": window["blocked"], "timer_ns": timer_ns, "threads_us": threads,
    }
    loop = sum(us for name, us in threads.items() if name.startswith(LOOP_THREAD))
    if loop > 0:  # every timed part runs on the loop's thread (warm calls): the rest of its CPU is transport
        report["transport_us"] = {"event loop": loop - (total - rows[TRANSPORT]), "other threads": total - loop}
    return report


def table(report: dict[str, Any], floor: dict[str, float] | None = None) -> str:
    """The breakdown as aligned text lines."""
    total = report["total_us"]
    lines = [f"breakdown: server CPU per request by stage (requests={report['requests']}, "
             f"blocked={report['blocked']}, timer_read_ns={report['timer_ns']:.0f})"]
    lines.append(f"  {'stage':<34} {'us/req':>9} {'share':>7}")
    for name, us in report["rows"].items():
        lines.append(f"  {name:<34} {us:>9.1f} {100.0 * us / total if total else 0.0:>6.1f}%")
    lines.append(f"  {'total (server process CPU)':<34} {total:>9.1f} {100.0:>6.1f}%")
    split = report.get("transport_us")
    if split:
        lines.append(f"  {TRANSPORT} = the event loop's thread outside the timed parts {split['event loop']:.1f} "
                     f"+ grpc's and other threads {split['other threads']:.1f}")
    threads = sorted(report.get("threads_us", {}).items(), key=lambda kv: -kv[1])
    if threads:
        lines.append("  by thread (us/req): " + ", ".join(f"{name} {us:.1f}" for name, us in threads if us >= 0.5))
    if floor is not None:
        lines.append(
            f"scoring floor: one gather of {floor['candidates']:.0f} x {floor['dim']:.0f} float32 rows + one GEMM "
            f"against {floor['query_rows']:.0f} query vectors: median_us={floor['median_us']:.1f} "
            f"best_us={floor['best_us']:.1f}"
        )
    return "\n".join(lines)


class StageCpuClient:
    """The bench's side of the protocol: a started `python -m reranker.tools.stagecpu` child."""

    def __init__(self, child: Any) -> None:
        self._child = child
        self._lock = threading.Lock()

    def ask(self, command: str) -> dict[str, Any]:
        with self._lock:
            self._child.stdin.write((command + "\n").encode())
            self._child.stdin.flush()
            line = self._child.stdout.readline()
        if not line:
            raise RuntimeError(f"the breakdown server gave no answer to {command!r} (exit {self._child.poll()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, Any]:
        return self.ask("snapshot")


def _answer(command: list[str], clock: StageClock, dim: Callable[[], int]) -> dict[str, Any]:
    if command[:1] == ["snapshot"]:
        return clock.snapshot()
    if command[:1] == ["floor"] and len(command) == 3:
        return scoring_floor_us(int(command[1]), dim(), int(command[2]))
    if command[:1] == ["timer"]:
        return {"timer_ns": timer_cost_ns()}
    return {"error": f"unknown command {' '.join(command)!r}"}


def _dim(service: Any) -> int:
    items = service.items
    if items is None:
        raise RuntimeError("the model is not loaded yet")
    return int(items.dim)


def main(argv: Sequence[str]) -> int:
    """Serve with `argv` as `reranker serve` flags; answer commands on stdin until it closes."""
    import os

    from reranker.config import Settings
    from reranker.service import RerankService
    from reranker.serving.logs import configure_logging
    from reranker.serving.server import build_server

    settings = Settings.from_sources(argv, os.environ)
    configure_logging(settings.observability)  # stderr: stdout carries the answers
    clock = StageClock()
    instrument(clock)
    running = build_server(settings, RerankService(settings), freeze_gc=True)
    try:
        for line in sys.stdin:
            if line.strip():
                print(json.dumps(_answer(line.split(), clock, lambda: _dim(running.service))), flush=True)
    finally:
        running.stop(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
