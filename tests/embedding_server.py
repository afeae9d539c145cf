"""Embedding servers for the remote-encoder tests.

`MiniEmbeddingServer` is the smallest server that implements the OpenAI-compatible
`POST /v1/embeddings` API (stdlib http.server, HTTP/1.1 keep-alive), answering from the project's
FakeEncoder. It is NOT a real embedding server: it lets every CI run cover the client, and can
misbehave on purpose (`mode`). Its vectors are sent scaled to norm 3, so the client's L2
normalization is exercised.

`InfinityServer` (reranker.tools.harness) runs a real one, `infinity_emb` (pip package infinity-emb), serving the packaged
MiniLM weights from their local directory. Installing it into the project's venv would pull its
own dependency pins, so the tests look for the executable in RERANKER_TEST_INFINITY_EMB, then on
PATH, and skip with the reason when there is none.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reranker.model.encoder import FakeEncoder
from reranker.tools.harness import InfinityServer, free_port  # noqa: F401  (InfinityServer: the tests' real server)

INFINITY_ENV = "RERANKER_TEST_INFINITY_EMB"

# Ways the mini server can misbehave.
MODES = ("ok", "hang", "500", "429", "nan", "short", "bigger", "reversed", "not_json")


class MiniEmbeddingServer:
    def __init__(self, dim: int = 64, *, model: str = "fake-model", api_key: str = "", port: int | None = None) -> None:
        self.encoder = FakeEncoder(dim)
        self.model, self.api_key = model, api_key
        self.port = port or free_port()
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []  # {"input", "model", "encoding_format", "auth", "client_port"}
        self.release = threading.Event()  # ends a "hang"
        self._httpd: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inputs(self) -> list[str]:
        """Every text the server was asked to embed, in order."""
        return [text for request in self.requests for text in request["input"]]

    def start(self) -> MiniEmbeddingServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connection

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server._connections.discard(self.connection)
                super().finish()

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                if self.path != "/v1/embeddings":
                    return self._send(404, b'{"error": "not found"}')
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, b'{"error": {"message": "invalid api key"}}')
                body = json.loads(raw)
                with server._lock:
                    server.requests.append({
                        "input": body.get("input"), "model": body.get("model"),
                        "encoding_format": body.get("encoding_format"),
                        "auth": self.headers.get("Authorization"), "client_port": self.client_address[1],
                    })
                if body.get("model") != server.model:
                    return self._send(404, json.dumps({"error": f"model {body.get('model')!r} not found"}).encode())
                mode = server.mode
                if mode == "hang":
                    server.release.wait(30)
                elif mode in ("500", "429"):
                    return self._send(int(mode), b'{"error": "injected"}')
                elif mode == "not_json":
                    return self._send(200, b"<html>proxy error</html>", "text/html")
                texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                vectors = 3.0 * server.encoder.encode(texts).astype(np.float64)
                if mode == "nan":
                    vectors[0, 0] = np.nan
                if mode == "bigger":
                    vectors = np.hstack([vectors, np.ones((len(texts), 1))])
                data = [{"object": "embedding", "index": i, "embedding": [float(x) for x in row]}
                        for i, row in enumerate(vectors)]
                if mode == "short":
                    data = data[:-1]
                if mode == "reversed":
                    data = data[::-1]  # indices still right: the client must put them back in order
                answer = {"object": "list", "model": server.model, "data": data,
                          "usage": {"prompt_tokens": 0, "total_tokens": 0}}
                self._send(200, json.dumps(answer, allow_nan=True).encode())

        self._httpd = _QuietServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections: the server is gone, as a killed process is."""
        self.release.set()
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd = None
        self.release = threading.Event()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and closed its end: expected here, not worth a traceback


def infinity_binary() -> str:
    binary = os.environ.get(INFINITY_ENV) or shutil.which("infinity_emb")
    if not binary or not Path(binary).is_file():
        pytest.skip(
            f"no real embedding server: set {INFINITY_ENV} to an `infinity_emb` executable (pip install "
            "'infinity-emb[server,torch]' into a separate venv) or put it on PATH"
        )
    return binary
