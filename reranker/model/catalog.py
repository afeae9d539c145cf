"""A shared catalog of item vectors: encoded once (`reranker embed-catalog`), mapped read-only by
every replica (`catalog_path`), so a new pod is warm without encoding anything and N replicas on a
node share one copy of the vectors in the page cache.

One file, written to a temporary name and renamed over the old one (an atomic swap):

    bytes 0..8        magic b"RRCAT3\\n\\0"
    bytes 8..4096     manifest, JSON, NUL-padded: model_version, dim, count, dtype (float16 or
                      float32), created, the offsets below, ids_bytes, and checksum: blake2b-256 of
                      the manifest's other fields (compact JSON, sorted keys) followed by everything
                      after byte 4096, so the manifest cannot be edited without the checksum failing
    4096..            vectors   count x dim, little-endian dtype (64-byte aligned)
                      hashes    count x uint64: text_hash of the text each row was encoded from
                      keys      count x uint64: text_hash of each row's item id, ascending (rows are
                                stored in this order: a lookup is a binary search, no in-memory index)
                      offsets   (count + 1) x int64 into the id blob
                      ids       UTF-8 item ids, concatenated (checked after the search: no collision)

The offsets are not free: each must be where the writer puts it for count x dim of that dtype
(`_layout`), and the file exactly as long as the manifest says. Every row is finite with an L2 norm
of at most items.MAX_VECTOR_NORM: the writer refuses to write another row, a reader refuses a file
holding one (the whole file: such a row means a broken encoder run or tool).

A replica never maps the published path itself. Overwriting a mapped file in place (`truncate`,
`cp` onto it: the same inode) takes its pages away and the next lookup dies of SIGBUS, which no
Python code can catch. So a replica maps a served copy: `.{name}.served-{checksum[:16]}` beside the
published file (or in the temp directory when that directory is read-only), written once under a
temporary name and renamed into place, read-only, named by its content so that every replica on a
node maps the same copy and shares its pages. Nothing but the replica ever opens it; a publish
(any way at all) only changes the published path. Where no copy can be written anywhere, the file
is read into private memory instead (the whole file per replica: 76.5 MiB for 100,000 x 384
float16 vectors, 149.7 MiB as float32). Copies of other checksums are removed once a new catalog is
served (a replica still mapping one keeps it until it swaps: unlinking never takes mapped pages).

A replica consults the catalog where its ItemVectorCache misses (ItemVectors.cached, reranker/pipeline/vectors.py). A row
counts only if the text the caller sent (if any) is the text it was encoded from (text_hash), as
the cache does. Everything stays in the mapped copy (float16 rows are widened per lookup; ids are
found by binary search over the sorted id hashes): a replica's private memory does not grow with the
catalog. `CatalogSource` checks the published path every `catalog_poll_seconds` on a background
thread; a changed file (inode, size or modification time) is copied, verified (format, model
version, dimension, checksum, rows) and swapped in by one reference assignment, so lookups never
wait. A file that fails is logged, counted by reason (`reranker_catalog_refused_total`) and the old
catalog stays; nothing a file holds can stop the watcher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from reranker.model.items import MAX_VECTOR_NORM, TextKey, text_hash, unusable_rows

log = logging.getLogger(__name__)

MAGIC = b"RRCAT3\n\0"
_OLDER_FORMATS = {b"RRCAT2\n\0": 2}
DATA_START = 4096
_ALIGN = 64
DTYPES = ("float16", "float32")
# Why a catalog file was refused (the label of reranker_catalog_refused_total).
REASONS = ("unreadable", "format", "model", "checksum", "vectors", "error")
_CHECK_ROWS = 1024  # rows checked at a time: float32 copies of 1.5 MiB at d = 384 (larger ones stay in the heap)
_STALE_TEMP_SECONDS = 3600.0


class CatalogError(ValueError):
    """A catalog file that cannot be used here; `reason` is one of REASONS."""

    def __init__(self, message: str, reason: str = "format") -> None:
        super().__init__(message)
        self.reason = reason


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(count: int, dim: int, dtype: str, ids_bytes: int) -> dict[str, int]:
    """Where the writer puts each section: the only offsets a reader accepts."""
    vectors_offset = DATA_START
    hashes_offset = _aligned(vectors_offset + count * dim * np.dtype(dtype).itemsize)
    keys_offset = _aligned(hashes_offset + 8 * count)
    offsets_offset = _aligned(keys_offset + 8 * count)
    ids_offset = _aligned(offsets_offset + 8 * (count + 1))
    return dict(vectors_offset=vectors_offset, hashes_offset=hashes_offset, keys_offset=keys_offset,
                offsets_offset=offsets_offset, ids_offset=ids_offset)


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

    @property
    def size(self) -> int:
        """The file's length in bytes."""
        return self.ids_offset + self.ids_bytes

    def covered(self) -> bytes:
        """The fields the checksum covers (all but itself), as the writer serializes them."""
        return _covered(asdict(self))


