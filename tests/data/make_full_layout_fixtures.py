"""How full_layout_snapshot.npz and full_layout_redis.json were written: by the last build that still had
the full profile layout (profile_layout=full: item vectors copied into each profile; in Redis six keys
per user and a Lua fold), run once from the repository root of that build:

    PYTHONPATH=$PWD python tests/data/make_full_layout_fixtures.py tests/data

Three users' events (one with more events than vector_history_size, repeats, a dislike, an event
without a vector) go into a full-layout service, in process (its snapshot is saved) and in a
throw-away redis-server (every key of the prefix is dumped as JSON: type, TTL, contents in hex).
full_layout_expected.json holds what the full layout answered after a restart (a fresh service that
loaded the snapshot; one on the same Redis): each user's event count and user vector, and the
ranking (ids and final scores) of CANDIDATES. (After a restart, because the population's repeat
rate, the prior of consumed_policy=learned, is counted per process and starts at zero.) The tests that read them
(test_snapshot, test_redis_profiles) check that today's build converts both to compact profiles that
answer the same. This script no longer runs against a build without the full layout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import redis

from reranker.config import Settings
from reranker.service import RerankService
from reranker.tools.benches.profile_bytes import redis_server
from reranker.types import Candidate, Event, EventType, Item, RerankQuery

DIM = 16
T0 = 1_700_000_000.0
ITEMS = {f"i{k}": f"movie {k} about {['space', 'love', 'crime', 'war', 'music'][k % 5]} and {k % 7} dogs"
         for k in range(40)}
CANDIDATES = [f"i{k}" for k in range(0, 40, 3)]
PREFIX = "legacy"


def events() -> list[Event]:
    out = []
    kinds = [EventType.CLICK, EventType.VIEW, EventType.PURCHASE, EventType.DISLIKE, EventType.LIKE]
    for k in range(27):  # more than vector_history_size (20): rows leave the history, some items twice
        item = f"i{(k * 7) % 23}"
        out.append(Event("alice", item, kinds[k % 5], T0 + 60.0 * k, f"a-{k}", ITEMS[item]))
    out.append(Event("alice", "unknown-item", EventType.CLICK, T0 + 5.0, "a-unknown"))  # no vector
    for k in range(3):
        out.append(Event("bob", f"i{30 + k}", EventType.CLICK, T0 + 3600.0 + k, f"b-{k}", ITEMS[f"i{30 + k}"]))
    for k in range(6):  # out of order, one item three times
        item = "i5" if k % 2 else f"i{10 + k}"
        out.append(Event("carol", item, EventType.CLICK, T0 + 7200.0 - 300.0 * k, f"c-{k}", ITEMS[item]))
    return out


def settings(**extra: object) -> Settings:
    return Settings(encoder="fake", fake_dim=DIM, metrics_address="", warmup=False, log_level="WARNING",
                    access_log=False, user_ttl_seconds=1e9, profile_layout="full", **extra)  # type: ignore[arg-type]


def answers(service: RerankService) -> dict[str, object]:
    out: dict[str, object] = {}
    for user in ("alice", "bob", "carol"):
        view = service.user_profile(user, include_vector=True)
        result = service.rerank(RerankQuery(user, tuple(Candidate(i, 0.0, ITEMS[i]) for i in CANDIDATES)))
        out[user] = {"event_count": view.event_count, "vector": [float(x) for x in view.vector],
                     "ranking": list(result.items.item_ids), "scores": [float(s) for s in result.items.scores]}
    return out


def run(service: RerankService) -> dict[str, object]:
    service.load()
    service.upsert_items([Item(i, t) for i, t in ITEMS.items()], time_remaining=60.0)
    service.record_events(events(), time_remaining=60.0)
    return answers(service)


def main(out: Path) -> None:
    local = RerankService(settings(snapshot_path=str(out / "full_layout_snapshot.npz")))
    run(local)
    local.save_snapshot()
    local.close()
    restarted = RerankService(settings(snapshot_path=str(out / "full_layout_snapshot.npz")))
    restarted.load()
    expected = {"in_process": answers(restarted)}
    restarted.close()
    with redis_server() as url:
        shared = RerankService(settings(redis_url=url, redis_prefix=PREFIX))
        run(shared)
        shared.close()
        client = redis.Redis.from_url(url)
        dump = {}
        for key in sorted(client.scan_iter(f"{PREFIX}:*")):
            kind = client.type(key).decode()
            if kind == "hash":
                value: object = {f.hex(): v.hex() for f, v in client.hgetall(key).items()}
            elif kind == "list":
                value = [v.hex() for v in client.lrange(key, 0, -1)]
            else:
                value = [[m.hex(), s] for m, s in client.zrange(key, 0, -1, withscores=True)]
            dump[key.decode()] = {"type": kind, "value": value}
        client.close()
        restarted = RerankService(settings(redis_url=url, redis_prefix=PREFIX))
        restarted.load()
        expected["redis"] = answers(restarted)
        restarted.close()
    (out / "full_layout_redis.json").write_text(json.dumps(dump, indent=1) + "\n")
    (out / "full_layout_expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
