"""The shared item-vector catalog: written once, mapped read-only, consulted where the item cache
misses (no encoding), swapped atomically under lookups, refused when it does not fit the encoder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from reranker.model.catalog import Catalog, CatalogError, CatalogSource, read_manifest, write_catalog
from reranker.cli import main
from reranker.model.encoder import FakeEncoder
from reranker.service import RerankService
from reranker.types import Candidate, RerankQuery
from conftest import fake_settings

DIM = 64


class CountingEncoder(FakeEncoder):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self.texts = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.texts += len(texts)
        return super().encode(texts)


def items(n: int, start: int = 0, word: str = "topic") -> list[tuple[str, str]]:
    return [(f"item-{i}", f"{word} {i % 7} story number {i}") for i in range(start, start + n)]


def build(path: Path, pairs: list[tuple[str, str]], dtype: str = "float16", version: str = FakeEncoder.version):
    enc = FakeEncoder(DIM)
    ids, texts = [p[0] for p in pairs], [p[1] for p in pairs]
    return write_catalog(path, ids, texts, enc.encode(texts), model_version=version, dtype=dtype), enc.encode(texts)


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3)])
def test_a_catalog_maps_the_vectors_it_was_written_with(tmp_path: Path, dtype: str, tol: float) -> None:
    manifest, expected = build(tmp_path / "c.bin", items(50), dtype)
    assert (manifest.count, manifest.dim, manifest.dtype, manifest.model_version) == (50, DIM, dtype, "fake-hash-v1")
    assert read_manifest(tmp_path / "c.bin") == manifest
    catalog = Catalog(tmp_path / "c.bin", model_version="fake-hash-v1", dim=DIM)
    ids = ["item-3", "nope", "item-49", "item-0"]
    texts = [None, None, "topic 0 story number 49", "a changed text"]
    vectors = np.zeros((4, DIM), dtype=np.float32)
    hit = catalog.fill(ids, texts, vectors, np.zeros(4, dtype=bool))
    assert hit.tolist() == [True, False, True, False]  # unknown id; a text it was not encoded from
    np.testing.assert_allclose(vectors[0], expected[3], atol=tol)
    np.testing.assert_allclose(vectors[2], expected[49], atol=tol)
    assert not vectors[1].any() and not vectors[3].any()
    assert isinstance(catalog.vectors, np.ndarray) and not catalog.vectors.flags.writeable  # read-only mapping


def test_a_catalog_that_does_not_fit_is_refused_with_the_reason(tmp_path: Path) -> None:
    build(tmp_path / "c.bin", items(20))
    with pytest.raises(CatalogError, match="encoded by 'fake-hash-v1'"):
        Catalog(tmp_path / "c.bin", model_version="other-model")
    with pytest.raises(CatalogError, match="dimension 64"):
        Catalog(tmp_path / "c.bin", dim=32)
    data = bytearray((tmp_path / "c.bin").read_bytes())
    data[5000] ^= 0xFF
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    with pytest.raises(CatalogError, match="checksum"):
        Catalog(tmp_path / "bad.bin")
    (tmp_path / "short.bin").write_bytes(bytes(data[:-10]))
    with pytest.raises(CatalogError, match="truncated"):
        Catalog(tmp_path / "short.bin")
    (tmp_path / "junk.bin").write_bytes(b"hello" * 1000)
    with pytest.raises(CatalogError, match="magic"):
        Catalog(tmp_path / "junk.bin")


def test_a_service_on_a_catalog_reranks_without_encoding(tmp_path: Path) -> None:
    build(tmp_path / "c.bin", items(200))
    encoder = CountingEncoder(DIM)
    service = RerankService(fake_settings(fake_dim=DIM, catalog_path=str(tmp_path / "c.bin"), warmup=False), encoder)
    service.load()
    vectors, has_vector, hits, encoded, _ = service.vectors.resolve(  # type: ignore[union-attr]
        [f"item-{i}" for i in range(100)], [f"topic {i % 7} story number {i}" for i in range(100)], 1.0)
    assert has_vector.all() and encoded == 0 and encoder.texts == 0
    # Events on catalog items move the profile without encoding either; a Rerank personalizes.
    from reranker.types import Event

    service.record_events([Event("u", "item-7", timestamp=1.0, event_id="e1"), Event("u", "item-14", timestamp=2.0)])
    result = service.rerank(RerankQuery("u", tuple(Candidate(f"item-{i}", 1.0, None) for i in range(0, 60, 3))))
    assert encoder.texts == 0 and result.encoded == 0 and result.cache_hits == 20 and not result.cold_user
    assert result.fallback_reason.name == "NONE" and [i.item_id for i in result.items][:2] != ["item-0", "item-3"]
    assert service.profiles.get("u").history.item_ids == ("item-7", "item-14")  # type: ignore[union-attr]
    # An item outside the catalog is still encoded from its text.
    service.vectors.resolve(["new-item"], ["brand new text"], 1.0)  # type: ignore[union-attr]
    assert encoder.texts == 1
    text = service.metrics.exposition().decode()
    assert 'reranker_cache_lookups_total{cache="catalog",result="miss"} 1.0' in text
    assert 'reranker_cache_entries{cache="catalog"} 200.0' in text
    service.close()


def test_a_new_catalog_file_is_swapped_in_while_lookups_go_on(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    build(path, items(100))
    source = CatalogSource(path, model_version="fake-hash-v1", dim=DIM, poll_seconds=0)
    stop = threading.Event()
    failures: list[str] = []

    def lookups() -> None:
        while not stop.is_set():
            v = np.zeros((1, DIM), dtype=np.float32)
            if not source.fill(["item-5"], [None], v, np.zeros(1, dtype=bool))[0]:
                failures.append("item-5 missed")

    threads = [threading.Thread(target=lookups) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for round_ in range(5):
            build(path, items(100 + round_ + 1))  # item-5 is in every version
            assert source.check()
    finally:  # the lookup threads stop whatever happened
        stop.set()
        for t in threads:
            t.join()
    assert failures == [] and source.swaps == 5 and len(source.current) == 105
    # A file for another model is not swapped in; the current catalog stays.
    build(path, items(10), version="other-model")
    assert not source.check() and len(source.current) == 105 and "other-model" in source.last_error
    source.close()


def test_the_watcher_picks_up_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "c.bin"
    build(path, items(10))
    source = CatalogSource(path, model_version="fake-hash-v1", dim=DIM, poll_seconds=0.02)
    try:  # closed whatever happens: a watcher left running logs into the tests after this one
        build(path, items(30))
        deadline = time.monotonic() + 20.0  # a busy 2-core machine
        while source.swaps < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(source.current) == 30
    finally:
        source.close()


def test_embed_catalog_cli_writes_a_catalog_a_server_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tsv = tmp_path / "items.tsv"
    tsv.write_text("item_id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in items(40)), encoding="utf-8")
    out = tmp_path / "catalog.bin"
    rc = main(["embed-catalog", "--items", str(tsv), "--out", str(out), "--encoder", "fake", "--fake-dim", "16",
               "--vector-dtype", "float32"])
    assert rc == 0 and "40 items x 16 float32" in capsys.readouterr().out
    catalog = Catalog(out, model_version="fake-hash-v1", dim=16)
    v = np.zeros((1, 16), dtype=np.float32)
    assert catalog.fill(["item-9"], [None], v, np.zeros(1, dtype=bool))[0]
    np.testing.assert_array_equal(v[0], FakeEncoder(16).encode([items(40)[9][1]])[0])
    assert not list(tmp_path.glob(".catalog.bin.tmp-*"))  # the temporary file was renamed


def test_a_server_with_an_unusable_catalog_stays_not_ready_and_says_why(tmp_path: Path) -> None:
    build(tmp_path / "c.bin", items(10), version="another-model")
    service = RerankService(fake_settings(fake_dim=DIM, catalog_path=str(tmp_path / "c.bin"), warmup=False),
                            FakeEncoder(DIM))
    with pytest.raises(CatalogError):
        service.load()
    assert not service.ready and "another-model" in service.load_error


def test_ids_are_found_by_binary_search_over_the_mapped_file(tmp_path: Path) -> None:
    ids = ["é-item", "\U0001f600", "a", "b" * 300, "item 7", ""]
    texts = [f"text {i}" for i in range(len(ids))]
    vectors = np.eye(len(ids), DIM, dtype=np.float32)
    write_catalog(tmp_path / "c.bin", ids, texts, vectors, model_version="m", dtype="float32")
    catalog = Catalog(tmp_path / "c.bin")
    rows = catalog.rows(ids + ["absent", "é-itemx"])
    assert rows[-2:].tolist() == [-1, -1]
    for k, row in enumerate(rows[:-2].tolist()):
        np.testing.assert_array_equal(catalog.vectors[row], vectors[k])  # stored in id-hash order, found again
    assert np.all(np.diff(catalog.keys.astype(np.float64)) >= 0)
