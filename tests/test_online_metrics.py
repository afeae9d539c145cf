"""Online metrics: lists joined with the user's next positive event, per arm; through a real server too."""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import time
from pathlib import Path

from reranker.learning.onlinemetrics import OnlineMetrics
from reranker.learning.traininglog import EventsRecord, ServedRecord
from reranker.types import Candidate, Event, EventType, RankedItems, RerankQuery, RerankResult, Variant
from reranker.v1 import reranker_pb2 as pb

from conftest import ServerFactory, candidate, event, fake_settings


def served(at: float, user: str, order: list[str], arm: str = "treatment", variant: Variant = Variant.RERANKED,
           version: str = "m1") -> ServedRecord:
    n = len(order)
    result = RerankResult(RankedItems(order, [0.0] * n, [0.0] * n, [0.0] * n, list(range(n))), variant, version, arm=arm)
    return ServedRecord(at, RerankQuery(user, tuple(Candidate(i, 0.0) for i in order)), result)


def events(at: float, *pairs: tuple[str, str], kind: EventType = EventType.CLICK) -> EventsRecord:
    return EventsRecord(at, tuple(Event(u, i, kind, at) for u, i in pairs))


def online_metrics(**overrides: object) -> OnlineMetrics:
    s = fake_settings(**overrides)
    return OnlineMetrics(s.learning, event_weights=s.users.parsed_event_weights())


def test_hits_and_ndcg_by_hand_per_arm() -> None:
    online = online_metrics(online_metrics_window_seconds=60, online_metrics_k=3)
    online(served(0, "a", ["x", "y", "z", "w"]))
    online(served(1, "b", ["x", "y", "z", "w"]))
    online(served(2, "c", ["x", "y", "z", "w"], arm="control", variant=Variant.CONTROL))
    online(served(3, "d", ["x"], arm="", variant=Variant.BYPASSED))  # no arm: not joined
    online(events(5, ("a", "y"), ("b", "w"), ("c", "x"), ("d", "x")))  # b's target is below k=3
    online(events(6, ("a", "x")))  # a's list was judged by its first event already
    stats = online.snapshot()
    treat, control = stats[("treatment", "m1")], stats[("control", "m1")]
    assert (treat.lists, treat.judged, treat.hits) == (2, 2, 1.0) and math.isclose(treat.ndcg, 1 / math.log2(3))
    assert (control.lists, control.judged, control.hits, control.ndcg) == (1, 1, 1.0, 1.0)
    assert len(stats) == 2 and online.waiting == 0


def test_window_expiry_negative_events_and_the_memory_bound() -> None:
    online = online_metrics(online_metrics_window_seconds=10, online_metrics_max_lists=2)
    online(served(0, "a", ["x"]))
    online(events(1, ("a", "x"), kind=EventType.DISLIKE))  # negative feedback is not a target
    online(events(20, ("a", "x")))  # too late: the list expired
    online(served(21, "b", ["x"]))
    online(served(22, "c", ["x"]))
    online(served(23, "d", ["x"]))  # evicts b's list (two lists at most)
    online(events(24, ("b", "x"), ("c", "x"), ("d", "y")))
    s = online.snapshot()[("treatment", "m1")]
    assert (s.lists, s.expired, s.evicted, s.judged, s.hits) == (4, 1, 1, 2, 1.0)
    assert online.waiting == 0


def test_the_server_exposes_per_arm_online_metrics(tmp_path: Path, make_server: ServerFactory) -> None:
    running, stub = make_server(fake_settings(online_metrics_window_seconds=60, treatment_percent=50.0))
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=i, text=i) for i in ("h", "a", "b", "c")]))
    users = [f"u{i}" for i in range(40)]
    arms = {}
    for user in users:
        stub.RecordEvents(pb.RecordEventsRequest(events=[event(user, "h")]))
        reply = stub.Rerank(pb.RerankRequest(user_id=user, candidates=[candidate("a", 3), candidate("b", 2), candidate("c", 1)]))
        arms[user] = reply.arm
        stub.RecordEvents(pb.RecordEventsRequest(events=[event(user, reply.items[0].item_id)]))  # clicks the top item
    registry = running.service.metrics.registry
    version = running.service.model_version

    def all_judged() -> bool:  # every arm's: the writer thread feeds the join in order, arms interleaved
        return all(registry.get_sample_value("reranker_online_lists_judged_total", {"arm": arm, "model_version": version})
                   == sum(a == arm for a in arms.values()) for arm in ("control", "treatment"))

    deadline = time.monotonic() + 30
    while not all_judged() and time.monotonic() < deadline:
        time.sleep(0.02)
    for arm in ("control", "treatment"):
        labels = {"arm": arm, "model_version": version}
        n = sum(a == arm for a in arms.values())
        assert n > 5
        assert registry.get_sample_value("reranker_online_lists_total", labels) == n
        assert registry.get_sample_value("reranker_online_lists_judged_total", labels) == n
        assert registry.get_sample_value("reranker_online_hits_at_k", {**labels, "k": "10"}) == 1.0
        assert registry.get_sample_value("reranker_online_ndcg_total", {**labels, "k": "10"}) == n
    assert b"reranker_online_lists_waiting 0.0" in running.service.metrics.exposition()


