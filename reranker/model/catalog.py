"""A shared catalog of item vectors: encoded once (`reranker embed-catalog`), memory-mapped read-only
by every replica (`catalog_path`), so a new pod is warm without encoding anything and N replicas on
a node share one copy of the vectors in the page cache.

One file, written to a temporary name and renamed over the old one (an atomic swap):

    bytes 0..8        magic b"RRCAT2\\n\\0"
    bytes 8..4096     manifest, JSON, NUL-padded: model_version, dim, count, dtype (float16 or
                      float32), checksum (blake2b-256 of everything after byte 4096), the offsets
    4096..            vectors   count x dim, little-endian dtype (64-byte aligned)
                      hashes    count x uint64: text_hash of the text each row was encoded from
                      keys      count x uint64: text_hash of each row's item id, ascending (rows are
                                stored in this order: a lookup is a binary search, no in-memory index)
                      offsets   (count + 1) x int64 into the id blob
                      ids       UTF-8 item ids, concatenated (checked after the search: no collision)

A replica consults the catalog where its ItemVectorCache misses (service._resolve_vectors). A row
counts only if the text the caller sent (if any) is the text it was encoded from (text_hash), as
the cache does. Everything stays in the mapped file (float16 rows are widened per lookup; ids are
found by binary search over the sorted id hashes): a replica's private memory does not grow with the
catalog. `CatalogSource` checks the file every `catalog_poll_seconds` on a
background thread; a new file (another inode) is opened, verified (model version, dimension,
checksum) and swapped in by one reference assignment, so lookups never wait; a file that fails the
checks is logged and the old catalog stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reranker.model.items import TextKey, text_hash

log = logging.getLogger(__name__)

MAGIC = b"RRCAT2\n\0"
DATA_START = 4096
_ALIGN = 64
DTYPES = ("float16", "float32")


class CatalogError(ValueError):
    """A catalog file that cannot be used here (format, model version, dimension, checksum)."""


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class Manifest:
    model_version: str
    dim: int
    count: int
    dtype: str
    checksum: str
    created: float
    vectors_offset: int
    hashes_offset: int
    keys_offset: int
    offsets_offset: int
    ids_offset: int
    ids_bytes: int


def write_catalog(path: Path, item_ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray, *,
                  model_version: str, dtype: str = "float16") -> Manifest:
    """Write the catalog to a temporary file beside `path`, then rename it over `path` (atomic)."""
    if dtype not in DTYPES:
        raise CatalogError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    count, dim = vectors.shape
    if count != len(item_ids) or count != len(texts):
        raise CatalogError("item_ids, texts and vectors differ in length")
    if len(set(item_ids)) != count:
        raise CatalogError("item ids are not unique")
    keys = np.array([text_hash(i) for i in item_ids], dtype="<u8")
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    matrix = np.ascontiguousarray(np.asarray(vectors)[order], dtype=np.dtype(dtype).newbyteorder("<"))
    hashes = np.array([text_hash(texts[r]) for r in order.tolist()], dtype="<u8")
    blobs = [item_ids[r].encode("utf-8", "surrogatepass") for r in order.tolist()]
    offsets = np.zeros(count + 1, dtype="<i8")
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    ids = b"".join(blobs)
    vectors_offset = DATA_START
    hashes_offset = _aligned(vectors_offset + matrix.nbytes)
    keys_offset = _aligned(hashes_offset + hashes.nbytes)
    offsets_offset = _aligned(keys_offset + keys.nbytes)
    ids_offset = _aligned(offsets_offset + offsets.nbytes)
    data = bytearray(ids_offset + len(ids) - DATA_START)
    for offset, chunk in ((vectors_offset, matrix.tobytes()), (hashes_offset, hashes.tobytes()),
                          (keys_offset, keys.tobytes()), (offsets_offset, offsets.tobytes()), (ids_offset, ids)):
        data[offset - DATA_START : offset - DATA_START + len(chunk)] = chunk
    manifest = Manifest(model_version, int(dim), int(count), dtype, hashlib.blake2b(data, digest_size=32).hexdigest(),
                        time.time(), vectors_offset, hashes_offset, keys_offset, offsets_offset, ids_offset, len(ids))
    header = json.dumps(manifest.__dict__).encode()
    if len(MAGIC) + len(header) > DATA_START:
        raise CatalogError("manifest too long")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(MAGIC + header.ljust(DATA_START - len(MAGIC), b"\0"))
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest


def read_manifest(path: Path) -> Manifest:
    try:
        with open(path, "rb") as f:
            head = f.read(DATA_START)
    except OSError as exc:
        raise CatalogError(f"cannot read the catalog {path}: {exc.strerror or exc}") from None
    if not head.startswith(MAGIC):
        raise CatalogError(f"{path} is not a reranker catalog (bad magic)")
    try:
        return Manifest(**json.loads(head[len(MAGIC) :].rstrip(b"\0")))
    except (ValueError, TypeError) as exc:
        raise CatalogError(f"{path}: unreadable manifest: {exc}") from None


class Catalog:
    """One opened catalog file: the vectors mapped read-only, an id -> row dict in memory."""

    def __init__(self, path: Path, *, model_version: str | None = None, dim: int | None = None,
                 verify: bool = True) -> None:
        self.path = Path(path)
        m = self.manifest = read_manifest(self.path)
        if model_version is not None and m.model_version != model_version:
            raise CatalogError(f"{path} was encoded by {m.model_version!r}, this server runs {model_version!r}")
        if dim is not None and m.dim != dim:
            raise CatalogError(f"{path} has dimension {m.dim}, the encoder {dim}")
        if m.dtype not in DTYPES:
            raise CatalogError(f"{path}: dtype {m.dtype!r}")
        size = self.path.stat().st_size
        if size != m.ids_offset + m.ids_bytes:
            raise CatalogError(f"{path} is {size} bytes, the manifest says {m.ids_offset + m.ids_bytes} (truncated?)")
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        if verify:
            digest = hashlib.blake2b(memoryview(raw[DATA_START:]), digest_size=32).hexdigest()  # type: ignore[arg-type]
            if digest != m.checksum:
                raise CatalogError(f"{path}: checksum mismatch (corrupt or partly written file)")
        self.vectors = np.ndarray((m.count, m.dim), dtype=np.dtype(m.dtype).newbyteorder("<"), buffer=raw,
                                  offset=m.vectors_offset)
        self.hashes = np.ndarray((m.count,), dtype="<u8", buffer=raw, offset=m.hashes_offset)
        self.keys = np.ndarray((m.count,), dtype="<u8", buffer=raw, offset=m.keys_offset)
        self._offsets = np.ndarray((m.count + 1,), dtype="<i8", buffer=raw, offset=m.offsets_offset)
        self._ids = raw[m.ids_offset : m.ids_offset + m.ids_bytes]
        self.inode = os.stat(self.path).st_ino

    def __len__(self) -> int:
        return self.manifest.count

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """The catalog row of each id, -1 where absent: a binary search over the sorted id hashes,
        then the id itself compared (a 64-bit hash collision can never return another item)."""
        wanted = np.array([text_hash(i) for i in item_ids], dtype=np.uint64)
        start = np.searchsorted(self.keys, wanted)
        out = np.full(len(item_ids), -1, dtype=np.int64)
        count = len(self.keys)
        for k, p in enumerate(start.tolist()):
            encoded = None
            while p < count and self.keys[p] == wanted[k]:
                encoded = encoded or item_ids[k].encode("utf-8", "surrogatepass")
                if self._ids[self._offsets[p] : self._offsets[p + 1]].tobytes() == encoded:
                    out[k] = p
                    break
                p += 1
        return out

    def fill(self, item_ids: Sequence[str], texts: Sequence[TextKey], vectors: np.ndarray, hit: np.ndarray) -> np.ndarray:
        """Rows of `vectors` not yet `hit` whose id is in the catalog (with the same text, when one
        is given) are filled from it; returns the new hit mask."""
        misses = np.flatnonzero(~hit)
        rows = self.rows([item_ids[i] for i in misses.tolist()])
        found = rows >= 0
        if not found.any():
            return hit
        misses, rows = misses[found], rows[found]
        ok = np.ones(len(rows), dtype=bool)
        for k, i in enumerate(misses.tolist()):
            key = texts[i]
            if key is not None:
                ok[k] = int(self.hashes[rows[k]]) == (text_hash(key) if isinstance(key, str) else int(key))
        misses, rows = misses[ok], rows[ok]
        vectors[misses] = self.vectors[rows]
        out = hit.copy()
        out[misses] = True
        return out


class CatalogSource:
    """The current catalog of `path`, swapped for a new file when one replaces it (polled)."""

    def __init__(self, path: Path | str, *, model_version: str, dim: int, poll_seconds: float = 10.0) -> None:
        self.path = Path(path)
        self._model_version, self._dim = model_version, dim
        self.current = Catalog(self.path, model_version=model_version, dim=dim)
        self.hits = 0
        self.misses = 0
        self.swaps = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll_seconds > 0:
            self._thread = threading.Thread(target=self._watch, args=(poll_seconds,), name="catalog-watch", daemon=True)
            self._thread.start()
        log.info("item catalog %s: %d items, %s, model %s", self.path, len(self.current), self.current.manifest.dtype,
                 self._model_version)

    def fill(self, item_ids: Sequence[str], texts: Sequence[TextKey], vectors: np.ndarray, hit: np.ndarray) -> np.ndarray:
        before = int(hit.sum())
        out = self.current.fill(item_ids, texts, vectors, hit)
        found = int(out.sum()) - before
        self.hits += found  # counters for the metrics endpoint (a race may lose an increment: fine)
        self.misses += len(hit) - before - found
        return out

    def check(self) -> bool:
        """Swap in the file at `path` if it is a new one; True when swapped."""
        try:
            inode = os.stat(self.path).st_ino
        except OSError as exc:
            self.last_error = str(exc)
            return False
        if inode == self.current.inode:
            return False
        try:
            fresh = Catalog(self.path, model_version=self._model_version, dim=self._dim)
        except (CatalogError, OSError) as exc:
            if str(exc) != self.last_error:
                log.error("item catalog %s not swapped in: %s (keeping the current one)", self.path, exc)
            self.last_error = str(exc)
            return False
        self.current = fresh  # one reference assignment: lookups see the old or the new catalog
        self.swaps += 1
        self.last_error = ""
        log.info("item catalog swapped: %d items, created %.0f", len(fresh), fresh.manifest.created)
        return True

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            self.check()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def embed_catalog(items: Iterable[tuple[str, str]], encode: Callable[[list[str]], np.ndarray], out: Path, *,
                  model_version: str,
                  dtype: str = "float16", batch_size: int = 256) -> Manifest:
    """Encode (item_id, text) pairs in batches and write the catalog file atomically."""
    ids, texts = [], []
    for item_id, text in items:
        ids.append(item_id)
        texts.append(text)
    parts = [np.asarray(encode(texts[i : i + batch_size]), dtype=np.float32) for i in range(0, len(texts), batch_size)]
    if not parts:
        raise CatalogError("no items to encode")
    return write_catalog(out, ids, texts, np.concatenate(parts), model_version=model_version, dtype=dtype)
