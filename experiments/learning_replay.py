"""The learning loop on ml-100k, end to end: a real server, live traffic, the learner next to it.

1. `reranker serve` (a child process) with the training log on and three arms: `canary` and `main`
   (head files the learner writes; neither exists at start, so everything serves zero-shot) and
   the rest of treatment, which stays zero-shot: the floor;
2. `reranker replay`'s code plays ml-100k's later half (by time) as live traffic: before each
   event, the user's item-kNN upstream list (fitted on the first half; consumed items kept in it)
   is reranked, then the event is recorded;
3. the learner (reranker.learner.learner, in this process) looks at the log after every
   `--look` lists, in lockstep with the replay (the traffic pauses while it trains, so the run does
   not depend on how fast this machine trains); it trains, gates, canaries, promotes or rolls back
   on its own;
4. afterwards: online NDCG@10 per arm over time, from the server's log (the learner's online join),
   drawn with the decisions marked (`--plot`); and the target: on the second half of the replay,
   the promoted head's online NDCG@10 (main arm lists served by a head) over the zero-shot arm's,
   with a 95% interval (delta method).

    python experiments/learning_replay.py --data ../shared/data/ml-100k --work build/learning-replay \
        --plot docs/learning-loop-replay.png
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from reranker.client import RerankerClient
from reranker.config import Settings
from reranker.evaluation import formats, replay
from reranker.evaluation.convert_ml100k import convert
from reranker.learner.learner import Learner, matches
from reranker.learning.logsource import LogSource, Outcome, join
from reranker.tools.loadtest import ServerProcess


def ratio_interval(a: list[float], b: list[float]) -> dict[str, float]:
    """mean(a) / mean(b) with a 95% interval (delta method, independent samples)."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    r = ma / mb
    se = r * math.sqrt(va / (na * ma * ma) + vb / (nb * mb * mb))
    return {"ratio": round(r, 4), "low": round(r - 1.96 * se, 4), "high": round(r + 1.96 * se, 4),
            "ndcg_head": round(ma, 5), "ndcg_zero_shot": round(mb, 5), "lists_head": na, "lists_zero_shot": nb}


def role(o: Outcome) -> str:
    if o.arm == "treatment":
        return "zero-shot (floor arm)"
    return f"{o.arm} ({'head' if '+' in o.model_version else 'zero-shot'})"


