"""Events acknowledged while Redis is down survive a SIGTERM of the replica, and a full replay
buffer refuses new events instead of dropping acknowledged ones (real redis-server, real
`reranker serve` child processes, real signals)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from reranker.tools.loadtest import ServerProcess
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from redis_server import RedisServer, stored_event_ids


def _serve(redis_url: str, *extra: str) -> ServerProcess:
    server = ServerProcess(["--encoder", "fake", "--fake-dim", "16", "--metrics-address=", "--redis-url", redis_url,
                            "--redis-retry-seconds", "0.2", "--redis-timeout-ms", "200", "--grace-seconds", "1",
                            "--drain-delay-seconds", "0", *extra])
    server.wait_serving(60)
    return server


def _events(user: str, ids: list[str]) -> pb.RecordEventsRequest:
    return pb.RecordEventsRequest(events=[
        pb.Event(user_id=user, item_id=f"item-{i}", type=pb.EVENT_TYPE_CLICK, event_id=i, text=f"a text about {i}")
        for i in ids
    ])


def test_events_acknowledged_during_an_outage_survive_sigterm_and_reach_redis_after_restart(tmp_path: Path) -> None:
    redis_server = RedisServer().start()
    snapshot = tmp_path / "snapshot.npz"
    try:
        with _serve(redis_server.url, "--snapshot-path", str(snapshot)) as server:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.RerankerServiceStub(channel)
                stub.RecordEvents(_events("u", ["before"]), timeout=5)
                redis_server.stop()
                for i in range(3):  # acknowledged while Redis is down: kept in the replay buffer
                    stub.RecordEvents(_events("u", [f"during-{i}"]), timeout=5)
            server.terminate()
            assert server.wait(30) == 0
        assert Path(f"{snapshot}.redis-pending").exists()
        redis_server.start()  # a new, empty Redis on the same port: only what the replica kept can fill it
        with _serve(redis_server.url, "--snapshot-path", str(snapshot)) as server:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.RerankerServiceStub(channel)
                deadline = time.monotonic() + 30  # a subprocess on a busy machine
                client = redis_server.client()
                while True:
                    have = stored_event_ids(client, "u", {"before", "during-0", "during-1", "during-2"}, 16)
                    if {"during-0", "during-1", "during-2"} <= have or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                assert {"during-0", "during-1", "during-2"} <= have
                assert stub.GetUserProfile(pb.GetUserProfileRequest(user_id="u"), timeout=5).event_count >= 3
                client.close()
                keys = redis_server.client().keys("*")
                assert keys, "the kept events were written into Redis"
            server.terminate()
            assert server.wait(30) == 0
        assert not Path(f"{snapshot}.redis-pending").exists()  # removed once Redis had them
    finally:
        redis_server.cleanup()


def test_a_full_replay_buffer_refuses_events_instead_of_dropping_acknowledged_ones(tmp_path: Path) -> None:
    redis_server = RedisServer().start()
    try:
        with _serve(redis_server.url, "--redis-replay-events", "3") as server:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.RerankerServiceStub(channel)
                redis_server.stop()
                for i in range(3):
                    stub.RecordEvents(_events("u", [f"kept-{i}"]), timeout=5)
                with pytest.raises(grpc.RpcError) as refused:
                    stub.RecordEvents(_events("u", ["one-too-many"]), timeout=5)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "redis_replay_events" in refused.value.details()
                redis_server.start()
                deadline = time.monotonic() + 30  # a subprocess on a busy machine
                client = redis_server.client()
                while time.monotonic() < deadline:  # the buffer is replayed once Redis answers
                    stub.GetUserProfile(pb.GetUserProfileRequest(user_id="u"), timeout=5)  # a read starts the replay
                    have = stored_event_ids(client, "u", {"kept-0", "kept-1", "kept-2", "one-too-many"}, 16)
                    if {"kept-0", "kept-1", "kept-2"} <= have:
                        break
                    time.sleep(0.1)
                client.close()
                assert have == {"kept-0", "kept-1", "kept-2"}  # and the refused one is not there
            server.terminate()
            assert server.wait(30) == 0
    finally:
        redis_server.cleanup()
