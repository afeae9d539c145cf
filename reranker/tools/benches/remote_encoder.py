"""encoder=remote against a real embedding server: fidelity, throughput through the sidecar, fail-open.

    reranker bench remote-encoder --infinity /path/to/infinity_emb
    reranker bench remote-encoder --encoder-url http://tei:8080 \
        --encoder-model sentence-transformers/all-MiniLM-L6-v2 --no-kill

With --infinity (or RERANKER_TEST_INFINITY_EMB) it starts `infinity_emb` serving the packaged MiniLM
weights on a loopback port; otherwise it uses the server at --encoder-url.

1. cosine between the server's vectors and the local encoder's (packaged MiniLM, torch) for the
   same --texts texts (half ml-100k movie titles, half MIND news titles): min / mean / p1;
2. UpsertItems of --upsert unseen news titles through an in-process gRPC sidecar with
   encoder=remote, then the same with the local encoder: texts/s each;
3. (unless --no-kill, and only for a server it started) --reranks Rerank calls of 5 unseen
   candidates from 2 clients, the server stopped (SIGTERM) a third of the way: how many answers were
   reranked, fallbacks (by reason) or errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from reranker.config import Settings
from reranker.model.encoder import PACKAGED_MODEL_NAME, TransformerEncoder, packaged_model_dir
from reranker.model.remote_encoder import RemoteEncoder
from reranker.service import RerankService
from reranker.serving.server import build_server
from reranker.tools.harness import SHARED_DATA
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc


def movie_titles(data: Path) -> list[str]:
    lines = (data / "ml-100k" / "ml-100k.item").read_text(encoding="latin-1").splitlines()[1:]
    return [line.split("\t")[1] for line in lines if line.count("\t") >= 1]


def news_titles(data: Path) -> list[str]:
    lines = (data / "mind-sample" / "news.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t")[3] for line in lines if line.count("\t") >= 3]


def sidecar_settings(args: argparse.Namespace, url: str, encoder: str) -> Settings:
    return Settings(
        address="127.0.0.1:0", metrics_address="", encoder=encoder, encoder_url=url, encoder_model=args.encoder_model,
        encoder_wait_seconds=300.0, encoder_request_timeout_ms=args.request_timeout_ms,
        encode_timeout_ms=args.request_timeout_ms, encode_batch_size=args.batch_size, torch_threads=args.torch_threads,
        access_log=False,
    )


def upsert_throughput(settings: Settings, texts: list[str], per_request: int, clients: int) -> float:
    running = build_server(settings, RerankService(settings))
    running.loader.join(600)
    assert running.service.ready, running.service.load_error
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RerankerServiceStub(channel)
            chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
            pending = list(enumerate(chunks))
            lock = threading.Lock()

            def worker() -> None:
                while True:
                    with lock:
                        if not pending:
                            return
                        number, chunk = pending.pop()
                    items = [pb.Item(item_id=f"n{number}-{i}", text=t) for i, t in enumerate(chunk)]
                    stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=600)

            started = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return len(texts) / (time.perf_counter() - started)
    finally:
        running.stop(0)


def fail_open_run(args: argparse.Namespace, url: str, stop_server: object) -> Counter[str]:
    settings = dataclasses.replace(sidecar_settings(args, url, "remote"), encode_timeout_ms=1000.0,
                                   encoder_request_timeout_ms=1000.0)
    running = build_server(settings, RerankService(settings))
    running.loader.join(600)
    outcomes: Counter[str] = Counter()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RerankerServiceStub(channel)
            lock = threading.Lock()

            def client(c: int) -> None:
                for i in range(args.reranks // 2):
                    cands = [pb.Candidate(item_id=f"k{c}-{i}-{j}", score=5.0 - j, text=f"unseen item {c} {i} {j}")
                             for j in range(5)]
                    try:
                        resp = stub.Rerank(pb.RerankRequest(user_id=f"u{c}", candidates=cands), timeout=5)
                        key = pb.Variant.Name(resp.variant)
                        if resp.variant == pb.VARIANT_FALLBACK:
                            key += "/" + pb.FallbackReason.Name(resp.fallback_reason)
                    except grpc.RpcError as exc:
                        key = "error/" + exc.code().name
                    with lock:
                        outcomes[key] += 1
                        if sum(outcomes.values()) == args.reranks // 3:
                            threading.Thread(target=stop_server).start()  # type: ignore[arg-type]

            threads = [threading.Thread(target=client, args=(c,)) for c in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        running.stop(0)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reranker bench remote-encoder", description=__doc__.splitlines()[0])
    p.add_argument("--infinity", default=os.environ.get("RERANKER_TEST_INFINITY_EMB", ""),
                   help="infinity_emb executable to start (serving the packaged MiniLM)")
    p.add_argument("--encoder-url", default="")
    p.add_argument("--encoder-model", default=PACKAGED_MODEL_NAME)
    p.add_argument("--data", type=Path, default=SHARED_DATA, help="holds ml-100k/ and mind-sample/")
    p.add_argument("--texts", type=int, default=200)
    p.add_argument("--upsert", type=int, default=1000)
    p.add_argument("--per-request", type=int, default=100, help="items per UpsertItems request")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="encode_batch_size (texts per server request)")
    p.add_argument("--torch-threads", type=int, default=0, help="local encoder's torch threads (0 = all CPUs)")
    p.add_argument("--request-timeout-ms", type=float, default=30_000.0)
    p.add_argument("--server-threads", type=int, default=1,
                   help="torch threads of the infinity_emb it starts (0 = its default: every core, which "
                        "oversubscribes a small machine that also runs the sidecar)")
    p.add_argument("--reranks", type=int, default=300)
    p.add_argument("--no-kill", action="store_true")
    args = p.parse_args(argv)

    server = None
    url = args.encoder_url
    if not url:
        if not args.infinity:
            p.error("give --encoder-url, or --infinity (or RERANKER_TEST_INFINITY_EMB) to start infinity_emb")
        from reranker.tools.harness import InfinityServer

        started = time.perf_counter()
        server = InfinityServer(packaged_model_dir(), args.encoder_model, args.infinity, threads=args.server_threads).start()
        url = server.url
        print(f"infinity_emb listening at {url} after {time.perf_counter() - started:.1f} s")
    try:
        half = args.texts // 2
        texts = movie_titles(args.data)[:half] + news_titles(args.data)[: args.texts - half]
        settings = sidecar_settings(args, url, "remote")
        remote = RemoteEncoder(settings.model)
        local = TransformerEncoder(dataclasses.replace(settings, encoder="transformer").model)
        print(f"remote encoder version {remote.version}; local {local.version}")
        cos = np.sum(remote.encode(texts) * local.encode(texts), axis=1)
        print(f"cosine remote vs local over {len(texts)} texts: min {cos.min():.7f} mean {cos.mean():.7f} "
              f"(largest 1 - cosine {1 - cos.min():.1e})")
        remote.close()

        titles = news_titles(args.data)[-args.upsert:]
        for name, encoder in (("remote", "remote"), ("local", "transformer")):
            rate = upsert_throughput(sidecar_settings(args, url, encoder), titles, args.per_request, args.clients)
            print(f"UpsertItems {len(titles)} texts through the sidecar, encoder={encoder}, batch {args.batch_size}, "
                  f"{args.clients} clients x {args.per_request} items/request: {rate:.0f} texts/s ({name})")

        if server is not None and not args.no_kill:
            outcomes = fail_open_run(args, url, server.stop)
            print(f"fail-open run, {args.reranks} Reranks (5 unseen candidates), server stopped after a third: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