def _covered(fields_: dict[str, object]) -> bytes:
    return json.dumps({k: v for k, v in fields_.items() if k != "checksum"}, sort_keys=True,
                      separators=(",", ":")).encode()


def _checksum(covered: bytes, data: object) -> str:
    digest = hashlib.blake2b(covered, digest_size=32)
    digest.update(data)  # type: ignore[arg-type]
    return digest.hexdigest()


_INT_FIELDS = ("dim", "count", "vectors_offset", "hashes_offset", "keys_offset", "offsets_offset", "ids_offset",
               "ids_bytes")


def _is_hex_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# (field, what it must be, check), in the order they are checked: the first failing one is reported.
_FIELD_RULES: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    *((name, "a non-negative integer", lambda v: type(v) is int and v >= 0) for name in _INT_FIELDS),
    ("dim", "in [1, 65536]", lambda v: 1 <= v <= 65536),
    ("dtype", f"one of {DTYPES}", lambda v: v in DTYPES),
    ("model_version", "a string", lambda v: isinstance(v, str)),
    ("checksum", "64 hex digits", _is_hex_digest),
    ("created", "a finite number", lambda v: type(v) in (int, float) and math.isfinite(v)),
)


def _manifest_fields(head: bytes, where: object) -> dict[str, Any]:
    """The manifest's JSON object, checked to be a current-format manifest with exactly its fields."""
    if head[: len(MAGIC)] in _OLDER_FORMATS:
        raise CatalogError(f"{where} is a format-{_OLDER_FORMATS[head[: len(MAGIC)]]} catalog, whose manifest the "
                           "checksum does not cover: write it again with `reranker embed-catalog`")
    if not head.startswith(MAGIC):
        raise CatalogError(f"{where} is not a reranker catalog (bad magic)")
    try:
        raw = json.loads(head[len(MAGIC) : DATA_START].rstrip(b"\0"))
    except ValueError as exc:
        raise CatalogError(f"{where}: unreadable manifest: {exc}") from None
    names = {f.name for f in fields(Manifest)}
    if not isinstance(raw, dict) or set(raw) != names:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CatalogError(f"{where}: the manifest must hold exactly {sorted(names)}, got {got}")
    return raw


def _parse_manifest(head: bytes, size: int, where: object) -> Manifest:
    """The manifest at the start of a catalog file of `size` bytes, checked against the layout."""
    raw = _manifest_fields(head, where)
    for name, requirement, valid in _FIELD_RULES:
        if not valid(raw[name]):
            raise CatalogError(f"{where}: manifest {name} must be {requirement}, got {raw[name]!r}")
    for name, expected in _layout(raw["count"], raw["dim"], raw["dtype"], raw["ids_bytes"]).items():
        if raw[name] != expected:
            raise CatalogError(f"{where}: manifest {name} is {raw[name]}, but {raw['count']} x {raw['dim']} "
                               f"{raw['dtype']} rows put it at {expected}")
    manifest = Manifest(**raw)
    if size != manifest.size:
        raise CatalogError(f"{where} is {size} bytes, the manifest says {manifest.size} (truncated or overwritten?)")
    return manifest


