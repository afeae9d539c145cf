"""Where does a grpc.aio server's per-call CPU go, outside its handler? Echo servers that differ from
the bench's aio echo in one way each, measured side by side (interleaved slices, same client).

Each variant answers Rerank with the same fixed bytes (a 500-item packed response). Per request it
reports the server process's CPU, the CPU of the work its handler timed (thread CPU), and the
remainder: process CPU minus the timed work, i.e. what the transport and the event loop cost
around that handler. The plain echo's remainder is its whole cost.

Variants (--variants, comma separated):
  echo      the bench's aio echo: asyncio.run on the main thread, raw-bytes (de)serializers
  thread    the same on an event loop in a non-main thread (reranker.serving.server.EventLoopThread)
  config    thread + reranker serve's server options, maximum_concurrent_rpcs, health and reflection
  parse     echo with the RerankRequest deserializer (upb parse, timed)
  layers    echo whose handler goes through errormapping.guarded and Observer.observed (timed)
  numpy     echo whose handler does --numpy-us of numpy work on a few MB (gathers + GEMMs, timed)
  python    echo whose handler does --python-us of pure-Python work (small calls, dicts, timed)
  mixed     numpy + python, half each
  numpy-async  like numpy, but the handler awaits asyncio.sleep(0) after the work (one loop turn)
  numpy-small  like numpy, on data that fits in the L1/L2 caches (200 x 64 float32 rows, 50 KB)
  sleep     echo whose handler blocks the loop for --numpy-us without using the CPU (time.sleep)
  real      echo whose handler runs the real warm Rerank in process on the request's bytes (parse,
            convert, RerankService.try_cached, encode: scripts/hot_path_instructions.py's call, a fake
            encoder of the packaged model's size; timed) and still answers the fixed bytes
  spin      echo whose handler busy-waits --numpy-us on a clock (CPU, almost no memory; timed)

  PYTHONPATH=$PWD python experiments/echo_variants.py --variants echo,numpy,python --duration 12 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = (
    "echo", "thread", "config", "parse", "layers", "numpy", "python", "mixed", "numpy-async", "numpy-small", "sleep", "spin", "real",
)


# --- server side -----------------------------------------------------------------------------------
class _Work:
    """The timed part of a variant's handler."""

    def __init__(self, numpy_us: float, python_us: float, small: bool = False) -> None:
        rng = np.random.default_rng(0)
        rows, dim, picked = (200, 64, 100) if small else (2000, 384, 500)  # 50 KB or 3 MB (the bench's pool)
        self.matrix = rng.standard_normal((rows, dim)).astype(np.float32)
        self.queries = rng.standard_normal((22, dim)).astype(np.float32)
        self.picks = [rng.choice(rows, size=picked, replace=False) for _ in range(8)]
        self.numpy_reps = self._calibrate(self._numpy_once, numpy_us)
        self.python_reps = self._calibrate(self._python_once, python_us)
        self.ns = 0
        self.i = 0

    @staticmethod
    def _calibrate(once: Any, target_us: float) -> int:
        if target_us <= 0:
            return 0
        for _ in range(20):
            once(0)
        t0 = time.thread_time_ns()
        for i in range(50):
            once(i)
        per_us = (time.thread_time_ns() - t0) / 50 / 1000.0
        return max(1, round(target_us / per_us))

    def _numpy_once(self, i: int) -> None:
        rows = self.matrix[self.picks[i % len(self.picks)]]  # 768 KB gathered
        sims = rows @ self.queries.T
        np.argsort(-sims[:, 0])

    def _python_once(self, i: int) -> None:
        out: dict[str, Any] = {}
        for k in range(40):
            out[f"k{k}"] = _small(k, i)
        sorted(out.values())

    def run(self) -> None:
        t0 = time.thread_time_ns()
        self.i += 1
        for r in range(self.numpy_reps):
            self._numpy_once(self.i + r)
        for r in range(self.python_reps):
            self._python_once(self.i + r)
        self.ns += time.thread_time_ns() - t0


def _small(k: int, i: int) -> int:
    return (k * 31 + i) % 97


