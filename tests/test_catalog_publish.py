"""Publishing the shared catalog carelessly: overwriting the live file in place, a manifest that
lies, rows that are not finite. The server keeps serving the catalog it has, says why, counts it,
and takes the next good publish."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from reranker.model.catalog import Catalog, CatalogError, CatalogSource, write_catalog
from reranker.model.encoder import FakeEncoder
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc

from conftest import CountWatcher, candidate, event

REPO = Path(__file__).resolve().parent.parent
DIM = 64
DATA_START = 4096


def items(n: int, start: int = 0, word: str = "topic") -> list[tuple[str, str]]:
    return [(f"item-{i}", f"{word} {i % 7} story number {i}") for i in range(start, start + n)]


def build(path: Path, pairs: list[tuple[str, str]], dtype: str = "float16") -> np.ndarray:
    texts = [t for _, t in pairs]
    vectors = FakeEncoder(DIM).encode(texts)
    write_catalog(path, [i for i, _ in pairs], texts, vectors, model_version=FakeEncoder.version, dtype=dtype)
    return vectors


def forge(src: Path, dst: Path, edit: Callable[[dict], None] = lambda m: None, *, row: int | None = None,
          value: float = float("nan"), resign: bool = True) -> None:
    """Copy a catalog with its manifest edited and/or one vector row overwritten with `value`,
    then publish it the right way (a new file renamed over `dst`). `resign` recomputes the checksum
    as the file's format defines it (what a careless tool writing catalogs of its own would do)."""
    data = bytearray(src.read_bytes())
    magic, manifest = bytes(data[:8]), json.loads(bytes(data[8:DATA_START]).rstrip(b"\0"))
    if row is not None:
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        start = manifest["vectors_offset"] + row * manifest["dim"] * dtype.itemsize
        data[start : start + manifest["dim"] * dtype.itemsize] = np.full(manifest["dim"], value, dtype=dtype).tobytes()
    edit(manifest)
    if resign:
        digest = hashlib.blake2b(digest_size=32)
        if magic != b"RRCAT2\n\0":  # the manifest (all but its checksum) is covered too
            covered = {k: v for k, v in manifest.items() if k != "checksum"}
            digest.update(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode())
        digest.update(bytes(data[DATA_START:]))
        manifest["checksum"] = digest.hexdigest()
    header = json.dumps(manifest).encode()
    data[8:DATA_START] = header.ljust(DATA_START - 8, b"\0")
    tmp = dst.with_name(dst.name + ".forged")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, dst)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- a bad publish keeps the catalog being served, is counted, and never stops the watcher -------
BAD_PUBLISHES: dict[str, tuple[dict, str]] = {
    # name: (forge keyword arguments, reason it is counted under)
    "count larger": (dict(edit=lambda m: m.update(count=m["count"] + 1000)), "format"),
    "count larger, not re-signed": (dict(edit=lambda m: m.update(count=m["count"] + 1000), resign=False), "format"),
    "count smaller": (dict(edit=lambda m: m.update(count=10)), "format"),
    "dtype float32 on float16 rows": (dict(edit=lambda m: m.update(dtype="float32")), "format"),
    "dtype not a string": (dict(edit=lambda m: m.update(dtype=32)), "format"),
    "vectors shifted by 2 bytes": (dict(edit=lambda m: m.update(vectors_offset=m["vectors_offset"] + 2)), "format"),
    "model version rewritten, not re-signed": (dict(edit=lambda m: m.update(model_version="fake-hash-v1"), resign=False),
                                               "checksum"),
    "a NaN row": (dict(row=3), "vectors"),
    "an inf row": (dict(row=7, value=float("inf")), "vectors"),
    "a row of norm 1000": (dict(row=9, value=1000.0 / np.sqrt(DIM)), "vectors"),
}


