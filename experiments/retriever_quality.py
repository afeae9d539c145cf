"""How good the built-in retrievers are on their own: NDCG@10 of each one's top list, leave-last-out.

    python experiments/retriever_quality.py --items items.tsv --events events.tsv [--split validation|eval]
        [--retrievers popularity,itemknn,als,ease,sasrec] [--include-seen] [--sasrec '{"epochs": 50}']

Each retriever is fitted on the histories and recommends its top `--num-candidates` for every user;
the script prints one JSON line per retriever: NDCG@10 with its 95% interval (mean +- 1.96 standard
errors over users), Recall@10, the share of consumed items in the top 10, the fit time, and its
NDCG over the `--reference` retriever's on the same users (paired ratio, 95% bootstrap interval).

`--split validation` (the default) drops every eval target first and holds out the event before it,
exactly like experiments/validate_head.py: choose retriever settings there. `--split eval` measures on
the targets `reranker eval` uses: run it once, with the settings chosen on validation.
"""

from __future__ import annotations

import argparse
import json
import time

from reranker.evaluation import formats, retrievers
from reranker.evaluation.metrics import MetricAccumulator, ndcg_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--retrievers", default="popularity,itemknn,als,ease,sasrec")
    parser.add_argument("--split", choices=("validation", "eval"), default="validation")
    parser.add_argument("--reference", default="ease", help="the retriever the others are compared with")
    parser.add_argument("--include-seen", action="store_true", help="keep consumed items in the lists")
    parser.add_argument("--sasrec", default="{}", help="SASRec constructor arguments as JSON")
    parser.add_argument("--num-candidates", type=int, default=100)
    args = parser.parse_args()

    catalog, split, histories = formats.read_split(args.items, args.events, args.split == "validation")
    users = list(histories)
    names = [n.strip() for n in args.retrievers.split(",") if n.strip()]
    accumulators: dict[str, MetricAccumulator] = {}
    rows = []
    for name in sorted(names, key=lambda n: n != args.reference):  # the reference first
        kwargs = json.loads(args.sasrec) if name == "sasrec" else {}
        started = time.perf_counter()
        lists = retrievers.make_retriever(name, **kwargs).fit(histories, catalog).recommend(
            users, args.num_candidates, include_seen=args.include_seen
        )
        fit_s = time.perf_counter() - started
        acc = MetricAccumulator()
        consumed = []
        for u in users:
            ids = [r.item_id for r in lists[u]]
            acc.add(ids, {split.target[u].item_id})
            seen = set(histories[u])
            consumed.append(sum(i in seen for i in ids[:10]) / 10)
        accumulators[name] = acc
        summary = acc.summary(len(catalog))
        row = {
            "split": args.split, "retriever": name, "users": len(users), "include_seen": args.include_seen,
            "ndcg@10": round(summary["ndcg@10"], 4),
            "ndcg@10_ci95": [round(summary["ndcg@10"] - 1.96 * summary["ndcg@10_se"], 4),
                             round(summary["ndcg@10"] + 1.96 * summary["ndcg@10_se"], 4)],
            "recall@10": round(summary["recall@10"], 4),
            "consumed@10": round(sum(consumed) / len(consumed), 4),
            "fit_s": round(fit_s, 1),
        }
        if name != args.reference and args.reference in accumulators:
            gain = ndcg_ratio(accumulators[args.reference], acc, digits=3)
            row[f"vs_{args.reference}"], row[f"vs_{args.reference}_ci95"] = gain["ratio"], gain["ci95"]
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
