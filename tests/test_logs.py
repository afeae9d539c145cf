"""Structured logs: JSON lines from a real `reranker serve` process and the access-log fields."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from reranker.serving.logs import TextFormatter
from reranker.userhash import user_hash
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from tests.conftest import REPO, ServerFactory, candidate, event, fake_settings
from reranker.tools.harness import free_port

SECRET_USER = "alice@example.com"
SECRET_TEXT = "confidential item text about starships"




def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_access_line_per_rpc_with_id_bucket_variant_latency(
    make_server: ServerFactory, access_lines: io.StringIO
) -> None:
    _, stub = make_server(fake_settings(log_user_salt="pepper", min_budget_ms=2000.0, access_log_sample=1.0))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event(SECRET_USER, "h1", SECRET_TEXT)]))
    given = stub.Rerank(pb.RerankRequest(
        user_id=SECRET_USER, request_id="req-1", candidates=[candidate("h1", 1), candidate("c2", 2, SECRET_TEXT)]
    ))
    generated = stub.Rerank(pb.RerankRequest(user_id=SECRET_USER, candidates=[candidate("h1", 1)]))
    from_header = stub.Rerank(
        pb.RerankRequest(user_id=SECRET_USER, candidates=[candidate("h1", 1)]), metadata=[("x-request-id", "hdr-7")]
    )
    late = stub.Rerank(pb.RerankRequest(user_id=SECRET_USER, candidates=[candidate("h1", 1)]), timeout=1.0)

    lines = records(access_lines)
    assert [line["method"] for line in lines] == ["RecordEvents", "Rerank", "Rerank", "Rerank", "Rerank"]
    record_line, first, second, third, fourth = lines
    assert record_line["events"] == 1 and record_line["code"] == "OK"
    assert first["request_id"] == "req-1" == given.request_id
    assert first["variant"] == "reranked" and first["code"] == "OK"
    assert first["bucket"] == given.bucket
    assert first["candidates"] == 2 and first["returned"] == 2 and first["encoded"] == 1
    assert first["user_hash"] == user_hash("pepper", SECRET_USER)
    assert isinstance(first["latency_ms"], float) and first["latency_ms"] > 0
    # No id from the caller: one is generated and echoed in the response, so both sides can correlate.
    assert len(str(second["request_id"])) == 16 and second["request_id"] == generated.request_id
    assert int(second["request_id"], 16) >= 0 and len(fourth["request_id"]) == 16  # hex digits
    assert fourth["request_id"] != second["request_id"]  # one per call
    assert third["request_id"] == "hdr-7" == from_header.request_id
    assert fourth["variant"] == "fallback" and fourth["fallback_reason"] == "deadline"
    assert late.variant == pb.VARIANT_FALLBACK
    raw = access_lines.getvalue()
    assert SECRET_USER not in raw and SECRET_TEXT not in raw and "h1" not in raw


def test_rejected_requests_log_the_status_but_not_the_message(
    make_server: ServerFactory, access_lines: io.StringIO
) -> None:
    _, stub = make_server()
    bad = pb.RerankRequest(
        user_id=SECRET_USER, candidates=[candidate("a", 1)], context_events=[event("someone-else", "a")]
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(bad)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    (line,) = records(access_lines)
    assert line["code"] == "INVALID_ARGUMENT" and line["error"] == "InvalidRequest"
    assert "someone-else" not in access_lines.getvalue() and SECRET_USER not in access_lines.getvalue()
    assert "user_hash" not in line  # no salt configured: no hash either


def test_streamed_events_log_their_count(make_server: ServerFactory, access_lines: io.StringIO) -> None:
    _, stub = make_server(fake_settings(access_log_sample=1.0))
    stub.StreamEvents(iter([event(SECRET_USER, f"i{n}", SECRET_TEXT) for n in range(4)]))
    (line,) = records(access_lines)
    assert (line["method"], line["code"], line["events"]) == ("StreamEvents", "OK", 4)
    assert SECRET_USER not in access_lines.getvalue()


def test_sampling_keeps_every_fallback_and_error_line(make_server: ServerFactory, access_lines: io.StringIO) -> None:
    _, stub = make_server(fake_settings(access_log_sample=0.0, min_budget_ms=2000.0))
    for _ in range(5):
        stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)]))  # reranked: sampled out
    stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)]), timeout=1.0)  # fallback
    stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)], options=pb.RerankOptions(bypass=True)))
    with pytest.raises(grpc.RpcError):
        stub.Rerank(pb.RerankRequest(user_id=""))
    lines = records(access_lines)
    assert [(line.get("variant"), line["code"]) for line in lines] == [
        ("fallback", "OK"), ("bypassed", "OK"), (None, "INVALID_ARGUMENT"),
    ]


def test_access_lines_not_written_cost_no_fields(
    make_server: ServerFactory, access_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line sampled out, or below the access logger's level, builds nothing: not even the salted
    user hash its fields would carry. Counted where a written line computes it."""
    from reranker.serving import observability

    hashed: list[str] = []
    real_hash = observability.user_hash
    monkeypatch.setattr(observability, "user_hash", lambda salt, user: hashed.append(user) or real_hash(salt, user))
    logger = logging.getLogger("reranker.access")
    _, stub = make_server(fake_settings(log_user_salt="pepper", access_log_sample=1.0))
    request = pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)])

    logger.setLevel(logging.WARNING)  # access lines are INFO: none is written
    for _ in range(3):
        stub.Rerank(request)
    assert hashed == [] and access_lines.getvalue() == ""

    logger.setLevel(logging.INFO)
    stub.Rerank(request)
    assert hashed == ["u"] and len(records(access_lines)) == 1

    _, sampled_out = make_server(fake_settings(log_user_salt="pepper", access_log_sample=0.0))
    for _ in range(3):
        sampled_out.Rerank(request)
    assert hashed == ["u"] and len(records(access_lines)) == 1


