"""End to end: `reranker convert`, `reranker train` and `reranker eval` on a slice of ml-100k,
through a real gRPC server (fake encoder for speed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from reranker.ranking import head as ranking_head
from reranker.cli import main
from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.evaluation import formats, metrics, retrievers, train
from reranker.evaluation.offline import OfflineScorer

from reranker.v1 import reranker_pb2 as pb

from conftest import REPO, SHARED_DATA, ServerFactory, candidate, event, fake_settings

USERS = 60


@pytest.fixture(scope="module")
def ml_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SHARED_DATA / "ml-100k" / "ml-100k.inter").is_file():
        pytest.skip("shared ml-100k data missing")
    out = tmp_path_factory.mktemp("ml100k")
    assert main(["convert", "ml100k", "--input", str(SHARED_DATA / "ml-100k"), "--output", str(out / "full")]) == 0
    events = formats.read_events(out / "full" / "events.tsv")
    keep = {str(u) for u in range(1, USERS + 1)}
    formats.write_events(out / "events.tsv", [e for e in events if e.user_id in keep])
    (out / "items.tsv").write_bytes((out / "full" / "items.tsv").read_bytes())
    return out


def _eval(ml_slice: Path, *extra: str) -> dict:
    report_path = ml_slice / f"report-{len(extra)}.json"
    argv = ["eval", "--items", str(ml_slice / "items.tsv"), "--events", str(ml_slice / "events.tsv"),
            "--encoder", "fake", "--fake-dim", "64", "--output", str(report_path), "--no-progress", *extra]
    assert main(argv) == 0
    return json.loads(report_path.read_text())


def _split(ml_slice: Path) -> tuple[formats.Split, dict[str, list[str]], list[str]]:
    """The slice's leave-last-out split, its histories as item ids, and the catalog."""
    split = formats.leave_last_out(formats.read_events(ml_slice / "events.tsv"))
    histories = {u: [e.item_id for e in h] for u, h in split.history.items()}
    return split, histories, list(formats.read_items(ml_slice / "items.tsv"))


def _own_order_ndcg(ml_slice: Path, retriever: retrievers.Retriever, n: int, include_seen: bool = False) -> float:
    """NDCG@10 of the retriever's own top-n order, computed here independently of `reranker eval`."""
    split, histories, catalog = _split(ml_slice)
    top = retriever.fit(histories, catalog).recommend(split.users, n, include_seen=include_seen)
    acc = metrics.MetricAccumulator()
    for u in split.users:
        acc.add([r.item_id for r in top[u]], {split.target[u].item_id})
    return float(acc.summary(len(catalog))["ndcg@10"])


