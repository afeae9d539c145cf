"""The training log: what a server writes, rotation, drops, torn tails, and a SIGKILL while writing."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reranker.learning import traininglog
from reranker.config import Settings
from reranker.evaluation import formats
from reranker.userhash import user_hash
from reranker.learning.traininglog import TrainingLog, read_training_log
from reranker.types import Candidate, Event, EventType, RankedItems, RerankQuery, RerankResult, Variant

from conftest import REPO, ServerFactory, candidate, event, fake_settings
from reranker.v1 import reranker_pb2 as pb


def _at(seconds: float) -> dict[str, object]:
    ts = pb.Event().timestamp
    ts.FromSeconds(int(seconds))
    return {"timestamp": ts}


def _serve_some(stub: object) -> None:
    stub.UpsertItems(pb.UpsertItemsRequest(items=[  # type: ignore[attr-defined]
        pb.Item(item_id=i, text=t) for i, t in [("h1", "space opera"), ("c1", "space opera sequel"), ("c2", "cooking")]
    ]))
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u1", "h1", **_at(100))]))  # type: ignore[attr-defined]
    cands = [candidate("c2", 3.0), candidate("c1", 2.0), candidate("c2", 1.0), candidate("h1", 0.5)]  # c2 twice
    stub.Rerank(pb.RerankRequest(user_id="u1", candidates=cands, top_k=2, request_id="list-1"))  # type: ignore[attr-defined]
    stub.RecordEvents(pb.RecordEventsRequest(events=[event("u1", "c1", type=pb.EVENT_TYPE_PURCHASE)]))  # type: ignore[attr-defined]


def test_server_logs_served_lists_and_events_in_the_formats_train_reads(tmp_path: Path, make_server: ServerFactory) -> None:
    running, stub = make_server(fake_settings(training_log_dir=str(tmp_path / "log")))
    _serve_some(stub)
    running.stop(0)  # flushes and closes the files
    log = read_training_log(tmp_path / "log")
    assert [(e.user_id, e.item_id, e.event_type) for e in log.events] == [("u1", "h1", "click"), ("u1", "c1", "purchase")]
    assert log.events[0].timestamp == 100.0 and log.events[1].timestamp > 1e9  # stamped by the server
    (served,) = log.lists
    assert served.list_id == "list-1" and served.user_id == "u1" and served.timestamp is not None
    assert log.events[1].timestamp >= served.timestamp > 1e9
    # Upstream order with its scores, the duplicate removed; the returned order in returned_rank.
    assert [(r.item_id, r.score) for r in served.rows] == [("c2", 3.0), ("c1", 2.0), ("h1", 0.5)]
    variant, model_version, arm, ranks = log.served_as["list-1"]
    assert (variant, model_version, arm) == ("reranked", running.service.model_version, "treatment")
    assert sorted(r for r in ranks if r >= 0) == [0, 1] and ranks.count(-1) == 1  # top_k=2 of 3
    # The generic readers (reranker train --candidates / --events) read the same files.
    (served_file,) = (tmp_path / "log").glob("served-*.tsv")
    (events_file,) = (tmp_path / "log").glob("events-*.tsv")
    assert formats.read_served_lists(served_file) == [served]
    assert [e.item_id for e in formats.read_events(events_file)] == ["h1", "c1"]
    metrics = running.service.metrics.exposition().decode()
    assert 'reranker_training_log_records_total{kind="lists"} 1.0' in metrics
    assert 'reranker_training_log_records_total{kind="events"} 2.0' in metrics


def test_user_ids_are_hashed_with_the_access_log_key_in_both_files(tmp_path: Path, make_server: ServerFactory) -> None:
    running, stub = make_server(fake_settings(training_log_dir=str(tmp_path), log_user_salt="k3y"))
    _serve_some(stub)
    running.stop(0)
    log = read_training_log(tmp_path)
    hashed = user_hash("k3y", "u1")
    assert {e.user_id for e in log.events} == {hashed} == {s.user_id for s in log.lists}
    assert "u1\t" not in "".join(p.read_text() for p in tmp_path.glob("*.tsv"))


def test_sampling_zero_logs_events_but_no_lists_and_control_lists_are_marked(tmp_path: Path, make_server: ServerFactory) -> None:
    running, stub = make_server(fake_settings(training_log_dir=str(tmp_path / "a"), training_log_sample=0.0))
    _serve_some(stub)
    running.stop(0)
    log = read_training_log(tmp_path / "a")
    assert not log.lists and len(log.events) == 2
    running, stub = make_server(fake_settings(training_log_dir=str(tmp_path / "b"), treatment_percent=0.0))
    _serve_some(stub)
    running.stop(0)
    log = read_training_log(tmp_path / "b", variants={"control"})
    assert log.served_as["list-1"][:3] == ("control", running.service.model_version, "control")
    assert log.served_as["list-1"][3] == (0, 1, -1)  # control returns the upstream order
    assert not read_training_log(tmp_path / "b", variants={"reranked"}).lists


ODD_IDS = ["a\tb", "a b", "c\nd", "c d", "e\\tf", "g\\", "h\r", "h\\r", "i\\\\n\t"]


def test_ids_with_tabs_newlines_and_backslashes_round_trip_exactly(tmp_path: Path, make_server: ServerFactory) -> None:
    """Ids are escaped reversibly (a row is one line), and read back exactly: `a<TAB>b` and `a b` stay two ids."""
    running, stub = make_server(fake_settings(training_log_dir=str(tmp_path)))
    assert len(set(ODD_IDS)) == len(ODD_IDS)
    for n, user in enumerate(["u\tx", "u x", "u\\tx"]):
        cands = [candidate(item, float(10 - i), f"text {i}") for i, item in enumerate(ODD_IDS)]
        stub.Rerank(pb.RerankRequest(user_id=user, candidates=cands, request_id=f"list\t{n}"))
        stub.RecordEvents(pb.RecordEventsRequest(events=[event(user, item) for item in ODD_IDS]))
    running.stop(0)
    log = read_training_log(tmp_path)  # what `reranker train --training-log` reads
    assert [(s.list_id, s.user_id, [r.item_id for r in s.rows]) for s in log.lists] == [
        (f"list\t{n}", user, ODD_IDS) for n, user in enumerate(["u\tx", "u x", "u\\tx"])
    ]
    assert [(e.user_id, e.item_id) for e in log.events] == [
        (user, item) for user in ["u\tx", "u x", "u\\tx"] for item in ODD_IDS
    ]
    for path in tmp_path.glob("*.tsv"):  # every row is one line of the declared width
        header, *rows = path.read_text().split("\n")[:-1]
        assert {len(r.split("\t")) for r in rows} == {len(header.split("\t"))}


def _record(i: int, user: str = "u", n: int = 3) -> traininglog.ServedRecord:
    cands = tuple(Candidate(f"i{j}", float(n - j)) for j in range(n))
    result = RerankResult(RankedItems([c.item_id for c in cands], [0.0] * n, [0.0] * n, [0.0] * n, list(range(n))),
                          Variant.RERANKED, "m1", arm="treatment")
    return traininglog.ServedRecord(1000.0 + i, RerankQuery(user, cands, request_id=f"r{i}"), result)


def test_files_rotate_by_size_and_age_and_old_ones_are_pruned(tmp_path: Path) -> None:
    now = [1000.0]
    rotating = traininglog.RotatingTsv(tmp_path, "served-", traininglog.SERVED_COLUMNS, max_bytes=300,
                                       max_seconds=60, keep_files=3, clock=lambda: now[0])
    for i in range(20):
        rotating.write(traininglog.served_rows(_record(i), "u"))
        now[0] += 1
    rotating.close()
    files = sorted(tmp_path.glob("served-*.tsv"))
    assert len(files) == 3 and rotating.files_opened > 3  # pruned to the newest three
    lists = read_training_log(tmp_path).lists
    assert [s.list_id for s in lists] == [f"r{i}" for i in range(20 - len(lists), 20)]  # the newest, in order
    aged = traininglog.RotatingTsv(tmp_path / "age", "served-", traininglog.SERVED_COLUMNS, max_bytes=10**9,
                                   max_seconds=5, clock=lambda: now[0])
    for i in range(12):
        aged.write(traininglog.served_rows(_record(i), "u"))
        now[0] += 1
    aged.close()
    assert len(list((tmp_path / "age").glob("served-*.tsv"))) == 3  # 12 s of records, 5 s per file


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    gate = threading.Event()
    settings = fake_settings(training_log_dir=str(tmp_path), training_log_queue_size=4, training_log_flush_seconds=0.05)
    writer = TrainingLog(settings.learning, sinks=[lambda _record: gate.wait(10)])
    started = time.perf_counter()
    for i in range(50):
        writer.served(_record(i).query, _record(i).result)
    assert time.perf_counter() - started < 0.5  # never waited for the stuck writer
    gate.set()
    writer.close()
    assert writer.dropped["lists"] >= 40 and writer.written["lists"] + writer.dropped["lists"] == 50
    assert len(read_training_log(tmp_path).lists) == writer.written["lists"]


def test_a_torn_tail_is_never_read_as_data(tmp_path: Path) -> None:
    good = traininglog.served_rows(_record(0), "u") + traininglog.served_rows(_record(1), "u")
    header = "\t".join(traininglog.SERVED_COLUMNS) + "\n"
    torn_list = traininglog.served_rows(_record(2), "u").split("\n")
    # a list cut after two of its three rows, then half a row without its newline
    (tmp_path / "served-1.tsv").write_text(header + good + "\n".join(torn_list[:2]) + "\n" + torn_list[2][:9])
    (tmp_path / "events-1.tsv").write_text("user_id\titem_id\ttimestamp\tevent_type\nu\ti1\t5.0\tclick\nu\ti2\t6")
    (tmp_path / "served-2.tsv").write_text(header[:20])  # crashed while writing the header
    log = read_training_log(tmp_path)
    assert [s.list_id for s in log.lists] == ["r0", "r1"] and log.incomplete_lists == 1 and log.torn_lines == 3
    assert [e.item_id for e in log.events] == ["i1"]
    (tmp_path / "served-1.tsv").write_text(header + good.replace("\t3\n", "\tx\n", 1))
    with pytest.raises(formats.FormatError, match=r"served-1.tsv:2: .*not a number"):
        read_training_log(tmp_path)


CHILD = """
import sys, time
from reranker.config import Settings
from reranker.learning.traininglog import TrainingLog
from reranker.types import Event, EventType
settings = Settings(encoder="fake", training_log_dir=sys.argv[1], training_log_flush_seconds=0.1,
                    training_log_max_file_bytes=20_000)
writer = TrainingLog(settings.learning)
seq = 0
while True:
    writer.events([Event(f"user-{seq}", f"item-{seq}", EventType.CLICK, 1000.0 + seq) for seq in range(seq, seq + 50)])
    seq += 50
    print(writer.written["events"], flush=True)  # events handed to the OS so far
    time.sleep(0.001)
"""


def test_sigkill_while_writing_loses_at_most_the_unflushed_tail(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    flushed = 0
    deadline = time.monotonic() + 60
    while flushed < 2000 and time.monotonic() < deadline:  # >= 2000 events flushed, several files
        flushed = int(child.stdout.readline() or 0)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    assert flushed >= 2000
    log = read_training_log(tmp_path)  # raises on any corrupt row
    seqs = [int(e.item_id.removeprefix("item-")) for e in log.events]
    # Everything reported flushed is there, in order, with no gap and no damaged row.
    assert seqs == list(range(len(seqs))) and len(seqs) >= flushed
    assert all(e.user_id == f"user-{s}" and e.timestamp == 1000.0 + s for e, s in zip(log.events, seqs))
    assert len(list(tmp_path.glob("events-*.tsv"))) > 1