def serve(port: int, payload: bytes, variant: str, numpy_us: float, python_us: float) -> None:
    import asyncio

    import grpc
    from grpc import aio

    from reranker.ranking.scoring import single_threaded_blas
    from reranker.tools import stagecpu

    single_threaded_blas()  # as the server does at load
    numpy_share = {"numpy": numpy_us, "mixed": numpy_us / 2, "numpy-async": numpy_us, "numpy-small": numpy_us}.get(
        variant, 0.0
    )
    python_share = {"python": python_us, "mixed": python_us / 2}.get(variant, 0.0)
    work = _Work(numpy_share, python_share, small=variant == "numpy-small")
    calls = [0]
    spans = {"deserialize": 0}

    real = None
    if variant == "real":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
        import hot_path_instructions

        real, _ = hot_path_instructions._prepared("packed", 500, 384)  # the bench's pool, users and ids

    async def echo(_request: Any, _context: aio.ServicerContext) -> bytes:
        calls[0] += 1
        if real is not None:
            t0 = time.thread_time_ns()
            real(_request)  # type: ignore[operator]
            work.ns += time.thread_time_ns() - t0
        if numpy_share or python_share:
            work.run()
        if variant == "numpy-async":
            await asyncio.sleep(0)
        elif variant == "sleep":
            time.sleep(numpy_us / 1e6)
        elif variant == "spin":
            t0, clock = time.thread_time_ns(), time.perf_counter
            end = clock() + numpy_us / 1e6
            while clock() < end:
                pass
            work.ns += time.thread_time_ns() - t0
        return payload

    behavior: Any = echo
    deserializer: Any = lambda b: b  # noqa: E731
    if variant == "parse":
        from reranker.v1 import reranker_pb2 as pb

        def deserializer(data: bytes) -> Any:
            t0 = time.thread_time_ns()
            try:
                return pb.RerankRequest.FromString(data)
            finally:
                spans["deserialize"] += time.thread_time_ns() - t0
    if variant == "layers":
        from reranker.config import ObservabilitySettings
        from reranker.metrics import Metrics
        from reranker.serving.errormapping import guarded
        from reranker.serving.observability import Observer

        observer = Observer(ObservabilitySettings(), Metrics())
        inner = guarded(observer.observed(echo, "Echo", streaming=False), "Echo", streaming=False)

        async def layered(request: Any, context: aio.ServicerContext) -> bytes:
            t0 = time.thread_time_ns()
            try:
                return await inner(request, context)  # type: ignore[no-any-return]
            finally:
                work.ns += time.thread_time_ns() - t0

        behavior = layered

    handler = grpc.method_handlers_generic_handler(
        "reranker.v1.RerankerService",
        {"Rerank": grpc.unary_unary_rpc_method_handler(behavior, deserializer, lambda b: b)},
    )

    async def start() -> aio.Server:
        if variant == "config":
            from grpc_health.v1 import health, health_pb2_grpc
            from grpc_reflection.v1alpha import reflection

            options = [
                ("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20),
                ("grpc.so_reuseport", 0),
            ]
            server = aio.server(interceptors=[], options=options, maximum_concurrent_rpcs=256)
            server.add_generic_rpc_handlers((handler,))
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection(("reranker.v1.RerankerService", health.SERVICE_NAME), server)
        else:
            server = aio.server()
            server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server

    def snapshot() -> dict[str, Any]:
        return {"process_ns": time.process_time_ns(), "calls": calls[0], "work_ns": work.ns + spans["deserialize"],
                "threads": stagecpu.thread_cpu_ns()}

    if variant in ("thread", "config"):
        from reranker.serving.server import EventLoopThread

        loop = EventLoopThread()
        server = loop.run(start())  # noqa: F841 (kept: a dropped aio.Server stops)
        print("ready", flush=True)
        for line in sys.stdin:
            print(json.dumps(snapshot()), flush=True)
        loop.close()
        return

    async def main() -> None:
        server = await start()  # noqa: F841 (kept: a dropped aio.Server stops)
        print("ready", flush=True)
        reader = asyncio.get_running_loop().run_in_executor
        while True:
            line = await reader(None, sys.stdin.readline)
            if not line:
                return
            print(json.dumps(snapshot()), flush=True)

    asyncio.run(main())


# --- driver side -----------------------------------------------------------------------------------
def _payload(candidates: int) -> bytes:
    from reranker.v1 import reranker_pb2 as pb

    packed = pb.PackedItems(positions=np.arange(candidates, dtype="<u2").tobytes(),
                            scores=np.linspace(1, 0, candidates, dtype="<f4").tobytes())
    return pb.RerankResponse(request_id="0-0", packed_items=packed, model_version="echo").SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="echo,thread,config,parse,layers,numpy,python,mixed")
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=12.0, help="measured seconds per variant")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--numpy-us", type=float, default=800.0)
    parser.add_argument("--python-us", type=float, default=500.0)
    parser.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        port, path, variant, numpy_us, python_us = args.serve
        serve(int(port), Path(path).read_bytes(), variant, float(numpy_us), float(python_us))
        return 0

    import grpc

    from reranker.tools.bench import RerankWorkload, drive, load_texts
    from reranker.tools.harness import free_port
    from reranker.v1 import reranker_pb2_grpc as pb_grpc

    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    workload = RerankWorkload(args.candidates, 1.0, max(2000, args.candidates), 50, load_texts(None, 0), "packed")
    requests = [[workload.request(w, i) for i in range(50)] for w in range(args.concurrency)]
    tmp = tempfile.TemporaryDirectory(prefix="echo-variants-")
    path = Path(tmp.name) / "payload.bin"
    path.write_bytes(_payload(args.candidates))
    children: dict[str, tuple[subprocess.Popen[str], str]] = {}
    try:
        for v in variants:
            port = free_port()
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), str(path), v, str(args.numpy_us), str(args.python_us)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy(),
            )
            assert child.stdout is not None and child.stdout.readline().strip() == "ready", v
            children[v] = (child, f"127.0.0.1:{port}")
        totals = {v: {"requests": 0, "elapsed": 0.0, "process_ns": 0, "calls": 0, "work_ns": 0, "threads": {}}
                  for v in variants}

        def ask(child: subprocess.Popen[str]) -> dict[str, Any]:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("snapshot\n")
            child.stdin.flush()
            return json.loads(child.stdout.readline())  # type: ignore[no-any-return]

        for r in range(args.rounds):
            for v in variants:
                child, address = children[v]
                channels = [grpc.insecure_channel(address) for _ in range(min(4, args.concurrency))]
                stubs = [pb_grpc.RerankerServiceStub(ch) for ch in channels]

                def call(w: int, i: int) -> None:
                    stubs[w % len(stubs)].Rerank(requests[w][i % len(requests[w])], timeout=10)

                drive(call, args.concurrency, 0.0, 0.5 if r == 0 else 0.2)  # warm-up (not counted)
                before = ask(child)
                result = drive(call, args.concurrency, args.duration / args.rounds, 0.0)
                after = ask(child)
                for ch in channels:
                    ch.close()
                t = totals[v]
                t["requests"] += result.requests
                t["elapsed"] += result.elapsed_s
                for k in ("process_ns", "calls", "work_ns"):
                    t[k] += after[k] - before[k]
                for k, ns in after["threads"].items():
                    t["threads"][k] = t["threads"].get(k, 0) + ns - before["threads"].get(k, 0)
        print(f"candidates={args.candidates} concurrency={args.concurrency} duration_s={args.duration:g} "
              f"rounds={args.rounds} numpy_us={args.numpy_us:g} python_us={args.python_us:g} load={os.getloadavg()}")
        print(f"{'variant':<12} {'qps':>7} {'cpu/req':>9} {'work/req':>9} {'rest/req':>9}   threads (us/req)")
        for v in variants:
            t = totals[v]
            calls = max(1, t["calls"])
            cpu, work = t["process_ns"] / calls / 1e3, t["work_ns"] / calls / 1e3
            threads = sorted(((k.rsplit(" (", 1)[0], ns / calls / 1e3) for k, ns in t["threads"].items()),
                             key=lambda kv: -kv[1])
            merged: dict[str, float] = {}
            for name, us in threads:
                merged[name] = merged.get(name, 0.0) + us
            shown = ", ".join(f"{k} {us:.0f}" for k, us in merged.items() if us >= 1)
            print(f"{v:<12} {t['requests'] / max(t['elapsed'], 1e-9):>7.0f} {cpu:>9.1f} {work:>9.1f} "
                  f"{cpu - work:>9.1f}   {shown}")
        return 0
    finally:
        for child, _ in children.values():
            if child.stdin is not None:
                child.stdin.close()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