def test_each_bad_publish_keeps_the_old_catalog_is_counted_and_the_next_good_one_is_swapped_in(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    expected = build(path, items(100))
    registry = CollectorRegistry()
    source = CatalogSource(path, model_version=FakeEncoder.version, dim=DIM, poll_seconds=0.02, registry=registry)
    served = source.current
    good = tmp_path / "good.bin"
    build(good, items(120))
    foreign = tmp_path / "foreign.bin"
    texts = [t for _, t in items(100)]
    write_catalog(foreign, [i for i, _ in items(100)], texts, FakeEncoder(DIM).encode(texts),
                  model_version="another-model", dtype="float16")
    try:
        for name, (kwargs, reason) in BAD_PUBLISHES.items():
            before = registry.get_sample_value("reranker_catalog_refused_total", {"reason": reason}) or 0.0
            forge(foreign if "model version" in name else good, path, **kwargs)  # type: ignore[arg-type]
            wait_for(lambda: registry.get_sample_value("reranker_catalog_refused_total", {"reason": reason}) == before + 1)
            assert source.current is served, name  # nothing was swapped in, not even a subset
            assert source.last_error, name
            vectors = np.zeros((2, DIM), dtype=np.float32)
            hit = source.fill(["item-3", "item-110"], [None, None], vectors, np.zeros(2, dtype=bool))
            assert hit.tolist() == [True, False], name
            np.testing.assert_allclose(vectors[0], expected[3], atol=1e-3)  # not shifted
        assert source._thread is not None and source._thread.is_alive()
        assert registry.get_sample_value("reranker_catalog_swaps_total") == 0
        age = registry.get_sample_value("reranker_catalog_age_seconds")
        assert age is not None and 0 <= age < 600
        # The next good publish is swapped in.
        shutil.copyfile(good, tmp_path / "good2.bin")
        os.replace(tmp_path / "good2.bin", path)
        wait_for(lambda: registry.get_sample_value("reranker_catalog_swaps_total") == 1)
        assert len(source.current) == 120 and source.last_error == ""
    finally:
        source.close()


def test_a_counted_refusal_or_swap_is_already_visible_to_whoever_reads_the_count(tmp_path: Path) -> None:
    # A watcher thread refuses and swaps while readers poll the counters: a reader that sees the refusal
    # counted must also see why (last_error), and one that sees the swap counted must see the new catalog.
    path = tmp_path / "c.bin"
    build(path, items(100))
    source = CatalogSource(path, model_version=FakeEncoder.version, dim=DIM, poll_seconds=3600, registry=CollectorRegistry())
    seen: list[tuple[str, object]] = []

    source.refused = CountWatcher(lambda _reason: ("refused", source.last_error), seen)  # type: ignore[assignment]
    source.swapped = CountWatcher(lambda _: ("swapped", len(source.current)), seen)  # type: ignore[assignment]
    try:
        good = tmp_path / "good.bin"
        build(good, items(120))
        forge(good, path, edit=lambda m: m.update(count=m["count"] + 1000))
        assert source.check() is False
        shutil.copyfile(good, tmp_path / "good2.bin")
        os.replace(tmp_path / "good2.bin", path)
        assert source.check() is True
        assert seen[0][0] == "refused" and seen[0][1], seen  # the reason was set before the refusal was counted
        assert seen[1] == ("swapped", 120), seen  # the new catalog was in place before the swap was counted
    finally:
        source.close()


def test_the_writer_refuses_rows_that_are_not_finite_or_not_unit_length_and_names_the_item(tmp_path: Path) -> None:
    texts = [t for _, t in items(20)]
    ids = [i for i, _ in items(20)]
    for value in (np.nan, np.inf, 50.0):
        vectors = FakeEncoder(DIM).encode(texts)
        vectors[4] = value
        with pytest.raises(CatalogError, match="item-4"):
            write_catalog(tmp_path / "c.bin", ids, texts, vectors, model_version="m", dtype="float32")
    vectors = FakeEncoder(DIM).encode(texts).astype(np.float64)
    vectors[5] *= 1e6  # finite in float64, inf in float16
    with pytest.raises(CatalogError, match="item-5"):
        write_catalog(tmp_path / "c.bin", ids, texts, vectors, model_version="m", dtype="float16")
    assert not (tmp_path / "c.bin").exists() and not list(tmp_path.iterdir())


def test_a_server_never_starts_on_a_catalog_with_a_bad_row(tmp_path: Path) -> None:
    build(tmp_path / "good.bin", items(30))
    forge(tmp_path / "good.bin", tmp_path / "c.bin", row=2)
    with pytest.raises(CatalogError, match="not finite") as info:
        Catalog(tmp_path / "c.bin", model_version=FakeEncoder.version, dim=DIM)
    assert info.value.reason == "vectors"


# --- overwriting the live file in place (same inode) through a real `reranker serve` ------------
class Serve:
    def __init__(self, catalog: Path, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reranker", "serve", "--encoder", "fake", "--fake-dim", str(DIM),
             "--address", "127.0.0.1:0", "--metrics-address", "", "--grace-seconds", "1", "--no-warmup",
             "--catalog-path", str(catalog), "--catalog-poll-seconds", "0.05", *extra],
            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        assert self.process.stderr is not None
        port = 0
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r"listening on \S+ \(port (\d+)[,)]", line)
            if match:
                port = int(match.group(1))
                break
        assert port, f"serve exited with {self.process.wait()} before listening: {''.join(self.lines)}"
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.RerankerServiceStub(self.channel)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def rerank(self, ids: list[str]) -> pb.RerankResponse:
        return self.stub.Rerank(pb.RerankRequest(user_id="u", candidates=[candidate(i, 1.0) for i in ids]), timeout=10)

    def stop(self) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self._drain.join(10)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return code


