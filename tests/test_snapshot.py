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


def test_a_snapshot_written_before_the_session_sum_was_kept_rebuilds_it(tmp_path: Path) -> None:
    from reranker.users.profiles import InProcessProfileStore, ProfileConfig

    settings = fake_settings(fake_dim=8)
    config = ProfileConfig.from_settings(settings.users, 8)
    store = InProcessProfileStore(config, max_users=10, ttl_seconds=1e12)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((6, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # item vectors are unit rows (a longer one is refused)
    store.apply([(Event("u", f"i{k}", timestamp=1_700_000_000.0 + 37 * k), vectors[k]) for k in range(6)], time.time())
    path = tmp_path / "s.npz"
    snapshot.save_snapshot(path, items=None, profiles=store, model_version="m", dim=8)
    old = tmp_path / "old.npz"  # the same archive without the session arrays (format of an older build)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for name in src.namelist():
            if not name.startswith("user_session_"):
                dst.writestr(name, src.read(name))
    for source in (path, old):
        restored = InProcessProfileStore(config, max_users=10, ttl_seconds=1e12)
        snapshot.load_snapshot(source, items=None, profiles=restored, model_version="m", dim=8, now=time.time(),
                               ttl_seconds=1e12)
        a, b = store.get("u"), restored.get("u")
        assert a is not None and b is not None
        np.testing.assert_allclose(b.session, a.session, rtol=1e-9)
        np.testing.assert_allclose(b.long_term, a.long_term, rtol=1e-12)


def _tampered(path: Path, edit: Callable[[dict[str, np.ndarray], list[dict]], None]) -> None:
    """Rewrite a snapshot with some arrays edited (users_0 passed decoded)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    users = json.loads(arrays["users_0"].tobytes())
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

    def poison(arrays: dict[str, np.ndarray], users: list[dict]) -> None:
        ids = json.loads(arrays["item_ids"].tobytes())
        vectors = arrays["item_vectors"].copy()
        vectors[ids.index("i4")] = np.nan
        arrays["item_vectors"] = vectors
        rows = [u["id"] for u in users]
        long_terms = arrays["user_long_term_0"].copy()
        long_terms[rows.index("bad-l")] = np.inf
        arrays["user_long_term_0"] = long_terms
        hist = arrays["hist_vectors_0"].copy()
        at = sum(len(u["hist"]) for u in users[: rows.index("bad-history")])
        hist[at] = 1e30
        arrays["hist_vectors_0"] = hist

    _tampered(path, poison)
    info = snapshot.load_snapshot(path, items=ItemVectorCache(100, 64), profiles=None, model_version="fake-hash-v1",
                                  dim=64, now=time.time(), ttl_seconds=1e9)
    assert info is not None and (info.items, info.items_refused) == (3, 1)
    service = loaded_service(path)
    assert service.items is not None and service.items.known("i1") and not service.items.known("i4")
    assert service.user_profile("good").found
    assert not service.user_profile("bad-l").found and not service.user_profile("bad-history").found
    reply = service.rerank(RerankQuery("good", (Candidate("i1", 1.0, None), Candidate("i4", 2.0, "the text of i4"))))
    assert reply.variant.name == "RERANKED" and all(np.isfinite([it.score, it.semantic_score]).all() for it in reply.items)
    service.close()
