"""Item vectors for a request: the item cache, then the shared catalog, then the encoder (through
ItemEncoding, whose late encodes fill the cache)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from reranker.cancellation import CancelToken
from reranker.config import ModelSettings
from reranker.metrics import Metrics
from reranker.model.batching import MicroBatcher
from reranker.model.catalog import CatalogSource
from reranker.model.encoder import Encoder
from reranker.model.itemencoding import ItemEncoding
from reranker.model.items import ItemVectorCache
from reranker.types import Item, UpsertResult

# (vectors, hit mask) of one ItemVectorCache.lookup
Lookup = tuple[np.ndarray, np.ndarray]
# (vectors, has_vector, cache hits, encoded count, blocked) of ItemVectors.resolve
Resolved = tuple[np.ndarray, np.ndarray, int, int, bool]


class ItemVectors:
    """Where a request's item vectors come from. `encoding` is attached once the encoder's batcher runs."""

    __slots__ = ("items", "catalog", "encoding")

    def __init__(self, items: ItemVectorCache, catalog: CatalogSource | None) -> None:
        self.items = items
        self.catalog = catalog
        self.encoding: ItemEncoding | None = None

    @classmethod
    def open(cls, settings: ModelSettings, model_version: str, dim: int, metrics: Metrics) -> ItemVectors:
        """The item cache and, with catalog_path, the shared catalog (CatalogError where unusable)."""
        catalog = None
        if settings.catalog_path:
            catalog = CatalogSource(settings.catalog_path, model_version=model_version, dim=dim,
                                    poll_seconds=settings.catalog_poll_seconds, registry=metrics.registry)
        return cls(ItemVectorCache(settings.item_cache_size, dim), catalog)

    def start_encoding(self, encoder: Encoder, settings: ModelSettings, metrics: Metrics) -> MicroBatcher:
        """The encoder's micro-batcher, and the encoding through it that fills the cache (late too)."""
        s = settings
        batcher = MicroBatcher(
            encoder, max_batch=s.encode_batch_size, max_wait_s=s.encode_max_wait_ms / 1000.0,
            max_pending=s.encode_queue_size, observer=metrics.observe_batch,
        )
        encoding = self.encoding = ItemEncoding(batcher, self.items, late_fill=s.encode_late_fill,
                                                chunk=s.encode_queue_size // 2)
        metrics.watch_late_encodes(lambda: (encoding.late_filled, encoding.late_dropped))
        return batcher

    def counters(self) -> dict[str, tuple[int, int, int]]:
        """{cache: (hits, misses, entries)} of the item cache and the catalog (looked up where the
        item cache missed), for the metrics endpoint."""
        out = {"items": (self.items.hits, self.items.misses, len(self.items))}
        if self.catalog is not None:
            out["catalog"] = (self.catalog.hits, self.catalog.misses, len(self.catalog.current))
        return out

    def cached(
        self, item_ids: Sequence[str], texts: Sequence[str | None], lookup: Lookup | None = None,
        keys_out: np.ndarray | None = None,
    ) -> Lookup:
        """(vectors, hit) from the item cache (or `lookup`, one already made), then the catalog.
        `keys_out` receives the cached ids' item keys (left 0 when `lookup` was given; the catalog's
        rows stay 0 too: hashed later)."""
        vectors, hit = lookup if lookup is not None else self.items.lookup(item_ids, texts, keys_out)
        if self.catalog is not None and not hit.all():
            hit = self.catalog.fill(item_ids, texts, vectors, hit)
        return vectors, hit

    @staticmethod
    def to_encode(texts: Sequence[str | None], hit: np.ndarray) -> list[int]:
        """Rows neither cached nor in the catalog that have a text to encode."""
        return [i for i in np.flatnonzero(~hit).tolist() if texts[i] is not None]

    def encode(
        self, item_ids: Sequence[str], texts: Sequence[str | None], vectors: np.ndarray, has_vector: np.ndarray,
        misses: list[int], timeout_s: float, cancel: CancelToken | None = None,
    ) -> int:
        """Encode the `misses` rows into `vectors` / `has_vector` (each distinct text once: the same
        item may appear twice among misses, e.g. events); returns how many texts were encoded."""
        unique: dict[tuple[str, str], list[int]] = {}
        for i in misses:
            unique.setdefault((item_ids[i], texts[i]), []).append(i)  # type: ignore[arg-type]
        if unique:
            assert self.encoding is not None
            keys = list(unique)
            encoded = self.encoding.encode([k[0] for k in keys], [k[1] for k in keys], timeout_s, cancel)
            for row, key in enumerate(keys):
                for i in unique[key]:
                    vectors[i] = encoded[row]
                    has_vector[i] = True
        return len(unique)

    def resolve(
        self, item_ids: Sequence[str], texts: Sequence[str | None], timeout_s: float, cancel: CancelToken | None = None,
        *, lookup: Lookup | None = None, keys_out: np.ndarray | None = None, cache_only: bool = False,
    ) -> Resolved:
        """Cached or freshly encoded vectors: (vectors, has_vector, cache hits, encoded count, blocked).
        With `cache_only`, where texts would have to be encoded nothing is: blocked is True and
        (vectors, has_vector) is the lookup made, for a blocking retry to start from."""
        vectors, hit = self.cached(item_ids, texts, lookup, keys_out)
        if hit.all():  # nothing to encode: the hit mask is the answer's own (each lookup makes a fresh one)
            return vectors, hit, len(item_ids), 0, False
        misses = self.to_encode(texts, hit)
        if misses and cache_only:
            return vectors, hit, 0, 0, True
        has_vector = hit.copy()
        encoded = self.encode(item_ids, texts, vectors, has_vector, misses, timeout_s, cancel)
        return vectors, has_vector, int(hit.sum()), encoded, False

    def stored(self, item_ids: Sequence[str]) -> Lookup:
        """Vectors of items a compact profile names (item cache, then catalog; never encoded): (vectors,
        found). Not counted as cache lookups: the cache metrics stay about candidates and events."""
        texts: list[str | None] = [None] * len(item_ids)
        vectors, hit = self.items.lookup(item_ids, texts, count=False)
        if self.catalog is not None and not hit.all():
            hit = self.catalog.current.fill(item_ids, texts, vectors, hit)
        return vectors, hit

    def schedule_missing(self, item_ids: Sequence[str], texts: Sequence[str | None]) -> None:
        """A fail-open answer still warms the cache: texts that are neither cached nor in the catalog
        are queued as late work (bounded, deduplicated with what is in flight)."""
        if self.encoding is None or all(t is None for t in texts):
            return
        vectors, hit = self.items.lookup(item_ids, texts, count=False)
        if self.catalog is not None and not hit.all():  # not counted as catalog lookups either
            hit = self.catalog.current.fill(item_ids, texts, vectors, hit)
        todo = self.to_encode(texts, hit)
        if todo:
            self.encoding.schedule([item_ids[i] for i in todo], [texts[i] for i in todo])  # type: ignore[misc]

    def upsert(self, items: Sequence[Item], timeout_s: float, cancel: CancelToken | None = None) -> UpsertResult:
        """Encode the items' texts into the cache, those not cached with that text yet (the last
        text wins for an id given twice)."""
        latest = {it.item_id: it.text for it in items}
        ids, texts = list(latest), list(latest.values())
        _, hit = self.items.lookup(ids, texts)
        todo = [i for i in np.flatnonzero(~hit).tolist()]
        if todo:
            assert self.encoding is not None
            self.encoding.encode([ids[i] for i in todo], [texts[i] for i in todo], timeout_s, cancel)
        return UpsertResult(upserted=len(ids), encoded=len(todo))