def _personalized(serve: Serve, ids: list[str]) -> pb.RerankResponse:
    """The first Rerank that personalizes (the server loads in the background)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            serve.stub.RecordEvents(pb.RecordEventsRequest(events=[event("u", "item-1")]), timeout=10)
            reply = serve.rerank(ids)
            if reply.variant == pb.VARIANT_RERANKED:
                return reply
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        assert time.monotonic() < deadline, serve.log
        time.sleep(0.1)


def test_truncating_or_copying_over_the_live_catalog_file_never_takes_the_server_down(tmp_path: Path) -> None:
    path = tmp_path / "items.cat"
    build(path, items(300))
    other = tmp_path / "other.cat"
    build(other, items(40, start=1000, word="other"))
    inode = path.stat().st_ino
    wanted = [f"item-{i}" for i in range(0, 300, 3)]
    serve = Serve(path)
    try:
        reply = _personalized(serve, wanted)
        assert reply.cache_hits == len(wanted) and reply.without_vector == 0
        os.truncate(path, DATA_START)  # in place: the same inode, the mapped pages would be gone
        reply = serve.rerank(wanted)
        assert reply.variant == pb.VARIANT_RERANKED and reply.cache_hits == len(wanted) and reply.without_vector == 0
        wait_for(lambda: "not swapped in" in serve.log)  # the truncated file is refused, with the reason
        reply = serve.rerank(wanted)
        assert reply.cache_hits == len(wanted) and reply.without_vector == 0
        shutil.copyfile(other, path)  # `cp other.cat items.cat`: the same inode again, now another catalog
        assert path.stat().st_ino == inode
        reply = serve.rerank(wanted)
        assert reply.variant == pb.VARIANT_RERANKED
        # A complete catalog copied in place is taken like a published one.
        wait_for(lambda: serve.rerank(["item-1000", "item-1039"]).without_vector == 0)
        assert serve.process.poll() is None
    finally:
        code = serve.stop()
    assert code == 0, serve.log


def test_if_the_mapped_pages_are_taken_away_the_server_says_why_before_it_dies(tmp_path: Path) -> None:
    """The one way left to lose the mapped pages: truncating the file the server maps (not the
    published path). Nothing can catch that; the process must at least say so."""
    path = tmp_path / "items.cat"
    build(path, items(300))
    wanted = [f"item-{i}" for i in range(0, 300, 3)]
    serve = Serve(path)
    try:
        _personalized(serve, wanted)
        maps = Path(f"/proc/{serve.process.pid}/maps").read_text()
        mapped = {Path(line.split(None, 5)[5]) for line in maps.splitlines()
                  if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith(str(tmp_path))}
        assert mapped, maps
        for file in mapped:
            os.chmod(file, 0o644)
            os.truncate(file, DATA_START)
        with pytest.raises(grpc.RpcError):
            for _ in range(20):
                serve.rerank(wanted)
    finally:
        code = serve.stop()
    assert code == -signal.SIGBUS
    assert "Bus error" in serve.log and "catalog" in serve.log.split("Bus error", 1)[1], serve.log


def test_where_no_served_copy_can_be_written_the_catalog_is_held_in_private_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only catalog directory and temp directory (injected: root may write anywhere)."""
    import errno

    from reranker.model import catalog as catalog_module

    def read_only(*_args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(catalog_module, "_write_copy", read_only)
    path = tmp_path / "c.bin"
    expected = build(path, items(50))
    catalog = Catalog(path, model_version=FakeEncoder.version, dim=DIM)
    assert catalog.copy is None and not list(tmp_path.glob(".c.bin.served-*"))
    os.truncate(path, DATA_START)  # nothing of it is mapped: lookups go on
    vectors = np.zeros((1, DIM), dtype=np.float32)
    assert catalog.fill(["item-7"], [None], vectors, np.zeros(1, dtype=bool))[0]
    np.testing.assert_allclose(vectors[0], expected[7], atol=1e-3)


def test_the_swap_count_read_by_tests_and_tools_trails_the_new_catalog(tmp_path: Path) -> None:
    """`swaps` (a plain int) announces a swap like the Prometheus counter does: whoever sees it
    bumped must already get the new catalog from `current`."""
    path = tmp_path / "c.bin"
    build(path, items(100))
    source = CatalogSource(path, model_version=FakeEncoder.version, dim=DIM, poll_seconds=0, registry=CollectorRegistry())
    seen: list[int] = []

    class Counting(int):  # stands in for the int; records what a reader sees at the moment of counting
        def __iadd__(self, n: int) -> Counting:  # type: ignore[override,misc]
            seen.append(len(source.current))
            return Counting(int(self) + n)

    source.swaps = Counting(0)
    try:
        build(path, items(120))
        assert source.check() is True
        assert seen == [120] and source.swaps == 1, seen
    finally:
        source.close()
