"""Choose the zero-shot defaults on the validation split: blend weight x consumed-item policy, through
one real server, on every built-in retriever's lists with and without consumed items.

    python experiments/zero_shot_defaults.py --items items.tsv --events events.tsv \
        --retriever popularity,itemknn,als,ease,sasrec --blend 0.1,0.2,0.3,0.5 --policy learned,keep

One step back in time: every user's last event (the eval target) is dropped first; the new last
event is the validation target and the events before it the history the server receives. Each
retriever is fitted on those histories and gives a top-N list per user with consumed items
(`include_seen`) and without. Every (blend weight, policy) pair is sent as per-request options
(RerankOptions.blend_weight / consumed) to the same server, so the lists, profiles and encoder are
shared by all settings. Printed: one JSON line per list set and setting with NDCG@10 of the
upstream and reranked orders and the paired 95% bootstrap interval of their ratio; then, per
setting, the smallest ratio over the list sets (the "never worse" criterion: pick the setting whose
worst list set is best, among those whose every interval reaches 1). The eval targets are never read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reranker.config import Settings
from reranker.evaluation import formats, retrievers
from reranker.evaluation.metrics import MetricAccumulator, ndcg_ratio
from reranker.evaluation.runner import EvalConfig, EvalData, ListSet, connect, load_server_state
from reranker.v1 import reranker_pb2 as pb

POLICIES = {"keep": pb.CONSUMED_POLICY_KEEP, "demote": pb.CONSUMED_POLICY_DEMOTE,
            "drop": pb.CONSUMED_POLICY_DROP, "learned": pb.CONSUMED_POLICY_LEARNED}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True, type=Path)
    parser.add_argument("--events", required=True, type=Path)
    parser.add_argument("--retriever", default="popularity,itemknn,als,ease,sasrec")
    parser.add_argument("--num-candidates", type=int, default=100)
    parser.add_argument("--blend", default="0.1,0.2,0.3,0.5", help="blend weights to try")
    parser.add_argument("--policy", default="learned,keep", help="consumed policies to try")
    parser.add_argument("--settings", default="{}", help="server Settings overrides as JSON")
    args = parser.parse_args()
    settings = Settings(**{"torch_threads": 1, **json.loads(args.settings)})
    items = formats.read_items(args.items)
    full = formats.leave_last_out(formats.read_events(args.events))
    split = formats.leave_last_out([e for u in full.users for e in full.history[u]])  # eval targets dropped
    users = [u for u in split.users if split.history[u]]
    histories = {u: [e.item_id for e in split.history[u]] for u in users}
    data = EvalData(items, split, users)
    for name in args.retriever.split(","):
        fitted = retrievers.make_retriever(name, seed=0).fit(histories, list(items))
        for seen in (True, False):
            lists = fitted.recommend(users, args.num_candidates, include_seen=seen)
            data.list_sets.append(ListSet(f"{name}{'+seen' if seen else ''}", {u: lists[u] for u in users if lists[u]}))
    cfg = EvalConfig(items=args.items, events=args.events)
    worst: dict[str, float] = {}
    with connect(cfg, settings) as (stub, _):
        load_server_state(stub, data, settings.limits.max_text_chars, None)
        for list_set in data.list_sets:
            for blend in (float(b) for b in args.blend.split(",")):
                for policy in args.policy.split(","):
                    upstream, reranked = MetricAccumulator(), MetricAccumulator()
                    options = pb.RerankOptions(blend_weight=blend, consumed=POLICIES[policy])
                    for u, rows in list_set.lists.items():
                        target = {split.target[u].item_id}
                        upstream.add([r.item_id for r in rows], target)
                        request = pb.RerankRequest(
                            user_id=u, options=options,
                            candidates=[pb.Candidate(item_id=r.item_id, score=r.score) for r in rows],
                        )
                        reranked.add([it.item_id for it in stub.Rerank(request, timeout=30).items], target)
                    ratio = ndcg_ratio(upstream, reranked, digits=4)
                    key = f"blend={blend} policy={policy}"
                    worst[key] = min(worst.get(key, float("inf")), ratio["ratio"] or 0.0)
                    print(json.dumps({"lists": list_set.name, "setting": key,
                                      "upstream": round(upstream.summary(len(items))["ndcg@10"], 4),
                                      "reranked": round(reranked.summary(len(items))["ndcg@10"], 4), **ratio}),
                          flush=True)
    print(json.dumps({"worst_ratio_per_setting": dict(sorted(worst.items(), key=lambda kv: -kv[1]))}))


if __name__ == "__main__":
    main()