def test_access_log_can_be_turned_off(make_server: ServerFactory, access_lines: io.StringIO) -> None:
    _, stub = make_server(fake_settings(access_log=False))
    stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate("a", 1)]))
    assert access_lines.getvalue() == ""


def test_text_format_appends_fields_as_key_value() -> None:
    record = logging.LogRecord("reranker.access", logging.INFO, __file__, 1, "Rerank OK", (), None)
    record.fields = {"request_id": "r1", "variant": "reranked", "fallback_reason": ""}
    line = TextFormatter().format(record)
    assert line.endswith("reranker.access: Rerank OK request_id=r1 variant=reranked")


def test_reranker_serve_writes_json_lines_to_stderr() -> None:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), RERANKER_LOG_FORMAT="json", RERANKER_ACCESS_LOG_SAMPLE="1")
    cmd = [sys.executable, "-m", "reranker", "serve", f"--address=127.0.0.1:{port}", "--encoder=fake",
           "--metrics-address=", "--grace-seconds=1"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            stub = pb_grpc.RerankerServiceStub(ch)
            deadline = time.monotonic() + 30
            while True:  # until the model is loaded (bypass answers either way; wait for personalization)
                resp = stub.Rerank(pb.RerankRequest(user_id=SECRET_USER, request_id="cli-1", candidates=[candidate("a", 1)]))
                if resp.variant != pb.VARIANT_FALLBACK or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 0
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "reranker.access" and line["variant"] == "reranked"]
    assert access and access[-1]["request_id"] == "cli-1"
    assert any(line["logger"] == "reranker.serving.server" and line["message"] == "stopped" for line in lines)
    assert SECRET_USER not in stderr


def test_the_stderr_handler_follows_stderr_and_never_writes_to_a_closed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """configure_logging run while stderr was swapped for a while (a test's capture, an embedding
    host's) must not leave the root logger writing to that stream once it is closed: every later
    record, from any thread, would end in '--- Logging error --- I/O operation on closed file'."""
    from reranker.serving.logs import configure_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    swapped, after = io.StringIO(), io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", swapped)
        configure_logging(fake_settings(log_format="text", log_level="info").observability)
        logging.getLogger("reranker.test").info("while swapped")
        swapped.close()
        monkeypatch.setattr(sys, "stderr", after)
        logging.getLogger("reranker.test").info("after the swap ended")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    written = after.getvalue()
    assert "Logging error" not in written and "after the swap ended" in written, written
