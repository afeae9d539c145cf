"""runtime=onnx: the real MiniLM exported to ONNX Runtime, float32 and int8, on real titles, and served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import candidate, event, fake_settings, ml100k_title_sample
from reranker.config import Settings
from reranker.model.encoder import TransformerEncoder
from reranker.model.loader import load_encoder
from reranker.v1 import reranker_pb2 as pb

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def titles() -> list[str]:
    return ml100k_title_sample()


@pytest.fixture(scope="module")
def reference(titles: list[str]) -> np.ndarray:
    return TransformerEncoder(Settings(torch_threads=2).model).encode(titles)


def _onnx(cache_dir: Path, dtype: str) -> object:
    return load_encoder(Settings(runtime="onnx", dtype=dtype, onnx_cache_dir=str(cache_dir), torch_threads=2).model)


def test_float32_onnx_matches_torch_and_is_cached(cache_dir: Path, titles: list[str], reference: np.ndarray) -> None:
    encoder = _onnx(cache_dir, "float32")
    assert encoder.version.endswith("/onnx-float32")
    vectors = encoder.encode(titles)
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    assert float((vectors * reference).sum(axis=1).min()) > 0.9999
    exported = sorted(p.name for p in cache_dir.iterdir())
    assert len(exported) == 1 and exported[0].endswith("-float32.onnx"), exported
    before = (cache_dir / exported[0]).stat().st_mtime_ns
    _onnx(cache_dir, "float32")  # the second start loads the cached file
    assert (cache_dir / exported[0]).stat().st_mtime_ns == before


def test_int8_onnx_keeps_cosine_above_0_98(cache_dir: Path, titles: list[str], reference: np.ndarray) -> None:
    encoder = _onnx(cache_dir, "int8")
    assert encoder.version.endswith("/onnx-int8")
    cosine = (encoder.encode(titles) * reference).sum(axis=1)
    assert cosine.mean() >= 0.98, cosine.mean()
    assert np.percentile(cosine, 1) >= 0.95, np.sort(cosine)[:5]


def test_a_server_on_the_onnx_runtime_personalizes(make_server, cache_dir: Path) -> None:
    settings = fake_settings(
        encoder="transformer", runtime="onnx", dtype="int8", onnx_cache_dir=str(cache_dir), blend_weight=1.0,
    )
    running, stub = make_server(settings, encoder=load_encoder(settings.model))
    stub.RecordEvents(pb.RecordEventsRequest(events=[
        event("u", "h1", "Star Wars: space battles and starships"),
        event("u", "h2", "Alien invasion of a distant planet, science fiction"),
    ]))
    reply = stub.Rerank(pb.RerankRequest(user_id="u", candidates=[
        candidate("romance", 1.0, "A romantic comedy about a wedding in Paris"),
        candidate("scifi", 0.0, "Space opera: a starship crew fights an alien empire"),
    ]))
    assert reply.variant == pb.VARIANT_RERANKED
    assert reply.model_version.endswith("/onnx-int8")
    assert [i.item_id for i in reply.items] == ["scifi", "romance"]


def test_unsupported_combinations_are_rejected_at_start() -> None:
    with pytest.raises(ValueError, match="runtime=onnx"):
        Settings(runtime="onnx", dtype="float16")
    with pytest.raises(ValueError, match="runtime must be"):
        Settings(runtime="tensorrt")
