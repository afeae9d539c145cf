"""Scale benchmark of `reranker train`: a generated log of 1M events, 100k items, 100k users.

    reranker bench train-scale [--workdir /tmp/scale] [--events 1000000] [--items 100000]
        [--users 100000] [--threads 1] [--encoder fake|transformer] [--runtime torch|onnx]
        [--encoder-sample 2000]

1. Generates items.tsv (a text per item: its topic's words and its own) and events.tsv: 1,000
   topics of 100 items each, every user follows two topics, items within a topic Zipf-popular,
   history lengths geometric (mean events / users, at least 2), timestamps increasing per user.
2. Runs `reranker train` on it in a subprocess (default retrievers, default caps) and prints one
   JSON line: wall seconds, CPU seconds (user + system: on a shared machine wall time drifts with
   the load, CPU time much less), events/s, the peak RSS of the training process (getrusage of
   the child), and the per-phase timings `reranker train` reports.
3. `--encoder-sample N` also times the real MiniLM encoder (`--runtime`) on N of the item texts
   and extrapolates to the catalog: encoding is a separate, embarrassingly parallel cost that
   the fake encoder leaves out of step 2.

Targets: <= 10 minutes wall and <= 4 GB peak RSS on 2 cores. No assertions.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reranker.tools.harness import child_env


def generate(workdir: Path, n_events: int, n_items: int, n_users: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per_topic = 100
    topics = max(1, n_items // per_topic)
    vocabulary = np.array([f"w{j}" for j in range(5000)])
    topic_words = rng.integers(0, len(vocabulary), size=(topics, 3))
    with (workdir / "items.tsv").open("w", encoding="utf-8") as fh:
        fh.write("item_id\ttext\n")
        for i in range(n_items):
            words = " ".join(vocabulary[topic_words[i // per_topic % topics]])
            fh.write(f"i{i}\t{words} item {i} {vocabulary[i % len(vocabulary)]}\n")
    lengths = np.maximum(2, rng.geometric(n_users / n_events, size=n_users))
    lengths = np.maximum(2, np.round(lengths * n_events / lengths.sum())).astype(np.int64)
    total = int(lengths.sum())
    users = np.repeat(np.arange(n_users), lengths)
    favourite = rng.integers(0, topics, size=(n_users, 2))
    topic = favourite[users, rng.integers(0, 2, size=total)]
    weights = 1.0 / np.arange(1, per_topic + 1)
    rank = rng.choice(per_topic, size=total, p=weights / weights.sum())
    items = np.minimum(topic * per_topic + rank, n_items - 1)
    start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    timestamps = 1_600_000_000 + rng.integers(0, 10**7, size=n_users)[users] + (np.arange(total) - start) * 60
    with (workdir / "events.tsv").open("w", encoding="utf-8") as fh:
        fh.write("user_id\titem_id\ttimestamp\tevent_type\n")
        for chunk in range(0, total, 100_000):
            sl = slice(chunk, chunk + 100_000)
            fh.write("".join(f"u{u}\ti{i}\t{t}\tclick\n" for u, i, t in zip(users[sl], items[sl], timestamps[sl])))
    return total


def train(workdir: Path, args: argparse.Namespace) -> dict[str, object]:
    cmd = [sys.executable, "-m", "reranker", "train", "--items", str(workdir / "items.tsv"),
           "--events", str(workdir / "events.tsv"), "--output", str(workdir / "head.npz"),
           "--encoder", args.encoder, "--runtime", args.runtime, "--torch-threads", str(args.threads), "--no-progress"]
    env = child_env(OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"reranker train failed with {done.returncode}")
    text = done.stdout
    report = json.loads(text[text.index("{") : text.rindex("}") + 1])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the training process (the only child)
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2), "report": report}  # ru_maxrss: kilobytes on Linux


def encoder_time(workdir: Path, args: argparse.Namespace, n_items: int) -> dict[str, object]:
    from reranker.config import Settings
    from reranker.model.loader import load_encoder
    from reranker.evaluation import formats
    from reranker.evaluation.train import encode_catalog

    texts = list(formats.read_items(workdir / "items.tsv").values())[: args.encoder_sample]
    encoder = load_encoder(Settings(encoder="transformer", runtime=args.runtime, torch_threads=args.threads).model)
    encode_catalog(encoder, texts[:64])  # warm-up
    started = time.perf_counter()
    encode_catalog(encoder, texts)
    seconds = time.perf_counter() - started
    return {"runtime": args.runtime, "texts": len(texts), "seconds": round(seconds, 1),
            "texts_per_s": round(len(texts) / seconds, 1), "catalog_estimate_s": round(n_items * seconds / len(texts), 1)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reranker bench train-scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/reranker-scale"))
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1, help="torch / ALS threads (2 spin-wait on a busy 2-core machine)")
    parser.add_argument("--encoder", default="fake", choices=("fake", "transformer"))
    parser.add_argument("--runtime", default="onnx", choices=("torch", "onnx"))
    parser.add_argument("--encoder-sample", type=int, default=0, help="also time the real encoder on N texts")
    parser.add_argument("--reuse", action="store_true", help="keep the generated files of an earlier run")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not (args.reuse and (args.workdir / "events.tsv").is_file()):
        generate(args.workdir, args.events, args.items, args.users)
    generate_s = time.perf_counter() - started
    events = sum(1 for _ in (args.workdir / "events.tsv").open(encoding="utf-8")) - 1
    result = train(args.workdir, args)
    report = result.pop("report")
    out = {
        "events": events, "items": args.items, "users": args.users, "threads": args.threads,
        "encoder": args.encoder, "generate_s": round(generate_s, 1), **result,
        "events_per_s": round(events / result["wall_s"]),
        "timings": {k: round(v, 1) for k, v in report["timings"].items()},
        "training_lists": report["training_lists"], "blend_users": report.get("blend_users"),
        "validation_on_history_labels": report["validation_on_history_labels"],
    }
    if args.encoder_sample:
        out["real_encoder"] = encoder_time(args.workdir, args, args.items)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