def plot(outcomes: list[Outcome], decisions: list[dict], times: list[float], bins: int, path: Path, title: str,
         window: int = 5000) -> None:
    """Each arm's online NDCG@10 over the trailing `window` lists (all arms), with the decisions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(times)
    fig, ax = plt.subplots(figsize=(10, 5))
    for arm, color in (("treatment", "tab:gray"), ("main", "tab:blue"), ("canary", "tab:orange")):
        mine = [o for o in outcomes if o.arm == arm]
        at = [bisect.bisect_left(times, o.served_at) for o in mine]
        xs, ys = [], []
        for b in range(1, bins + 1):
            hi = b * n // bins
            values = [o.ndcg for o, i in zip(mine, at) if hi - window <= i < hi]
            if len(values) >= 100:
                xs.append(hi)
                ys.append(sum(values) / len(values))
        label = {"treatment": "zero-shot arm (20%)", "main": "main arm (60%)", "canary": "canary arm (20%)"}[arm]
        ax.plot(xs, ys, marker="o", ms=2.5, color=color, label=label)
    colors = {"canary": "tab:orange", "promote": "tab:green", "rollback": "tab:red", "rejected": "tab:purple",
              "withdrawn": "tab:brown", "floor": "black"}
    seen = set()
    for d in decisions:
        x = bisect.bisect_left(times, d["time"])
        kind = d["decision"]
        ax.axvline(x, color=colors.get(kind, "k"), ls="--", lw=1, label=kind if kind not in seen else None)
        seen.add(kind)
    ax.axvline(n / 2, color="k", lw=0.8, alpha=0.3)
    ax.set_xlabel("served lists (replay order)")
    ax.set_ylabel(f"online NDCG@10 (last {window:,} lists)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    p.add_argument("--work", type=Path, default=REPO / "build" / "learning-replay")
    p.add_argument("--encoder", default="transformer", choices=("transformer", "fake"))
    p.add_argument("--start", type=float, default=0.5, help="share of the timeline before lists start (profiles only)")
    p.add_argument("--stop", type=float, default=1.0)
    p.add_argument("--max-users", type=int, default=0)
    p.add_argument("--num-candidates", type=int, default=50)
    p.add_argument("--look", type=int, default=500, help="lists between two learner looks")
    p.add_argument("--window-lists", type=int, default=20_000)
    p.add_argument("--retrain-lists", type=int, default=4_000)
    p.add_argument("--min-lists", type=int, default=500)
    p.add_argument("--bins", type=int, default=50)
    p.add_argument("--analyze", action="store_true", help="only read --work's log and history again (no replay)")
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = args.work
    if args.analyze:
        return analyze(work, args, None, [], 0.0)
    if work.exists():
        shutil.rmtree(work)
    (work / "heads").mkdir(parents=True)
    ml = work / "ml"
    convert(args.data, ml)
    arms = f"canary=20:{work / 'heads' / 'canary.npz'},main=60:{work / 'heads' / 'main.npz'}"
    served = ["--encoder", args.encoder, "--metrics-address", "", "--no-access-log",
              "--training-log-dir", str(work / "logs" / "pod-0"), "--training-log-flush-seconds", "0.2",
              "--training-log-max-file-bytes", str(8 << 20), "--online-metrics-window-seconds", "3600",
              "--experiment-arms", arms, "--head-reload-seconds", "0.2", "--user-cache-size", "5000"]
    settings = Settings(
        encoder=args.encoder, experiment_arms=arms, online_metrics_window_seconds=3600.0, user_cache_size=5000,
        learn_log_root=str(work / "logs"), learn_items=str(ml / "items.tsv"),
        learn_history_path=str(work / "history.jsonl"), learn_window_lists=args.window_lists,
        learn_retrain_lists=args.retrain_lists, learn_min_lists=args.min_lists, log_level="INFO",
    )
    learner = Learner(settings)
    items = formats.read_items(ml / "items.tsv")
    events = replay.timeline(formats.read_events(ml / "events.tsv"), args.max_users)
    looks: list[dict] = []
    started = time.perf_counter()

    with ServerProcess(served) as server:
        server.wait_serving(600)

        def look(n: int) -> None:
            time.sleep(0.5)  # the training log's flush interval, twice
            t = time.perf_counter()
            entry = learner.tick()
            looks.append({"lists": n, "seconds": round(time.perf_counter() - t, 1),
                          "decision": entry["decision"] if entry else None})
            if entry:
                print(json.dumps({"lists": n, "decision": entry["decision"], "reason": entry["reason"]}), flush=True)
                time.sleep(0.6)  # the sidecar's reload interval, and then some

        with RerankerClient(server.target, timeout_s=60.0) as client:
            ids = list(items)  # the catalog first, in small batches: the real encoder is slow on a busy machine
            for i in range(0, len(ids), 64):
                client.upsert_items([(x, items[x]) for x in ids[i : i + 64]], timeout_s=600.0)
            report = replay.replay(client, items, events, fit_fraction=args.start, start=args.start, stop=args.stop,
                                   num_candidates=args.num_candidates, include_seen=True, every=args.look,
                                   on_lists=look, upsert=False)
        time.sleep(0.5)
        server.terminate()
        server.wait(60)
    return analyze(work, args, report.summary(10), looks, time.perf_counter() - started)


def analyze(work: Path, args: argparse.Namespace, replayed: dict | None, looks: list[dict], seconds: float) -> int:
    from reranker.learning.publishing import History

    settings = Settings()
    positive = {name for name, w in settings.users.parsed_event_weights().items() if w > 0}
    source = LogSource(work / "logs")
    source.refresh()
    outcomes = join(source.lists, source.events, positive, 3600.0, 10)
    times = [x.served_at for x in source.lists]
    half = times[len(times) // 2]
    second = [o for o in outcomes if o.served_at >= half]
    head = [o.ndcg for o in second if o.arm == "main" and not matches(o.model_version, None)]
    zero = [o.ndcg for o in second if o.arm == "treatment"]
    decisions = History(work / "history.jsonl").entries
    summary = {
        "replay": replayed, "wall_seconds": round(seconds, 1),
        "learner_seconds": round(sum(x["seconds"] for x in looks), 1),
        "decisions": [{"lists": bisect.bisect_left(times, d["time"]), "decision": d["decision"], "version": d["version"],
                       "reason": d["reason"], "offline": d.get("offline"), "online": d.get("online")} for d in decisions],
        "second_half": ratio_interval(head, zero) if head and zero else {"head_lists": len(head), "zero_shot_lists": len(zero)},
        "per_arm_second_half": {
            r: {"lists": len(v), "ndcg@10": round(sum(v) / len(v), 5)}
            for r in sorted({role(o) for o in second})
            for v in [[o.ndcg for o in second if role(o) == r]]
        },
    }
    if replayed is None and (work / "summary.json").exists():  # --analyze: keep the run's own numbers
        earlier = json.loads((work / "summary.json").read_text())
        summary.update({k: earlier[k] for k in ("replay", "wall_seconds", "learner_seconds") if k in earlier})
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if args.plot:
        target = summary["second_half"]
        title = (f"ml-100k replayed as live traffic ({len(times):,} lists, {args.encoder} encoder, consumed items kept), "
                 f"the learner next to it\nsecond half: promoted head / zero-shot online NDCG@10 = {target.get('ratio')} "
                 f"(95% [{target.get('low')}, {target.get('high')}])")
        plot(outcomes, decisions, times, args.bins, args.plot, title)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
