"""CPU fast paths of the real MiniLM encoder: int8 fidelity on real titles, token-id path equivalence."""

from __future__ import annotations

import numpy as np
import pytest

from reranker.config import Settings
from reranker.model.encoder import TransformerEncoder
from conftest import ml100k_title_sample

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def titles() -> list[str]:
    return ml100k_title_sample()


@pytest.fixture(scope="module")
def float32_encoder() -> TransformerEncoder:
    return TransformerEncoder(Settings(torch_threads=2).model)


def test_int8_attention_layers_keep_cosine_above_0_98_on_real_titles(titles, float32_encoder) -> None:
    int8 = TransformerEncoder(Settings(torch_threads=2, dtype="int8", int8_layers="attention").model)
    assert int8.version.endswith("/int8-attention")
    reference = float32_encoder.encode(titles)
    quantized = int8.encode(titles)
    cosine = (reference * quantized).sum(axis=1)
    assert cosine.mean() >= 0.99, cosine.mean()
    assert np.percentile(cosine, 1) >= 0.98, np.sort(cosine)[:5]
    np.testing.assert_allclose(np.linalg.norm(quantized, axis=1), 1.0, atol=1e-5)


def test_token_id_path_matches_the_tokenizer_path(titles, float32_encoder) -> None:
    texts = [*titles[:40], "", "word " * 400]  # empty text and one beyond max_seq_length
    via_ids = float32_encoder.encode(texts)
    via_tokenizer = float32_encoder.forward(float32_encoder.tokenize(texts))
    np.testing.assert_allclose(via_ids, via_tokenizer, atol=1e-5)
    assert max(map(len, float32_encoder.token_ids(texts))) == float32_encoder.max_seq_length


def test_bfloat16_runs_on_cpu_with_float32_fidelity(titles, float32_encoder) -> None:
    bf16 = TransformerEncoder(Settings(torch_threads=2, dtype="bfloat16").model)
    assert bf16.version.endswith("/bfloat16")
    sample = titles[:32]
    vectors = bf16.encode(sample)
    assert vectors.dtype == np.float32
    cosine = (float32_encoder.encode(sample) * vectors).sum(axis=1)
    assert cosine.min() >= 0.99, cosine.min()


def test_float16_on_cpu_falls_back_to_float32(caplog) -> None:
    encoder = TransformerEncoder(Settings(torch_threads=2, dtype="float16").model)
    assert encoder.version.endswith("/float32")
    assert "float16 needs CUDA" in caplog.text
