"""An embedding server as the encoder (setting `encoder=remote`).

It speaks the OpenAI-compatible `POST /v1/embeddings` API, which TEI, vLLM, Infinity and Ollama
all serve: one request per micro-batch (batching.py), `{"model": ..., "input": [texts],
"encoding_format": "float"}` in, `{"data": [{"index": i, "embedding": [...]}]}` out. One HTTP
client with keep-alive connections is reused for every batch.

Loading asks the server for one vector: its length is the encoder's `dim`, and the model name and
that length make the version (`remote:<model>/<dim>d`), so vectors of another model or size never
share a cache, snapshot, catalog or head. Until the server answers, loading waits (the sidecar
stays NOT_SERVING and Rerank fails open); an answer that can never work (unknown model, bad key)
fails the load at once.

Each returned vector is checked (count, index, length, finite, non-zero) and L2-normalized, as the
local encoder's are. Failures raise `EncoderFailed` (`EncoderUnavailable` when the server is
unreachable, timed out or answered 5xx; `Overloaded` on 429), which the request path turns into
the upstream order. After an unreachable server, batches fail at once for `encoder_retry_seconds`
instead of each waiting out the request timeout.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import numpy as np

from reranker.config import ModelSettings
from reranker.errors import EncoderFailed, EncoderUnavailable, Overloaded
from reranker.vectors import l2_normalize

log = logging.getLogger(__name__)

PROBE_TEXT = "dimension probe"
_MAX_WAIT_BETWEEN_TRIES_S = 5.0
_BODY_SNIPPET = 200


def embeddings_url(base: str) -> str:
    """The /v1/embeddings URL of a server given by its base URL (or by the full URL)."""
    base = base.rstrip("/")
    if base.endswith("/embeddings"):
        return base
    if base.endswith("/v1"):
        return base + "/embeddings"
    return base + "/v1/embeddings"


def read_api_key(path: str) -> str:
    if not path:
        return ""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise EncoderFailed(f"cannot read encoder_api_key_file {path}: {exc}") from exc
    if not key:
        raise EncoderFailed(f"encoder_api_key_file {path} is empty")
    return key


def _rows_in_order(body: Any, count: int) -> list[Any]:
    """The answer's `embedding` lists placed by their `index` (default: their position); EncoderFailed
    when there is not one non-empty list per input, each index in range and given once."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != count:
        got = len(data) if isinstance(data, list) else "no"
        raise EncoderFailed(f"embedding server returned {got} vectors for {count} texts")
    rows: list[Any] = [None] * count
    for position, entry in enumerate(data):
        index = entry.get("index", position) if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or rows[index] is not None:
            raise EncoderFailed(f"embedding server returned a bad or repeated index {index!r}")
        embedding = entry.get("embedding")
        if not isinstance(embedding, list) or not embedding:
            raise EncoderFailed(f"embedding server returned no float list for input {index}")
        rows[index] = embedding
    return rows