def write_catalog(path: Path, item_ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray, *,
                  model_version: str, dtype: str = "float16") -> Manifest:
    """Write the catalog to a temporary file beside `path`, then rename it over `path` (atomic).
    Refuses (CatalogError, naming the item) a row that is not finite or longer than unit length
    once stored in `dtype`."""
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
    with np.errstate(over="ignore", invalid="ignore"):
        matrix = np.ascontiguousarray(np.asarray(vectors)[order], dtype=np.dtype(dtype).newbyteorder("<"))
    bad = np.flatnonzero(unusable_rows(matrix))
    if bad.size:
        first = int(order[bad[0]])
        raise CatalogError(f"{bad.size} of {count} vectors are not finite or longer than {MAX_VECTOR_NORM} as {dtype}, "
                           f"the first: item {item_ids[first]!r} (row {first} given)", "vectors")
    hashes = np.array([text_hash(texts[r]) for r in order.tolist()], dtype="<u8")
    blobs = [item_ids[r].encode("utf-8", "surrogatepass") for r in order.tolist()]
    offsets = np.zeros(count + 1, dtype="<i8")
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    ids = b"".join(blobs)
    layout = _layout(int(count), int(dim), dtype, len(ids))
    data = bytearray(layout["ids_offset"] + len(ids) - DATA_START)
    for name, chunk in (("vectors_offset", matrix.tobytes()), ("hashes_offset", hashes.tobytes()),
                        ("keys_offset", keys.tobytes()), ("offsets_offset", offsets.tobytes()), ("ids_offset", ids)):
        offset = layout[name] - DATA_START
        data[offset : offset + len(chunk)] = chunk
    unsigned = Manifest(model_version, int(dim), int(count), dtype, "", time.time(), ids_bytes=len(ids), **layout)
    manifest = Manifest(**{**asdict(unsigned), "checksum": _checksum(unsigned.covered(), data)})
    header = json.dumps(asdict(manifest)).encode()
    if len(MAGIC) + len(header) > DATA_START:
        raise CatalogError("manifest too long")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + header.ljust(DATA_START - len(MAGIC), b"\0"))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def read_manifest(path: Path) -> Manifest:
    try:
        with open(path, "rb") as f:
            head = f.read(DATA_START)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise CatalogError(f"cannot read the catalog {path}: {exc.strerror or exc}", "unreadable") from None
    return _parse_manifest(head, size, path)


# --- the served copy: what a replica maps instead of the published path -------------------------------
def _copy_name(path: Path, checksum: str) -> str:
    return f".{path.name}.served-{checksum[:16]}"


def _copy_exactly(src: IO[bytes], dst: IO[bytes], size: int) -> None:
    """Copy the first `size` bytes of `src` to `dst`, in the kernel where it can (no user-space
    buffers: a large read would stay in this process's heap)."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src.fileno(), dst.fileno(), size - done, done, done)
            if n == 0:
                break
            done += n
    except (AttributeError, OSError):  # another kernel or file system: copy through a small buffer
        src.seek(done)
        dst.seek(done)
        while done < size:
            chunk = src.read(min(size - done, 1 << 20))
            if not chunk:
                break
            dst.write(chunk)
            done += len(chunk)
    if done < size:
        raise CatalogError("the file changed while it was copied (shorter than its manifest says)", "unreadable")


def _write_copy(src: IO[bytes], size: int, copy: Path) -> None:
    """Copy the published file to `copy`: a temporary name, read-only, renamed into place."""
    tmp = copy.with_name(f"{copy.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "xb") as out:
            _copy_exactly(src, out, size)
        os.chmod(tmp, 0o444)
        os.replace(tmp, copy)
    finally:
        tmp.unlink(missing_ok=True)


def _served_bytes(path: Path, *, rewrite: bool = False) -> tuple[np.ndarray, Path | None, bool]:
    """The published file's bytes, held where no publish can reach them: a mapped served copy (see
    the module doc), or private memory when no copy can be written. Returns (bytes, the copy or
    None, whether the copy already existed). `rewrite` writes the copy again even if it exists.
    The caller verifies the checksum (one pass over the bytes)."""
    try:
        src = open(path, "rb")
    except OSError as exc:
        raise CatalogError(f"cannot read the catalog {path}: {exc.strerror or exc}", "unreadable") from None
    with src:
        size = os.fstat(src.fileno()).st_size
        published = _parse_manifest(src.read(DATA_START), size, path)
        name = _copy_name(path, published.checksum)
        for directory in (path.parent, Path(tempfile.gettempdir())):
            copy = directory / name
            try:
                existed = copy.is_file() and not rewrite
                if not existed:
                    _write_copy(src, size, copy)
                raw = np.memmap(copy, dtype=np.uint8, mode="r")
            except OSError as exc:
                log.debug("cannot keep a served copy of %s in %s: %s", path, directory, exc)
                continue
            try:
                same = _parse_manifest(raw[:DATA_START].tobytes(), len(raw), copy) == published
            except CatalogError:
                same = False
            if not same:  # the published file changed while it was copied, or a stale copy of that name
                del raw
                copy.unlink(missing_ok=True)
                raise CatalogError(f"{path} changed while it was copied (a publish in progress?)", "unreadable")
            return raw, copy, existed
        log.warning("no served copy of the catalog %s could be written (neither %s nor %s is writable): it is held "
                    "in private memory (%.1f MiB)", path, path.parent, tempfile.gettempdir(), size / 2**20)
        buffer = bytearray(size)
        src.seek(0)
        if src.readinto(buffer) != size:
            raise CatalogError(f"{path} changed while it was read (shorter than its manifest says)", "unreadable")
        raw = np.frombuffer(buffer, dtype=np.uint8)
        raw.flags.writeable = False
        return raw, None, False


def _verify_file(path: Path, manifest: Manifest) -> None:
    """Read the whole file at `path` and check it against `manifest`'s checksum."""
    digest = hashlib.blake2b(manifest.covered(), digest_size=32)
    with open(path, "rb") as f:
        f.seek(DATA_START)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != manifest.checksum:
        raise CatalogError(f"{path}: checksum mismatch (corrupt, partly written or edited file)", "checksum")