# --- cold users: the reranked variant in the upstream order, counted apart --------------------------------
def test_cold_users_are_counted_apart_from_personalized_ones_per_arm() -> None:
    online = online_metrics(online_metrics_window_seconds=60, online_metrics_k=3)

    def cold(record: ServedRecord) -> ServedRecord:
        return ServedRecord(record.served_at, record.query, dataclasses.replace(record.result, cold_user=True))

    online(served(0, "warm", ["x", "y"]))
    online(cold(served(1, "new1", ["x", "y"])))
    online(cold(served(2, "new2", ["x", "y"])))
    online(served(3, "c", ["x", "y"], arm="control", variant=Variant.CONTROL))
    online(served(4, "f", ["x", "y"], variant=Variant.FALLBACK))
    online(events(5, ("warm", "x"), ("new1", "y"), ("c", "x"), ("f", "x")))
    whole, by_order = online.snapshot()[("treatment", "m1")], online.by_order
    assert (whole.lists, whole.judged) == (4, 3)  # the arm's totals (intention to treat) are unchanged
    personalized, cold_ = by_order[("treatment", "m1", "personalized")], by_order[("treatment", "m1", "cold")]
    assert (personalized.lists, personalized.judged, personalized.hits, personalized.ndcg) == (1, 1, 1.0, 1.0)
    assert (cold_.lists, cold_.judged, cold_.hits) == (2, 1, 1.0) and math.isclose(cold_.ndcg, 1 / math.log2(3))
    assert by_order[("treatment", "m1", "upstream")].lists == 1  # the fallback
    assert by_order[("control", "m1", "upstream")].judged == 1
    assert ("control", "m1", "cold") not in by_order  # control never looks a profile up


def test_a_server_counts_cold_and_personalized_answers_per_arm(make_server: ServerFactory,
                                                               access_lines: io.StringIO) -> None:
    import json

    running, stub = make_server(fake_settings(online_metrics_window_seconds=60, treatment_percent=50.0,
                                              access_log_sample=1.0))
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=i, text=i) for i in ("h", "a", "b", "c")]))
    cands = [candidate("a", 3), candidate("b", 2), candidate("c", 1)]
    arms, orders = {}, {}
    for n in range(40):
        user = f"u{n}"
        if n % 2:  # every other user has a profile; the rest are new (cold)
            stub.RecordEvents(pb.RecordEventsRequest(events=[event(user, "h")]))
        reply = stub.Rerank(pb.RerankRequest(user_id=user, candidates=cands))
        arms[user], orders[user] = reply.arm, ("cold" if reply.cold_user else "personalized") \
            if reply.variant == pb.VARIANT_RERANKED else "upstream"
        stub.RecordEvents(pb.RecordEventsRequest(events=[event(user, reply.items[0].item_id)]))
    registry, version = running.service.metrics.registry, running.service.model_version
    expected = collections.Counter((arms[u], orders[u]) for u in arms)
    assert expected[("treatment", "cold")] >= 3 and expected[("treatment", "personalized")] >= 3
    assert expected[("control", "upstream")] >= 5 and ("control", "cold") not in expected
    for (arm, order), n in expected.items():  # every answer, exactly (Prometheus)
        assert registry.get_sample_value("reranker_rerank_orders_total", {"arm": arm, "order": order}) == n

    def all_judged() -> bool:  # every (arm, order): the writer thread feeds the join in order, arms interleaved
        return all(registry.get_sample_value("reranker_online_lists_judged_by_order_total",
                                             {"arm": arm, "model_version": version, "order": order}) == n
                   for (arm, order), n in expected.items())

    deadline = time.monotonic() + 30
    while not all_judged() and time.monotonic() < deadline:
        time.sleep(0.02)
    for (arm, order), n in expected.items():  # the online join, split the same way
        labels = {"arm": arm, "model_version": version, "order": order}
        assert registry.get_sample_value("reranker_online_lists_by_order_total", labels) == n
        assert registry.get_sample_value("reranker_online_lists_judged_by_order_total", labels) == n
    lines = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    reranks = [line for line in lines if line["method"] == "Rerank"]
    assert collections.Counter((line["arm"], line["order"]) for line in reranks) == expected  # the access log too
    assert all(line["cold_user"] == (line["order"] == "cold") for line in reranks if line["variant"] == "reranked")
