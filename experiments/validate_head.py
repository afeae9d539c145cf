"""Choose `reranker train` settings without touching the evaluation targets: one step back in time.

    python experiments/validate_head.py --items items.tsv --events events.tsv [--config '{"neighbours": 20}']

Every user's last event (the target `reranker eval` measures) is dropped first. On what remains,
the last event becomes the *validation* target and the events before it the validation history;
`reranker train`'s own code trains a head on that history (which, in turn, holds out its own last
event as the training label). The head is then scored offline, with the server's feature code, on
candidate lists built from the validation histories: NDCG@10 of the upstream order and of the head,
per retriever and for the 1+19 protocol. The eval targets are never read.

`--config` takes TrainConfig fields as JSON (e.g. `{"adapter_epochs": 8, "history_decay": 0.8}`),
`--settings` server Settings fields (e.g. `{"vector_history_size": 50}`), `--baseline-config` a
second head scored on the same validation lists (or `--baseline-head`, an artefact trained on the
same validation history elsewhere, e.g. by an older release): its paired ratio and 95% bootstrap interval say
whether a change is more than which users happened to be in the split. The offline scoring is
`reranker.evaluation.offline.OfflineScorer`, which orders lists exactly as the server does
(tests/test_eval_cli.py checks that against `reranker eval`).
Prints one JSON line per run; no assertions.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from reranker.config import Settings
from reranker.model.loader import load_encoder
from reranker.evaluation import formats, retrievers, train
from reranker.evaluation.metrics import MetricAccumulator, ndcg_ratio
from reranker.evaluation.offline import OfflineScorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--config", default="{}", help="TrainConfig overrides as JSON")
    parser.add_argument(
        "--baseline-config", default=None,
        help="TrainConfig overrides (JSON) of a second head scored on the same lists: paired ratio and 95%% CI",
    )
    parser.add_argument(
        "--baseline-head", default=None,
        help="a head artefact trained elsewhere on the same validation history (e.g. by an older release): "
             "the baseline instead of --baseline-config",
    )
    parser.add_argument("--settings", default="{}", help="server Settings overrides as JSON (e.g. vector_history_size)")
    parser.add_argument("--num-candidates", type=int, default=100)
    args = parser.parse_args()
    settings = Settings(**{"torch_threads": 1, **json.loads(args.settings)})
    cfg = train.TrainConfig(**json.loads(args.config))
    items = formats.read_items(args.items)
    split = formats.leave_last_out(formats.read_events(args.events))
    history_events = [e for u in split.users for e in split.history[u]]  # eval targets dropped here
    encoder = load_encoder(settings.model)
    started = time.perf_counter()
    head, _ = train.train(items, history_events, settings, cfg, encoder=encoder)
    train_s = time.perf_counter() - started
    baseline = None
    if args.baseline_head is not None:
        from reranker.ranking.head import load as load_head

        baseline = load_head(args.baseline_head)
    elif args.baseline_config is not None:
        baseline_cfg = train.TrainConfig(**json.loads(args.baseline_config))
        baseline, _ = train.train(items, history_events, settings, baseline_cfg, encoder=encoder)

    val = formats.leave_last_out(history_events)
    users = [u for u in val.users if val.history[u]]
    histories = {u: [e.item_id for e in val.history[u]] for u in users}
    targets = {u: val.target[u].item_id for u in users}
    catalog = list(items)
    vectors = train.encode_catalog(encoder, [items[i] for i in catalog])
    val_histories = {u: val.history[u] for u in users}
    scorers = {"head": OfflineScorer(head, settings, catalog, vectors, val_histories)}
    if baseline is not None:
        scorers["baseline"] = OfflineScorer(baseline, settings, catalog, vectors, val_histories)
    rng = np.random.default_rng(cfg.seed)
    results = {}
    for name in (*retrievers.RETRIEVERS, retrievers.SAMPLED):
        if name == retrievers.SAMPLED:
            index = {item: j for j, item in enumerate(catalog)}
            lists = {u: retrievers.sampled_candidates(histories[u], targets[u], catalog, 19, rng, index) for u in users}
        else:
            lists = retrievers.make_retriever(name).fit(histories, catalog).recommend(users, args.num_candidates)
        acc = {"upstream": MetricAccumulator(), **{key: MetricAccumulator() for key in scorers}}
        for u in users:
            acc["upstream"].add([r.item_id for r in lists[u]], {targets[u]})
            for key, scorer in scorers.items():
                acc[key].add(scorer.order(u, lists[u]), {targets[u]})
        ndcg = {key: a.summary(1)["ndcg@10"] for key, a in acc.items()}
        row: dict[str, object] = {"upstream_ndcg@10": round(ndcg["upstream"], 4), "head_ndcg@10": round(ndcg["head"], 4)}
        row.update(_ratio("ratio", acc["upstream"], acc["head"]))
        if baseline is not None:
            row["baseline_ndcg@10"] = round(ndcg["baseline"], 4)
            row.update(_ratio("vs_baseline", acc["baseline"], acc["head"]))
        results[name] = row
    print(json.dumps({
        "config": json.loads(args.config), "baseline_config": json.loads(args.baseline_config or "null"),
        "settings": json.loads(args.settings), "train_s": round(train_s, 1), "validation": results,
    }))


def _ratio(label: str, base: MetricAccumulator, new: MetricAccumulator) -> dict[str, object]:
    """NDCG@10 of `new` over `base` on the same lists, with its 95% paired bootstrap interval."""
    gain = ndcg_ratio(base, new, digits=3)
    return {label: gain["ratio"], f"{label}_ci95": gain["ci95"]}  # a None bound = unbounded


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # as `reranker train` and the server run the head
        main()