def _remove_other_copies(path: Path, keep: Path | None) -> None:
    """Served copies of other checksums (and temporary copies left by a crash) beside `path`."""
    now = time.time()
    for directory in {path.parent, Path(tempfile.gettempdir())}:
        try:
            candidates = list(directory.glob(f".{path.name}.served-*"))
        except OSError:
            continue
        for other in candidates:
            try:
                if other == keep or (".tmp-" in other.name and now - other.stat().st_mtime < _STALE_TEMP_SECONDS):
                    continue
                other.unlink()
            except OSError:
                pass


class Catalog:
    """One opened catalog file: its served copy mapped read-only (or held in private memory),
    verified whole before it is used."""

    def __init__(self, path: Path, *, model_version: str | None = None, dim: int | None = None) -> None:
        self.path = Path(path)
        self.copy: Path | None = None
        try:
            for attempt in range(2):
                raw, self.copy, existed = _served_bytes(self.path, rewrite=attempt > 0)
                m = self.manifest = _parse_manifest(raw[:DATA_START].tobytes(), len(raw), self.path)
                if model_version is not None and m.model_version != model_version:
                    raise CatalogError(f"{path} was encoded by {m.model_version!r}, this server runs {model_version!r}",
                                       "model")
                if dim is not None and m.dim != dim:
                    raise CatalogError(f"{path} has dimension {m.dim}, the encoder {dim}", "model")
                if _checksum(m.covered(), memoryview(raw[DATA_START:])) == m.checksum:  # type: ignore[arg-type]
                    break
                if self.copy is not None:
                    del raw
                    self.copy.unlink(missing_ok=True)
                if not existed:  # the published file itself
                    raise CatalogError(f"{path}: checksum mismatch (corrupt, partly written or edited file)", "checksum")
                # else: a served copy left torn by a crash: written again from the published file
            self.vectors = np.ndarray((m.count, m.dim), dtype=np.dtype(m.dtype).newbyteorder("<"), buffer=raw,
                                      offset=m.vectors_offset)
            self.hashes = np.ndarray((m.count,), dtype="<u8", buffer=raw, offset=m.hashes_offset)
            self.keys = np.ndarray((m.count,), dtype="<u8", buffer=raw, offset=m.keys_offset)
            self._offsets = np.ndarray((m.count + 1,), dtype="<i8", buffer=raw, offset=m.offsets_offset)
            self._ids = raw[m.ids_offset : m.ids_offset + m.ids_bytes]
            self._check_contents()
        except CatalogError:
            if self.copy is not None:  # a refused file leaves no copy behind
                self.copy.unlink(missing_ok=True)
            raise

    def _check_contents(self) -> None:
        m, where = self.manifest, self.path
        if m.count > 1 and not (self.keys[1:] >= self.keys[:-1]).all():
            raise CatalogError(f"{where}: the id keys are not in ascending order")
        ends = self._offsets
        if ends[0] != 0 or ends[-1] != m.ids_bytes or (m.count and (ends[1:] < ends[:-1]).any()):
            raise CatalogError(f"{where}: the id offsets do not run from 0 to {m.ids_bytes} in order")
        for start in range(0, m.count, _CHECK_ROWS):
            bad = np.flatnonzero(unusable_rows(self.vectors[start : start + _CHECK_ROWS]))
            if bad.size:
                row = start + int(bad[0])
                item = self._ids[self._offsets[row] : self._offsets[row + 1]].tobytes().decode("utf-8", "replace")
                raise CatalogError(f"{where}: row {row} (item {item!r}) is not finite or longer than {MAX_VECTOR_NORM}: "
                                   "the whole file is refused", "vectors")

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


