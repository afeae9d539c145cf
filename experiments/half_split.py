"""Train on the upstream you have: one retriever's lists for half of the users train a head
(`reranker train --candidates`), the other half's lists from the same retriever evaluate it.

    python experiments/half_split.py --items items.tsv --events events.tsv --retriever ease --out-dir /tmp/half

1. Every user's last event is the target (leave-last-out); the retriever is fitted on the histories
   only and gives each user's top-N *with* consumed items (as a real upstream's lists are).
2. Users are split in two halves by a stable hash: A's lists go to `train_lists.tsv` (no timestamp
   column, so each list's label is its user's last event), B's to `eval_lists.tsv`.
3. Head `served`: `reranker train --candidates train_lists.tsv` (A's lists alone). Head
   `retrievers`: the default `reranker train` (built-in retriever lists, no --candidates).
4. Both heads score B's lists offline exactly as the server does (OfflineScorer; docs/ranking-quality.md's
   numbers are `reranker eval --candidates eval_lists.tsv --head-path ...` through a real server,
   which gives the same orders); printed: NDCG@10 of upstream and both heads, each head against
   the upstream and `served` against `retrievers`, with 95% paired bootstrap intervals over B's users.

B's users are never trained on as list owners; their histories (not their targets) are in the
events file, as they would be in a deployment. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

from reranker.config import Settings
from reranker.model.loader import load_encoder
from reranker.evaluation import formats, retrievers, train
from reranker.evaluation.metrics import MetricAccumulator, ndcg_ratio
from reranker.evaluation.offline import OfflineScorer


def in_half_a(user_id: str) -> bool:
    return hashlib.sha256(f"half:{user_id}".encode()).digest()[0] % 2 == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True, type=Path)
    parser.add_argument("--events", required=True, type=Path)
    parser.add_argument("--retriever", default="ease")
    parser.add_argument("--num-candidates", type=int, default=100)
    parser.add_argument("--no-include-seen", action="store_true", help="lists without consumed items")
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--settings", default="{}", help="server Settings overrides as JSON")
    args = parser.parse_args()
    settings = Settings(**{"torch_threads": 1, **json.loads(args.settings)})
    items = formats.read_items(args.items)
    events = formats.read_events(args.events)
    split = formats.leave_last_out(events)
    histories = {u: [e.item_id for e in split.history[u]] for u in split.users}
    catalog = list(items)
    started = time.perf_counter()
    lists = retrievers.make_retriever(args.retriever).fit(histories, catalog).recommend(
        split.users, args.num_candidates, include_seen=not args.no_include_seen
    )
    half_a = [u for u in split.users if in_half_a(u) and lists[u]]
    half_b = [u for u in split.users if not in_half_a(u) and lists[u]]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    formats.write_candidates(args.out_dir / "train_lists.tsv", [(u, lists[u]) for u in half_a])
    formats.write_candidates(args.out_dir / "eval_lists.tsv", [(u, lists[u]) for u in half_b])

    encoder = load_encoder(settings.model)
    served = formats.read_served_lists(args.out_dir / "train_lists.tsv")
    heads = {
        "served": train.train(items, events, settings, dataclasses.replace(train.TrainConfig(), retrievers=()),
                              encoder=encoder, served_lists=served)[0],
        "retrievers": train.train(items, events, settings, train.TrainConfig(), encoder=encoder)[0],
    }
    for name, head in heads.items():
        head.save(args.out_dir / f"head_{name}.npz")
    vectors = train.encode_catalog(encoder, [items[i] for i in catalog])
    eval_histories = {u: split.history[u] for u in half_b}
    acc = {"upstream": MetricAccumulator(), **{name: MetricAccumulator() for name in heads}}
    scorers = {name: OfflineScorer(head, settings, catalog, vectors, eval_histories) for name, head in heads.items()}
    for u in half_b:
        target = {split.target[u].item_id}
        acc["upstream"].add([r.item_id for r in lists[u]], target)
        for name, scorer in scorers.items():
            acc[name].add(scorer.order(u, lists[u]), target)
    summary = {name: round(a.summary(len(catalog))["ndcg@10"], 4) for name, a in acc.items()}
    print(json.dumps({
        "retriever": args.retriever,
        "include_seen": not args.no_include_seen,
        "train_users": len(half_a),
        "eval_users": len(half_b),
        "ndcg@10": summary,
        "served_vs_upstream": ndcg_ratio(acc["upstream"], acc["served"], digits=4),
        "retrievers_vs_upstream": ndcg_ratio(acc["upstream"], acc["retrievers"], digits=4),
        "served_vs_retrievers": ndcg_ratio(acc["retrievers"], acc["served"], digits=4),
        "head_versions": {name: head.version for name, head in heads.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
