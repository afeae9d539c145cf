"""How far collaborative filtering alone reorders a retriever's list: a reference for the head.

    python experiments/cf_reference.py --items items.tsv --events events.tsv [--split validation|eval]
        [--list popularity] [--scorers itemknn,als,ease] [--ease-lambda 50,200,500,1000]

For every user, the `--list` retriever's top `--num-candidates` unseen items (fitted on the
histories) are reordered by another built-in retriever's score (`Retriever.score`, fitted on the
same histories): no text, no head, no server. It prints one JSON line per scorer with NDCG@10 of
the list's own order and of the reordered list, their ratio and its 95% paired bootstrap interval.

`--split validation` (the default) steps back one event exactly like experiments/validate_head.py (the
eval targets are dropped and never read); choose EASE's lambda there. `--split eval` measures on
the eval targets that `reranker eval` uses: run it once, with the lambda chosen on validation, to
put the head's eval numbers next to what plain CF achieves on the same lists.
"""

from __future__ import annotations

import argparse
import json

from reranker.evaluation import formats, retrievers
from reranker.evaluation.metrics import MetricAccumulator, ndcg_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--split", choices=("validation", "eval"), default="validation")
    parser.add_argument("--list", default="popularity", help="the retriever whose list is reordered")
    parser.add_argument("--scorers", default="itemknn,als,ease", help="retrievers whose scores reorder it")
    parser.add_argument("--ease-lambda", default="50", help="comma list of EASE L2 strengths (one row each)")
    parser.add_argument("--num-candidates", type=int, default=100)
    args = parser.parse_args()

    catalog, split, histories = formats.read_split(args.items, args.events, args.split == "validation")
    users = list(histories)
    targets = {u: {split.target[u].item_id} for u in users}
    lists = retrievers.make_retriever(args.list).fit(histories, catalog).recommend(users, args.num_candidates)

    upstream = MetricAccumulator()
    for u in users:
        upstream.add([r.item_id for r in lists[u]], targets[u])
    for label, scorer in _scorers(args):
        scorer.fit(histories, catalog)
        reordered = MetricAccumulator()
        for u in users:
            ids = [r.item_id for r in lists[u]]
            scores = scorer.score(u, ids)
            reordered.add([ids[j] for j in sorted(range(len(ids)), key=lambda j: -scores[j])], targets[u])
        gain = ndcg_ratio(upstream, reordered, digits=3)
        print(json.dumps({
            "split": args.split, "list": args.list, "scorer": label, "users": len(users),
            "list_ndcg@10": round(upstream.summary(1)["ndcg@10"], 4),
            "reordered_ndcg@10": round(reordered.summary(1)["ndcg@10"], 4),
            "ratio": gain["ratio"], "ratio_ci95": gain["ci95"],  # a None bound = unbounded
        }), flush=True)


def _scorers(args: argparse.Namespace) -> list[tuple[str, retrievers.Retriever]]:
    out: list[tuple[str, retrievers.Retriever]] = []
    for name in (n.strip() for n in args.scorers.split(",") if n.strip()):
        if name == "ease":
            out += [(f"ease(lambda={lam:g})", retrievers.EASE(lam=lam)) for lam in map(float, args.ease_lambda.split(","))]
        else:
            out.append((name, retrievers.make_retriever(name)))
    return out


if __name__ == "__main__":
    main()
