"""Snapshots: a restarted server keeps what it learned; a crash while writing keeps the old snapshot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from reranker.users import snapshot
from reranker.users.compact import CompactProfileStore, decode, encode, table_lookup
from reranker.users.profiles import ProfileConfig
from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.serving.server import RunningServer, build_server
from reranker.service import RerankService
from reranker.model.items import ItemVectorCache
from reranker.types import Candidate, Event, RerankQuery
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from conftest import REPO, candidate, event, fake_settings, wait_ready

CANDIDATES = [candidate("c1", 3.0, "red apples"), candidate("c2", 2.0, "green pears"), candidate("c3", 1.0)]


class Server:
    """One server process-worth of state; stop() runs the shutdown path (final snapshot)."""

    def __init__(self, settings: Settings) -> None:
        self.running: RunningServer = build_server(settings, RerankService(settings, FakeEncoder(settings.model.fake_dim)))
        wait_ready(self.running)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.stub = pb_grpc.RerankerServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(0)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        if s.running.service.ready:
            s.stop()


def start(servers: list[Server], settings: Settings) -> Server:
    server = Server(settings)
    servers.append(server)
    return server


def rerank(stub: pb_grpc.RerankerServiceStub, user: str) -> pb.RerankResponse:
    return stub.Rerank(pb.RerankRequest(user_id=user, candidates=CANDIDATES), timeout=10)


def view(stub: pb_grpc.RerankerServiceStub, user: str) -> pb.GetUserProfileResponse:
    return stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user, include_vector=True), timeout=10)


def test_snapshot_round_trip_across_a_restart(tmp_path: Path, servers: list[Server]) -> None:
    settings = fake_settings(snapshot_path=str(tmp_path / "state.npz"), snapshot_interval_seconds=0)
    first = start(servers, settings)
    first.stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id="c3", text="ripe bananas")]), timeout=10)
    events = [event("u", "i1", "green pears and apples", event_id="e1"),
              event("u", "i2", "bananas", event_id="e2", type=pb.EVENT_TYPE_DISLIKE),
              event("v", "i3", "red apples", event_id="e3")]
    first.stub.RecordEvents(pb.RecordEventsRequest(events=events), timeout=10)
    before = {user: (view(first.stub, user), rerank(first.stub, user)) for user in ("u", "v")}
    first.stop()  # shutdown writes the snapshot

    second = start(servers, settings)
    for user, (profile_before, ranking_before) in before.items():
        profile_after, ranking_after = view(second.stub, user), rerank(second.stub, user)
        assert profile_after.event_count == profile_before.event_count
        assert list(profile_after.recent_events) == list(profile_before.recent_events)
        np.testing.assert_allclose(profile_after.vector, profile_before.vector, rtol=1e-6)
        assert [(i.item_id, i.score) for i in ranking_after.items] == [(i.item_id, i.score) for i in ranking_before.items]
        assert ranking_after.cache_hits == 3 and ranking_after.without_vector == 0  # item vectors came back too
    replay = second.stub.RecordEvents(pb.RecordEventsRequest(events=events), timeout=10)
    assert (replay.accepted, replay.duplicates) == (0, 3)  # event ids survive the restart
    by_id = second.stub.RecordEvents(pb.RecordEventsRequest(events=[event("w", "c3")]), timeout=10)
    assert by_id.without_vector == 0  # an event naming a restored item by id alone has a vector


def test_periodic_snapshots_are_written_while_serving(tmp_path: Path, servers: list[Server]) -> None:
    path = tmp_path / "state.npz"
    server = start(servers, fake_settings(snapshot_path=str(path), snapshot_interval_seconds=0.1))
    server.stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "i1", "apples")]), timeout=10)
    deadline = time.monotonic() + 10
    users = 0
    while users == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        if path.is_file():
            with np.load(path) as archive:
                users = json.loads(archive["header"].tobytes())["users"]
    assert users == 1


def saved_service(path: Path, *events: Event, clock: float | None = None) -> RerankService:
    settings = fake_settings(snapshot_path=str(path), snapshot_interval_seconds=0)
    service = RerankService(settings, FakeEncoder(settings.model.fake_dim), **({"clock": lambda: clock} if clock else {}))
    service.load()
    service.record_events(events)
    service.save_snapshot()
    return service


def loaded_service(path: Path, clock: float | None = None, **overrides: object) -> RerankService:
    settings = fake_settings(snapshot_path=str(path), snapshot_interval_seconds=0, **overrides)
    service = RerankService(settings, FakeEncoder(settings.model.fake_dim), **({"clock": lambda: clock} if clock else {}))
    service.load()
    return service


def test_the_consumed_item_memory_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    events = [Event("u", item, timestamp=1000.0 + n, text=f"text of {item}") for n, item in enumerate("ababc")]
    before = saved_service(path, *events).profiles.get("u")  # type: ignore[union-attr]
    after = loaded_service(path).profiles.get("u")  # type: ignore[union-attr]
    assert before is not None and after is not None and len(after.consumed) == 3
    for name in ("keys", "counts", "last", "mass"):
        np.testing.assert_array_equal(getattr(after.consumed, name), getattr(before.consumed, name))
    assert (after.consumed.repeats, after.consumed.events) == (2, 5)


def test_failure_between_write_and_rename_keeps_the_old_snapshot(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "state.npz"
    service = saved_service(path, Event("old", "i1", text="apples"))
    service.record_events([Event("new", "i2", text="pears")])

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(snapshot.os, "replace", failing_replace)
    with pytest.raises(OSError):
        service.save_snapshot()
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["state.npz"]  # the temp file was cleaned up
    restored = loaded_service(path)
    assert restored.user_profile("old").found and not restored.user_profile("new").found


KILLED_WRITER = """
import os, sys, time
from reranker.config import Settings
from reranker.model.encoder import FakeEncoder
from reranker.service import RerankService
from reranker.model.items import ItemVectorCache
from reranker.types import Candidate, Event, RerankQuery
settings = Settings(encoder="fake", fake_dim=64, snapshot_path=sys.argv[1], snapshot_interval_seconds=0)
service = RerankService(settings, FakeEncoder(64))
service.load()
assert service.user_profile("old").found
service.record_events([Event("new-%d" % i, "i%d" % i, text="text %d" % i) for i in range(2000)])
def hang(fd):  # the power goes out while the data is being flushed
    print("writing", flush=True)
    time.sleep(3600)