def test_eval_reports_upstream_and_reranked_metrics(ml_slice: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _eval(ml_slice, "--retriever", "popularity,sampled", "--num-candidates", "50")
    out = capsys.readouterr().out
    assert "NDCG@10" in out and "popularity" in out and "sampled-1+19" in out
    assert report["server"]["model_version"] == "fake-hash-v1"
    assert report["loaded"]["items"] == 1682
    pop = report["results"]["popularity"]
    assert pop["users"] == USERS and pop["variants"] == {"VARIANT_RERANKED": USERS}
    assert pop["latency_ms"]["p50"] > 0
    # The upstream numbers are those of the retriever's own order, computed independently here.
    assert pop["upstream"]["ndcg@10"] == pytest.approx(_own_order_ndcg(ml_slice, retrievers.make_retriever("popularity"), 50))
    assert pop["upstream"]["auc"] is None  # no per-candidate labels in leave-last-out
    # The gain comes with a 95% paired bootstrap interval over users that holds the point ratio.
    ratio = pop["ndcg_ratio"]
    assert ratio["ratio"] == pytest.approx(pop["reranked"]["ndcg@10"] / pop["upstream"]["ndcg@10"])
    assert ratio["ci95"][0] <= ratio["ratio"] <= ratio["ci95"][1]
    assert pop["upstream"]["ndcg@10_se"] > 0
    assert "95% CI" in out
    for result in report["results"].values():
        for order in ("upstream", "reranked"):
            assert 0.0 <= result[order]["ndcg@10"] <= result[order]["recall@10"] <= 1.0
    sampled = report["results"]["sampled-1+19"]
    assert sampled["upstream"]["lists_with_relevant"] == USERS  # the target is always among the 20


def test_train_then_eval_with_the_head(ml_slice: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head_path = ml_slice / "head.npz"
    argv = ["train", "--items", str(ml_slice / "items.tsv"), "--events", str(ml_slice / "events.tsv"),
            "--encoder", "fake", "--fake-dim", "64", "--retriever", "popularity", "--num-candidates", "50",
            "--adapter-epochs", "1", "--neighbours", "5", "--output", str(head_path), "--no-progress"]
    assert main(argv) == 0
    head = ranking_head.load(head_path)
    assert head.meta["training_users"] == USERS and head.meta["training_data"]
    # The collaborative tables are counted on the histories (targets dropped), at most 5 neighbours per item.
    split = formats.leave_last_out(formats.read_events(ml_slice / "events.tsv"))
    assert set(head.graph.ids) == {e.item_id for h in split.history.values() for e in h}
    for table in head.graph.tables().values():
        assert table.indices.size > 0 and np.diff(table.indptr).max() <= 5
    assert f"head {head.version} written" in capsys.readouterr().out
    report = _eval(ml_slice, "--retriever", "popularity", "--num-candidates", "50", "--head-path", str(head_path))
    assert report["server"]["model_version"] == f"fake-hash-v1+{head.version}"
    assert report["results"]["popularity"]["variants"] == {"VARIANT_RERANKED": USERS}


def test_offline_scoring_orders_lists_as_the_server_does(ml_slice: Path, tmp_path: Path) -> None:
    # validate_head.py chooses training settings with OfflineScorer: its numbers must be the
    # numbers `reranker eval` gets from a real server with the same head.
    head_path = tmp_path / "head.npz"
    argv = ["train", "--items", str(ml_slice / "items.tsv"), "--events", str(ml_slice / "events.tsv"),
            "--encoder", "fake", "--fake-dim", "64", "--retriever", "popularity,itemknn", "--num-candidates", "30",
            "--adapter-epochs", "1", "--neighbours", "10", "--output", str(head_path), "--no-progress"]
    assert main(argv) == 0
    report = _eval(ml_slice, "--retriever", "popularity,itemknn", "--num-candidates", "30", "--head-path", str(head_path))

    items = formats.read_items(ml_slice / "items.tsv")
    catalog = list(items)
    split = formats.leave_last_out(formats.read_events(ml_slice / "events.tsv"))
    vectors = train.encode_catalog(FakeEncoder(64), [items[i] for i in catalog])
    scorer = OfflineScorer(ranking_head.load(head_path), Settings(encoder="fake", fake_dim=64), catalog, vectors, split.history)
    histories = {u: [e.item_id for e in h] for u, h in split.history.items()}
    for name in ("popularity", "itemknn"):
        lists = retrievers.make_retriever(name).fit(histories, catalog).recommend(split.users, 30)
        offline, reordered = metrics.MetricAccumulator(), 0
        for u in split.users:
            order = scorer.order(u, lists[u])
            offline.add(order, {split.target[u].item_id})
            reordered += order != [r.item_id for r in lists[u]]
        assert reordered > USERS // 2  # the head does reorder these lists
        served = report["results"][name]["reranked"]
        for metric in ("ndcg@10", "recall@10", "mrr"):
            assert served[metric] == pytest.approx(offline.summary(len(catalog))[metric], abs=1e-9), (name, metric)


def test_eval_against_a_running_server(ml_slice: Path, make_server: ServerFactory) -> None:
    running, _ = make_server()
    report = _eval(ml_slice, "--retriever", "itemknn", "--num-candidates", "20", "--max-users", "10",
                   "--address", f"127.0.0.1:{running.port}")
    assert report["server"]["address"] == f"127.0.0.1:{running.port}"
    assert report["results"]["itemknn"]["users"] == 10
    assert running.service.profiles is not None and len(running.service.profiles) == 10


@pytest.mark.integration  # `reranker eval` serves the lists through a real server on a socket
def test_eval_on_a_labelled_candidates_file(tmp_path: Path) -> None:
    formats.write_items(tmp_path / "items.tsv", [("a", "space opera"), ("b", "space opera sequel"), ("c", "cooking"), ("d", "gardening tools")])
    formats.write_events(tmp_path / "events.tsv", [formats.Interaction("u", "a", 1.0), formats.Interaction("u", "b", 2.0)])
    formats.write_candidates(tmp_path / "cands.tsv", [("u", [formats.CandidateRow("c", 1.0, 0), formats.CandidateRow("b", 0.99, 1), formats.CandidateRow("d", 0.0, 0)])])
    report_path = tmp_path / "r.json"
    argv = ["eval", "--items", str(tmp_path / "items.tsv"), "--events", str(tmp_path / "events.tsv"),
            "--candidates", str(tmp_path / "cands.tsv"), "--encoder", "fake", "--fake-dim", "64", "--blend-weight", "0.9",
            "--output", str(report_path), "--no-progress"]
    assert main(argv) == 0
    result = json.loads(report_path.read_text())["results"]["cands"]
    assert result["labelled"] is True
    assert result["upstream"]["auc"] == 0.5  # the clicked item was second of three upstream
    assert result["reranked"]["auc"] == 1.0  # the history (space opera) pulls the sequel up


def test_bad_retriever_name_is_a_usage_error(ml_slice: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "--items", str(ml_slice / "items.tsv"), "--events", str(ml_slice / "events.tsv"), "--retriever", "bm25"]
    assert main(argv) == 2
    assert "unknown ['bm25']" in capsys.readouterr().err


def test_eval_with_the_ease_retriever(ml_slice: Path) -> None:
    """`--retriever ease` builds EASE lists (the upstream numbers are EASE's own order) and the
    server reranks them."""
    report = _eval(ml_slice, "--retriever", "ease", "--num-candidates", "30")
    result = report["results"]["ease"]
    assert result["variants"] == {"VARIANT_RERANKED": USERS}
    assert result["upstream"]["ndcg@10"] == pytest.approx(_own_order_ndcg(ml_slice, retrievers.EASE(), 30))


def test_cf_reference_reorders_a_list_by_another_retrievers_score(
    ml_slice: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """experiments/cf_reference.py: reordering the popularity list by popularity gives the list back
    (ratio exactly 1); reordering it by item-kNN gives what sorting by item-kNN's score gives."""
    import runpy

    argv = ["cf_reference.py", "--items", str(ml_slice / "items.tsv"), "--events", str(ml_slice / "events.tsv"),
            "--split", "eval", "--scorers", "popularity,itemknn", "--num-candidates", "50"]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(REPO / "experiments" / "cf_reference.py"), run_name="__main__")
    rows = {row["scorer"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["popularity"]["ratio"] == 1.0 and rows["popularity"]["users"] == USERS
    split, histories, catalog = _split(ml_slice)
    lists = retrievers.make_retriever("popularity").fit(histories, catalog).recommend(split.users, 50)
    knn = retrievers.make_retriever("itemknn").fit(histories, catalog)
    acc = metrics.MetricAccumulator()
    for u in split.users:
        ids = [r.item_id for r in lists[u]]
        scores = knn.score(u, ids)
        acc.add([ids[j] for j in np.argsort(-scores, kind="stable")], {split.target[u].item_id})
    assert rows["itemknn"]["reordered_ndcg@10"] == pytest.approx(acc.summary(1682)["ndcg@10"], abs=5e-5)
    assert rows["itemknn"]["list_ndcg@10"] != rows["itemknn"]["reordered_ndcg@10"]


def test_eval_include_seen_reports_the_share_of_consumed_items(
    ml_slice: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _eval(ml_slice, "--retriever", "popularity", "--num-candidates", "30", "--include-seen")
    assert "Seen@10" in capsys.readouterr().out
    assert report["config"]["include_seen"] is True
    result = report["results"]["popularity"]
    # computed here independently: the share of each user's top 10 that is in their history
    split, histories, catalog = _split(ml_slice)
    top = retrievers.make_retriever("popularity").fit(histories, catalog).recommend(split.users, 30, include_seen=True)
    shares = [sum(r.item_id in set(histories[u]) for r in top[u][:10]) / 10 for u in split.users]
    assert result["upstream"]["consumed@10"] == pytest.approx(np.mean(shares)) and np.mean(shares) > 0.2
    assert 0.0 <= result["reranked"]["consumed@10"] <= 1.0
    own = _own_order_ndcg(ml_slice, retrievers.make_retriever("popularity"), 30, include_seen=True)
    assert result["upstream"]["ndcg@10"] == pytest.approx(own)


def test_train_caps_the_blend_users_and_keeps_consumed_items_when_asked(ml_slice: Path) -> None:
    items = formats.read_items(ml_slice / "items.tsv")
    events = formats.read_events(ml_slice / "events.tsv")
    cfg = train.TrainConfig(retrievers=("popularity",), num_candidates=30, adapter_epochs=1, blend_users=20,
                            include_seen=True, mf_factors=8)
    head, report = train.train(items, events, Settings(encoder="fake", fake_dim=32), cfg, encoder=FakeEncoder(32))
    assert report["training_users"] == USERS and report["blend_users"] == 20
    assert report["training_lists"] <= 20 and report["include_seen"] is True


def test_served_lists_are_labelled_by_the_first_event_at_or_after_their_time() -> None:
    events = [formats.Interaction("u", item, ts) for item, ts in [("a", 1.0), ("b", 2.0), ("c", 5.0), ("d", 9.0)]]
    events.append(formats.Interaction("v", "a", 1.0))
    rows = (formats.CandidateRow("c", 1.0),)
    lists = [
        formats.ServedList("l1", "u", 3.0, rows),  # label c (5.0): history a, b
        formats.ServedList("l2", "u", 5.0, rows),  # at the same time: c again
        formats.ServedList("l3", "u", None, rows),  # no time: the user's last event, d
        formats.ServedList("l4", "u", 10.0, rows),  # nothing after: skipped
        formats.ServedList("l5", "u", 0.5, rows),  # label a, but no history before it: skipped
        formats.ServedList("l6", "w", 1.0, rows),  # a user without events: skipped
    ]
    labelled = train.label_served_lists(lists, events)
    assert [(sl.list_id, labelled.timelines[sl.user_id][at].item_id, at) for sl, at in labelled.lists] == [
        ("l1", "c", 2), ("l2", "c", 2), ("l3", "d", 3),
    ]
    assert labelled.skipped == {"no_events": 1, "no_later_event": 1, "no_history": 1}
    assert labelled.earliest == {"u": (2, 5.0)}


def test_train_on_the_upstreams_own_lists(ml_slice: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`reranker train --candidates`: the served lists alone (no built-in retriever lists), labelled
    by each user's last event; the head learns to trust an upstream whose order is good."""
    split, histories, catalog = _split(ml_slice)
    # An upstream that ranks each user's real next item 3rd among 20 items of its own choosing.
    rng = np.random.default_rng(0)
    lists = []
    for u in split.users:
        others = [i for i in rng.permutation(catalog)[:40].tolist() if i != split.target[u].item_id][:19]
        ids = others[:2] + [split.target[u].item_id] + others[2:]
        lists.append((u, [formats.CandidateRow(i, float(20 - r)) for r, i in enumerate(ids)]))
    formats.write_candidates(tmp_path / "served.tsv", lists)
    head_path = tmp_path / "head.npz"
    argv = ["train", "--items", str(ml_slice / "items.tsv"), "--events", str(ml_slice / "events.tsv"),
            "--candidates", str(tmp_path / "served.tsv"), "--encoder", "fake", "--fake-dim", "64",
            "--adapter-epochs", "1", "--output", str(head_path), "--no-progress"]
    assert main(argv) == 0
    head = ranking_head.load(head_path)
    assert head.meta["retrievers"] == [] and head.meta["served_lists"]["used"] == USERS
    assert head.meta["training_lists"] == USERS
    weights = head.meta["weights"]
    assert weights["upstream_rank"] + weights["upstream_minmax"] > 0.5  # this upstream's order is worth trusting
    # Without --retriever and without served lists there is nothing to train on.
    (tmp_path / "empty.tsv").write_text("user_id\titem_id\tscore\n")
    argv[argv.index(str(tmp_path / "served.tsv"))] = str(tmp_path / "empty.tsv")
    assert main(argv) == 2 and "no training lists" in capsys.readouterr().err


def test_on_ml100k_a_head_learns_that_consumed_items_are_not_watched_again(ml_slice: Path, make_server: ServerFactory) -> None:
    """ml-100k has no repeats: trained on include-seen lists, the head ranks consumed items down."""
    items = formats.read_items(ml_slice / "items.tsv")
    events = formats.read_events(ml_slice / "events.tsv")
    cfg = train.TrainConfig(retrievers=("popularity", "itemknn"), num_candidates=30, adapter_epochs=1, mf_factors=8)
    head, report = train.train(items, events, Settings(encoder="fake", fake_dim=64), cfg, encoder=FakeEncoder(64))
    assert report["include_seen"] is True
    path = ml_slice / "head_consumed.npz"
    head.save(path)
    _, stub = make_server(dataclasses.replace(fake_settings(), head_path=str(path)))
    split, histories, catalog = _split(ml_slice)
    user = split.users[0]
    seen, unseen = histories[user][:10], [i for i in catalog if i not in set(histories[user])][:10]
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=i, text=items[i]) for i in set(histories[user] + unseen)]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event(user, e.item_id, event_id=f"{user}:{n}")
                                                     for n, e in enumerate(split.history[user])]))
    # Interleaved, consumed items first in each pair and with the higher upstream score.
    cands = [candidate(i, float(20 - 2 * n - k)) for n, pair in enumerate(zip(seen, unseen)) for k, i in enumerate(pair)]
    reply = stub.Rerank(pb.RerankRequest(user_id=user, candidates=cands))
    assert reply.consumed_candidates == 10
    ranked = [it.item_id for it in reply.items]
    assert np.mean([ranked.index(i) for i in seen]) > np.mean([ranked.index(i) for i in unseen]) + 5
