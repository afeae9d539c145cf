"""load_encoder: the configured encoder (torch, ONNX Runtime, or a remote embedding server), built
explicitly (never at import).

It lives apart from both runtimes so that neither imports the other: onnx_encoder.py reuses the
tokenizer and model-directory helpers of encoder.py, and this module picks between the two.
"""

from __future__ import annotations

from reranker.config import ModelSettings
from reranker.model.encoder import Encoder, FakeEncoder, TransformerEncoder


def load_encoder(settings: ModelSettings) -> Encoder:
    """Build the configured encoder (loads model weights for `transformer`; waits for the server for `remote`)."""
    if settings.encoder == "fake":
        return FakeEncoder(settings.fake_dim)
    if settings.encoder == "remote":
        from reranker.model.remote_encoder import RemoteEncoder  # the HTTP client only where it is used

        return RemoteEncoder(settings)
    if settings.runtime == "onnx":
        from reranker.model.onnx_encoder import OnnxEncoder  # onnxruntime is an optional extra

        return OnnxEncoder(settings)
    return TransformerEncoder(settings)