os.fsync = hang
service.save_snapshot()
"""


def test_a_writer_killed_mid_write_leaves_the_old_snapshot_readable(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    saved_service(path, Event("old", "i1", text="apples")).close()
    old_bytes = path.read_bytes()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        temps = list(tmp_path.glob(".state.npz.*.tmp"))
        assert temps and temps[0].stat().st_size > 0  # the new snapshot was being written
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        if writer.stdout is not None:
            writer.stdout.close()
    assert path.read_bytes() == old_bytes
    restored = loaded_service(path)
    assert restored.user_profile("old").found and not restored.user_profile("new-0").found
    assert not list(tmp_path.glob(".state.npz.*.tmp"))  # the crashed writer's temp file is gone


@pytest.mark.parametrize("damage", ["garbage", "truncated", "future-version", "other-model"])
def test_an_unusable_snapshot_is_ignored_and_the_server_starts_empty(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "state.npz"
    saved_service(path, Event("old", "i1", text="apples")).close()
    overrides: dict[str, object] = {}
    if damage == "garbage":
        path.write_bytes(b"not a snapshot")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "future-version":
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}
        header = json.loads(arrays["header"].tobytes())
        arrays["header"] = np.frombuffer(json.dumps({**header, "version": 99}).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    else:
        overrides["fake_dim"] = 32
    service = loaded_service(path, **overrides)
    assert service.ready
    assert not service.user_profile("old").found


def test_profiles_that_expired_while_down_are_not_restored(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    ttl = fake_settings().users.user_ttl_seconds
    saved_service(path, Event("old", "i1", text="apples", timestamp=1000.0), clock=1000.0).close()
    assert loaded_service(path, clock=1000.0 + ttl - 1).user_profile("old").found
    assert not loaded_service(path, clock=1000.0 + ttl + 1).user_profile("old").found


def test_profiles_are_written_in_parts_and_all_come_back(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    source = saved_service(path, *(Event(f"user-{u}", f"i{k}", text=f"text {u} {k}", event_id=f"{u}-{k}",
                                         timestamp=1000.0 + k) for u in range(7) for k in range(3)))
    assert source.items is not None
    info = snapshot.save_snapshot(path, items=source.items, profiles=source.profiles,  # type: ignore[arg-type]
                                  model_version=source.model_version, dim=source.items.dim, users_per_part=2)
    assert info.users == 7
    with np.load(path) as archive:
        assert json.loads(archive["header"].tobytes())["user_parts"] == 4
    restored = loaded_service(path)
    for u in range(7):
        before, after = source.user_profile(f"user-{u}", True), restored.user_profile(f"user-{u}", True)
        assert after.event_count == 3 and after.recent_events == before.recent_events
        np.testing.assert_allclose(after.vector, before.vector)
    assert restored.record_events([Event("user-6", "i0", event_id="6-0")]).duplicates == 1


DATA = Path(__file__).resolve().parent / "data"
FULL_SNAPSHOT = DATA / "full_layout_snapshot.npz"  # written by the full layout (tests/data/README.md)


def full_layout_service(path: Path) -> RerankService:
    """A service that loads the frozen full-layout snapshot from `path` (the fixture's settings)."""
    settings = fake_settings(fake_dim=16, snapshot_path=str(path), snapshot_interval_seconds=0, user_ttl_seconds=1e12)
    service = RerankService(settings, FakeEncoder(16))
    service.load()
    return service


def answers_of(service: RerankService, user: str) -> dict[str, object]:
    expected = json.loads((DATA / "full_layout_expected.json").read_text())["in_process"]
    ids = expected[user]["ranking"]
    result = service.rerank(RerankQuery(user, tuple(Candidate(i, 0.0, None) for i in sorted(ids, key=lambda i: int(i[1:])))))
    view = service.user_profile(user, include_vector=True)
    return {"event_count": view.event_count, "vector": list(view.vector), "ranking": list(result.items.item_ids),
            "scores": [float(x) for x in result.items.scores]}


def test_a_full_layout_snapshot_loads_converted_and_answers_as_the_full_layout_did(tmp_path: Path) -> None:
    expected = json.loads((DATA / "full_layout_expected.json").read_text())["in_process"]
    path = tmp_path / "state.npz"
    path.write_bytes(FULL_SNAPSHOT.read_bytes())
    service = full_layout_service(path)
    for user, want in expected.items():
        got = answers_of(service, user)
        assert got["event_count"] == want["event_count"] and got["ranking"] == want["ranking"], user
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
        np.testing.assert_allclose(got["vector"], want["vector"], atol=1e-5)
    assert service.record_events([Event("alice", "i0", event_id="a-3")]).duplicates == 1  # its event ids came along
    service.close()  # saves the snapshot again: compact now, and it loads the same
    with np.load(path) as archive:
        assert json.loads(archive["header"].tobytes())["layout"] == "compact"
    again = full_layout_service(path)
    assert answers_of(again, "carol")["ranking"] == expected["carol"]["ranking"]
    again.close()


def test_a_full_layout_snapshot_written_before_the_session_sum_was_kept_rebuilds_it(tmp_path: Path) -> None:
    old = tmp_path / "old.npz"  # the frozen snapshot without the session arrays (the format of an older build)
    with zipfile.ZipFile(FULL_SNAPSHOT) as src, zipfile.ZipFile(old, "w") as dst:
        for name in src.namelist():
            if not name.startswith("user_session_"):
                dst.writestr(name, src.read(name))
    new = tmp_path / "new.npz"
    new.write_bytes(FULL_SNAPSHOT.read_bytes())
    with_session, without = full_layout_service(new), full_layout_service(old)
    for user in ("bob", "carol"):  # every event still in the history rows: S is theirs alone
        a, b = with_session.profiles.get(user), without.profiles.get(user)  # type: ignore[union-attr]
        assert a is not None and b is not None
        np.testing.assert_allclose(b.session, a.session, rtol=1e-9)
        np.testing.assert_allclose(b.long_term, a.long_term, rtol=1e-12)
    with_session.close()
    without.close()


def test_a_full_layout_profile_holding_a_number_that_is_not_finite_is_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    path.write_bytes(FULL_SNAPSHOT.read_bytes())

    def poison(arrays: dict[str, np.ndarray], users: list[dict]) -> None:
        long_terms = arrays["user_long_term_0"].copy()
        long_terms[[u["id"] for u in users].index("bob")] = np.inf
        arrays["user_long_term_0"] = long_terms

    _tampered(path, poison)
    store = CompactProfileStore(ProfileConfig.from_settings(fake_settings().users, 16), table_lookup({}, np.zeros((0, 16))),
                                max_users=10, ttl_seconds=1e12)
    info = snapshot.load_snapshot(path, items=None, profiles=store, model_version="fake-hash-v1", dim=16,
                                  now=time.time(), ttl_seconds=1e12)
    assert info is not None and (info.users, info.users_refused) == (2, 1)
    assert store.get("bob") is None and store.get("alice") is not None and store.get("carol") is not None


def _tampered(path: Path, edit: Callable[[dict[str, np.ndarray], list], None]) -> None:
    """Rewrite a snapshot with some arrays edited (its first part's users passed decoded)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    users = json.loads(arrays["users_0" if "users_0" in arrays else "compact_users_0"].tobytes())
    edit(arrays, users)
    tmp = path.with_name("edited.npz")
    with tmp.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def test_entries_that_are_not_finite_are_skipped_and_counted_the_rest_is_restored(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    events = [Event(user, item, timestamp=1000.0 + n, text=f"the text of {item}")
              for n, (user, item) in enumerate([("good", "i1"), ("bad-l", "i2"), ("bad-history", "i3"), ("good", "i4")])]
    saved_service(path, *events).close()

    def poison(arrays: dict[str, np.ndarray], users: list[str]) -> None:
        ids = json.loads(arrays["item_ids"].tobytes())
        vectors = arrays["item_vectors"].copy()
        vectors[ids.index("i4")] = np.nan
        arrays["item_vectors"] = vectors
        blobs, ends = arrays["compact_blobs_0"].tobytes(), arrays["compact_ends_0"].tolist()
        profiles = [decode(blobs[a:b], 64) for a, b in zip([0, *ends[:-1]], ends)]
        profiles[users.index("bad-l")].long_term[3] = np.inf
        profiles[users.index("bad-history")].row_times[0] = np.nan
        encoded = [encode(p) for p in profiles]
        arrays["compact_blobs_0"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        arrays["compact_ends_0"] = np.cumsum([len(b) for b in encoded], dtype=np.int64)

    _tampered(path, poison)
    info = snapshot.load_snapshot(path, items=ItemVectorCache(100, 64), profiles=None, model_version="fake-hash-v1",
                                  dim=64, now=time.time(), ttl_seconds=1e9)
    assert info is not None and (info.items, info.items_refused) == (3, 1)
    store = CompactProfileStore(ProfileConfig.from_settings(fake_settings().users, 64), table_lookup({}, np.zeros((0, 64))),
                                max_users=10, ttl_seconds=1e12)
    info = snapshot.load_snapshot(path, items=None, profiles=store, model_version="fake-hash-v1", dim=64,
                                  now=time.time(), ttl_seconds=1e9)
    assert info is not None and (info.users, info.users_refused) == (1, 2)
    service = loaded_service(path)
    assert service.items is not None and service.items.known("i1") and not service.items.known("i4")
    assert service.user_profile("good").found
    assert not service.user_profile("bad-l").found and not service.user_profile("bad-history").found
    reply = service.rerank(RerankQuery("good", (Candidate("i1", 1.0, None), Candidate("i4", 2.0, "the text of i4"))))
    assert reply.variant.name == "RERANKED" and all(np.isfinite([it.score, it.semantic_score]).all() for it in reply.items)
    service.close()