def parse_embeddings(body: Any, count: int) -> np.ndarray:
    """The (count, d) float32 rows of an /v1/embeddings answer, in input order; EncoderFailed when
    the answer is not one vector per input, of one length, all numbers finite and non-zero."""
    rows = _rows_in_order(body, count)
    try:
        vectors = np.array(rows, dtype=np.float32)
    except (TypeError, ValueError) as exc:  # ragged rows, strings, nested lists
        raise EncoderFailed(f"embedding server returned vectors that are not one float array: {exc}") from None
    if vectors.ndim != 2:
        raise EncoderFailed(f"embedding server returned vectors of ragged lengths, shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise EncoderFailed("embedding server returned non-finite numbers")
    if not np.linalg.norm(vectors, axis=1).all():
        raise EncoderFailed("embedding server returned an all-zero vector")
    return vectors


class RemoteEncoder:
    """Texts -> L2-normalized vectors from an OpenAI-compatible embedding server."""

    def __init__(
        self,
        settings: ModelSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = embeddings_url(settings.encoder_url)
        self.model = settings.encoder_model
        self.instruction = settings.item_instruction
        self._clock = clock
        self._retry_s = settings.encoder_retry_seconds
        self._down_until = 0.0  # clock time before which batches fail at once (server unreachable)
        self._last_failure = ""
        self._lock = threading.Lock()
        client_log = logging.getLogger("httpx2")
        if client_log.level == logging.NOTSET:
            client_log.setLevel(logging.WARNING)  # it logs every request at INFO: one line per batch
        headers = {"Accept": "application/json"}
        key = read_api_key(settings.encoder_api_key_file)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout_s = settings.encoder_request_timeout_ms / 1000.0
        self._client = httpx2.Client(
            headers=headers,
            timeout=httpx2.Timeout(timeout_s),
            # One batch at a time per sidecar (the micro-batcher's worker), plus the warm-up or a CLI.
            limits=httpx2.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=30.0),
            # One retry of a failed connect (a restarting server); a request that was sent is never resent.
            transport=httpx2.HTTPTransport(retries=1),
        )
        try:
            self.dim = self._wait_for_server(settings.encoder_wait_seconds, sleep)
        except BaseException:
            self._client.close()
            raise
        self.version = f"remote:{self.model}/{self.dim}d"
        if self.instruction:
            self.version += "/instruction-" + hashlib.sha256(self.instruction.encode("utf-8")).hexdigest()[:8]

    def _wait_for_server(self, wait_s: float, sleep: Callable[[float], None]) -> int:
        """Ask for one vector until the server answers; its length is the dimension."""
        give_up = self._clock() + wait_s if wait_s > 0 else math.inf
        pause, tries, next_log = 0.25, 0, 0.0
        while True:
            tries += 1
            try:
                return int(self._request([PROBE_TEXT]).shape[1])
            except (EncoderUnavailable, Overloaded) as exc:
                now = self._clock()
                if now >= give_up:
                    raise EncoderFailed(
                        f"embedding server {self.url} did not answer within {wait_s:g} s ({tries} tries): {exc}"
                    ) from exc
                if now >= next_log:
                    log.warning("waiting for the embedding server %s (try %d): %s", self.url, tries, exc)
                    next_log = now + 30.0
            sleep(min(pause, give_up - now))  # the last try at the end of the wait
            pause = min(pause * 2, _MAX_WAIT_BETWEEN_TRIES_S)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        wait = self._down_until - self._clock()
        if wait > 0:
            raise EncoderUnavailable(f"{self._last_failure}; next try in {wait:.1f} s")
        vectors = self._request(texts)
        if vectors.shape[1] != self.dim:
            raise EncoderFailed(
                f"embedding server {self.url} returned vectors of size {vectors.shape[1]}, expected {self.dim} "
                f"(model {self.model!r} changed? restart the sidecar)"
            )
        return vectors

    def _request(self, texts: list[str]) -> np.ndarray:
        if self.instruction:
            texts = [self.instruction + text for text in texts]
        payload = {"model": self.model, "input": texts, "encoding_format": "float"}
        try:
            response = self._client.post(self.url, json=payload)
        except httpx2.TimeoutException as exc:
            raise self._unreachable(f"timed out ({type(exc).__name__})") from None
        except httpx2.TransportError as exc:
            raise self._unreachable(f"{type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status == 429:
            raise Overloaded(f"embedding server {self.url} is overloaded (HTTP 429)")
        if status >= 500:
            raise self._unreachable(f"HTTP {status}: {_snippet(response)}")
        if status >= 400:
            raise EncoderFailed(f"embedding server {self.url} refused the request, HTTP {status}: {_snippet(response)}")
        self._down_until = 0.0  # it answered: no longer counted as down
        try:
            body = response.json()
        except ValueError:
            raise EncoderFailed(f"embedding server {self.url} answered with something other than JSON") from None
        return l2_normalize(parse_embeddings(body, len(texts)))

    def _unreachable(self, what: str) -> EncoderUnavailable:
        message = f"embedding server {self.url} unavailable: {what}"
        with self._lock:
            self._last_failure = message
            if self._retry_s > 0:
                self._down_until = self._clock() + self._retry_s
        return EncoderUnavailable(message)

    def close(self) -> None:
        self._client.close()


def _snippet(response: httpx2.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:_BODY_SNIPPET] + ("..." if len(text) > _BODY_SNIPPET else "")