Signature = tuple[int, int, int] | None


def _signature(path: Path) -> Signature:
    """(inode, size, mtime): a rename over the path changes the inode, an overwrite in place the others."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class CatalogSource:
    """The current catalog of `path`, swapped for a new file when one replaces it (polled)."""

    def __init__(self, path: Path | str, *, model_version: str, dim: int, poll_seconds: float = 10.0,
                 registry: CollectorRegistry | None = None) -> None:
        self.path = Path(path)
        self._model_version, self._dim = model_version, dim
        self._seen = _signature(self.path)
        self.current = Catalog(self.path, model_version=model_version, dim=dim)
        _remove_other_copies(self.path, self.current.copy)
        self.hits = 0
        self.misses = 0
        self.swaps = 0
        self.last_error = ""
        registry = registry if registry is not None else CollectorRegistry()
        self.refused = Counter("reranker_catalog_refused", "Catalog files not swapped in, by reason (the served "
                               "catalog stays): " + ", ".join(REASONS) + ".", ["reason"], registry=registry)
        for reason in REASONS:
            self.refused.labels(reason=reason)
        self.swapped = Counter("reranker_catalog_swaps", "New catalog files swapped in.", registry=registry)
        Gauge("reranker_catalog_age_seconds", "Seconds since the served catalog was written (its manifest's created).",
              registry=registry).set_function(lambda: time.time() - self.current.manifest.created)
        self._lock = threading.Lock()  # one check at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll_seconds > 0:
            self._thread = threading.Thread(target=self._watch, args=(poll_seconds,), name="catalog-watch", daemon=True)
            self._thread.start()
        log.info("item catalog %s: %d items, %s, model %s, served from %s", self.path, len(self.current),
                 self.current.manifest.dtype, self._model_version, self.current.copy or "private memory")

    def fill(self, item_ids: Sequence[str], texts: Sequence[TextKey], vectors: np.ndarray, hit: np.ndarray) -> np.ndarray:
        before = int(hit.sum())
        out = self.current.fill(item_ids, texts, vectors, hit)
        found = int(out.sum()) - before
        self.hits += found  # counters for the metrics endpoint (a race may lose an increment: fine)
        self.misses += len(hit) - before - found
        return out

    def check(self) -> bool:
        """Swap in the file at `path` if it changed and passes every check; True when swapped.
        Never raises: a file that fails is logged and counted, and the current catalog stays."""
        with self._lock:
            signature = _signature(self.path)
            if signature == self._seen:
                return False
            self._seen = signature
            if signature is None:
                return False  # gone: keep serving; the next file to arrive is checked
            try:
                if read_manifest(self.path) == self.current.manifest:  # touched, or the same catalog copied over it
                    _verify_file(self.path, self.current.manifest)
                    return False
                fresh = Catalog(self.path, model_version=self._model_version, dim=self._dim)
            except Exception as exc:
                self._refuse(exc)
                return False
            self.last_error = ""
            self.current = fresh  # one reference assignment: lookups see the old or the new catalog
            self.swaps += 1  # the counts last: whoever sees the swap counted also sees the new catalog and no error
            self.swapped.inc()
            _remove_other_copies(self.path, fresh.copy)
            log.info("item catalog swapped: %d items, created %.0f", len(fresh), fresh.manifest.created)
            return True

    def _refuse(self, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, CatalogError) else "unreadable" if isinstance(exc, OSError) else "error"
        message = str(exc) if isinstance(exc, CatalogError) else f"{type(exc).__name__}: {exc}"
        if message != self.last_error:
            log.error("item catalog %s not swapped in (%s): %s (keeping the current one)", self.path, reason, message,
                      exc_info=reason == "error")
        self.last_error = message  # before the count: whoever sees the refusal counted also sees why
        self.refused.labels(reason=reason).inc()

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.wait(poll_seconds):
            try:
                self.check()
            except Exception:  # check() does not raise; a bug must still not end the watcher
                log.exception("item catalog check failed; the current catalog stays")

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
