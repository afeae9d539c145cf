"""Decoder-LLM embedding models through `model_dir`: pooling (mean / cls / last_token with left
padding) and the item instruction, checked against a reference forward pass of one text at a time.

The models are tiny, randomly initialised 2-layer Qwen2 and Llama configs built here and saved to a
temporary model directory (with the packaged model's tokenizer): the code path is the one a real
Qwen3-Embedding or e5-mistral checkpoint takes, at a size a CPU test can afford.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from reranker.config import Settings
from reranker.model.encoder import TransformerEncoder, packaged_model_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Toy Story",
    "A much longer title about a space station drama with many words in it (1995)",
    "Heat",
    "Romantic comedy in Paris",
]
INSTRUCTION = "Instruct: represent this title for recommendation\nQuery: "


def _tiny_model_dir(tmp_path: Path, family: str) -> Path:
    out = tmp_path / f"tiny-{family}"
    source = packaged_model_dir()
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    common = dict(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    if family == "qwen2":
        model = transformers.Qwen2Model(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaModel(transformers.LlamaConfig(**common))
    model.save_pretrained(out)
    return out


def _settings(model_dir: Path, **overrides: object) -> Settings:
    base = Settings(encoder="transformer", model_dir=str(model_dir), max_seq_length=32, torch_threads=1, metrics_address="")
    return dataclasses.replace(base, **overrides)


def _reference(model_dir: Path, texts: list[str], pooling: str, instruction: str = "") -> np.ndarray:
    """One text at a time, no padding at all: what each vector must be whatever the batch."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(instruction + text, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
            hidden = model(input_ids=ids).last_hidden_state[0]
            vector = {"mean": hidden.mean(dim=0), "cls": hidden[0], "last_token": hidden[-1]}[pooling]
            out.append(torch.nn.functional.normalize(vector, dim=-1).numpy())
    return np.stack(out)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("pooling", ["last_token", "mean", "cls"])
def test_batched_pooling_matches_one_text_at_a_time(tmp_path: Path, family: str, pooling: str) -> None:
    model_dir = _tiny_model_dir(tmp_path, family)
    encoder = TransformerEncoder(_settings(model_dir, pooling=pooling).model)
    got = encoder.encode(TEXTS)  # one batch of very different lengths: padding must not leak in
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(model_dir, TEXTS, pooling), atol=2e-5)
    # The micro-batcher's path (token ids from request threads, padded by the model thread) agrees.
    np.testing.assert_allclose(encoder.encode_ids(encoder.token_ids(TEXTS)), got, atol=1e-6)
    assert (pooling == "mean") == (not encoder.version.endswith(f"/{pooling}"))


def test_item_instruction_is_prefixed_and_changes_the_version(tmp_path: Path) -> None:
    model_dir = _tiny_model_dir(tmp_path, "qwen2")
    plain = TransformerEncoder(_settings(model_dir, pooling="last_token").model)
    instructed = TransformerEncoder(_settings(model_dir, pooling="last_token", item_instruction=INSTRUCTION).model)
    np.testing.assert_allclose(
        instructed.encode(TEXTS), _reference(model_dir, TEXTS, "last_token", INSTRUCTION), atol=2e-5
    )
    assert not np.allclose(instructed.encode(TEXTS), plain.encode(TEXTS), atol=1e-3)
    assert plain.version != instructed.version and "/instruction-" in instructed.version


def test_bfloat16_decoder_stays_close_to_float32(tmp_path: Path) -> None:
    # bfloat16 runs on CPU too (CUDA is where it pays); float16 is CUDA-only and falls back here.
    model_dir = _tiny_model_dir(tmp_path, "qwen2")
    full = TransformerEncoder(_settings(model_dir, pooling="last_token").model).encode(TEXTS)
    half = TransformerEncoder(_settings(model_dir, pooling="last_token", dtype="bfloat16").model)
    assert "/bfloat16/" in half.version
    cosine = (half.encode(TEXTS) * full).sum(axis=1)
    assert cosine.min() > 0.98


def test_unknown_pooling_and_onnx_with_a_new_pooling_are_config_errors() -> None:
    with pytest.raises(ValueError, match="pooling must be one of mean, cls, last_token"):
        Settings(pooling="max")
    with pytest.raises(ValueError, match="runtime=onnx supports pooling=mean only"):
        Settings(runtime="onnx", pooling="last_token")
