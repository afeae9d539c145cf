"""The transformer on ONNX Runtime (setting `runtime=onnx`; CPU; needs the `onnx` extra).

The Hugging Face model is exported once, mean pooling and L2 normalization included, into
`onnx_cache_dir` under a name that carries the model's content fingerprint; with dtype=int8 the
export is quantized (dynamic, int8 weights per output channel, every MatMul). Later starts load the
cached file. Files are written under a temporary name and renamed, so replicas sharing a cache
directory never read a half-written model. Tokenization is the same Rust tokenizer as the torch
path (`TextTokenizer`), so the two runtimes see identical token ids.

Measured on all-MiniLM-L6-v2 and ml-100k titles (docs/performance.md): float32 matches torch to
cosine 1.0000; int8 per-channel keeps a mean cosine of ~0.99 to float32 at about twice the speed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from reranker.config import ModelSettings
from reranker.model.encoder import (
    PACKAGED_MODEL_NAME,
    TextTokenizer,
    available_cpus,
    encoder_version,
    model_fingerprint,
    packaged_model_dir,
)
from reranker.errors import EncoderFailed

log = logging.getLogger(__name__)

# Bump when the exported graph changes (inputs, pooling, opset): old cache files are then ignored.
EXPORT_FORMAT = 1
_OPSET = 17
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "reranker" / "onnx"


def export_pooled_model(model_dir: Path, out: Path) -> None:
    """Export AutoModel + attention-masked mean pooling + L2 normalization to one ONNX graph."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in _INPUTS)
    axes = {name: {0: "batch", 1: "tokens"} for name in _INPUTS}
    axes["embedding"] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pooled(), example, str(out), input_names=list(_INPUTS), output_names=["embedding"],
            dynamic_axes=axes, opset_version=_OPSET, dynamo=False,
        )


def _not_preprocessing_advice(record: logging.LogRecord) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


def quantize_int8(source: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    root.addFilter(_not_preprocessing_advice)  # ONNX Runtime's advice for static (calibrated) quantization
    try:
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.removeFilter(_not_preprocessing_advice)


def _write_atomically(target: Path, write: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_model(model_dir: Path, name: str, dtype: str, cache_dir: Path) -> Path:
    """Path of the exported (and, for int8, quantized) model, building it when not cached."""
    stem = f"{name}-{model_fingerprint(model_dir)}-export{EXPORT_FORMAT}"
    float_path = cache_dir / f"{stem}-float32.onnx"
    if not float_path.is_file():
        started = time.perf_counter()
        _write_atomically(float_path, lambda tmp: export_pooled_model(model_dir, tmp))
        log.info("exported %s to %s in %.1f s", name, float_path, time.perf_counter() - started)
    if dtype == "float32":
        return float_path
    int8_path = cache_dir / f"{stem}-int8.onnx"
    if not int8_path.is_file():
        started = time.perf_counter()
        _write_atomically(int8_path, lambda tmp: quantize_int8(float_path, tmp))
        log.info("quantized %s to int8 in %.1f s", name, time.perf_counter() - started)
    return int8_path


class OnnxEncoder:
    """Same contract as TransformerEncoder (token_ids / encode_ids / encode), run by ONNX Runtime."""

    def __init__(self, settings: ModelSettings) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise EncoderFailed("runtime=onnx needs ONNX Runtime: pip install 'reranker[onnx]'") from None
        model_dir = Path(settings.model_dir) if settings.model_dir else packaged_model_dir()
        if not (model_dir / "config.json").is_file():
            raise EncoderFailed(f"model directory {model_dir} has no config.json")
        name = PACKAGED_MODEL_NAME if not settings.model_dir else model_dir.name
        cache_dir = Path(settings.onnx_cache_dir) if settings.onnx_cache_dir else default_cache_dir()
        try:
            self._tokens = TextTokenizer(model_dir, settings.max_seq_length, settings.item_instruction)
            path = cached_model(model_dir, name, settings.dtype, cache_dir)
            options = ort.SessionOptions()
            options.intra_op_num_threads = settings.torch_threads if settings.torch_threads > 0 else available_cpus()
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except EncoderFailed:
            raise
        except Exception as exc:  # export, quantization or session creation failed
            raise EncoderFailed(f"cannot prepare the ONNX model from {model_dir}: {exc}") from exc
        self._feeds = [i.name for i in self._session.get_inputs()]
        self.dim = int(self._session.get_outputs()[0].shape[-1])
        self.max_seq_length = settings.max_seq_length
        if settings.pooling != "mean":  # Settings refuses this too; a hand-built Settings may not have
            raise EncoderFailed(f"runtime=onnx supports pooling=mean only (got {settings.pooling}); use runtime=torch")
        self.version = encoder_version(name, model_dir, f"onnx-{settings.dtype}", settings)
        self._lock = threading.Lock()

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return self._tokens.token_ids(texts)

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        input_ids, mask = self._tokens.pad(ids)
        arrays = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        feeds = {name: arrays[name] for name in self._feeds}
        with self._lock:
            (vectors,) = self._session.run(None, feeds)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_ids(self.token_ids(texts))
