"""`reranker train` at scale: the adapter's sampled softmax, the per-phase progress bars."""

from __future__ import annotations

import io

import numpy as np
import pytest

from reranker.evaluation import train
from reranker.evaluation.progress import ProgressBar


def _same_group_accuracy(
    vectors: np.ndarray, down: np.ndarray, up: np.ndarray, prior: np.ndarray, cfg: train.TrainConfig
) -> float:
    """Share of items i whose best-scored other item, with context [i], is in i's group (i // 3)."""
    adapted = vectors + (vectors @ down) @ up
    adapted /= np.linalg.norm(adapted, axis=1, keepdims=True)
    logits = adapted @ adapted.T / cfg.adapter_temperature + (adapted @ prior)[None, :]
    np.fill_diagonal(logits, -np.inf)
    n = len(vectors)
    return float(np.mean(logits.argmax(axis=1) // 3 == np.arange(n) // 3))


@pytest.mark.parametrize("negatives", [1000, 8])  # full softmax (60 items <= 1000), sampled (8 negatives)
def test_adapter_learns_which_items_follow_each_other_with_full_and_sampled_softmax(negatives: int) -> None:
    """Random item vectors; every history stays within one group of 3 items (i // 3): the adapter
    must bring each item's group mates closest to it, whichever softmax trains it."""
    n, dim = 60, 64
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sequences = [[3 * int(g) + (t % 3) for t in range(12)] for g in rng.integers(0, n // 3, 300)]
    cfg = train.TrainConfig(adapter_epochs=15, adapter_rank=32, adapter_lr=1e-2, session_length=1,
                            adapter_negatives=negatives)
    identity = np.zeros((dim, 32), dtype=np.float32)
    before = _same_group_accuracy(vectors, identity, identity.T, np.zeros(dim, dtype=np.float32), cfg)
    down, up, prior = train.train_adapter(sequences, vectors, cfg)
    after = _same_group_accuracy(vectors, down, up, prior, cfg)
    assert before < 0.1 and after > 0.8, (before, after)


def test_progress_draws_one_bar_per_phase_and_can_be_off() -> None:
    stream = io.StringIO()
    bar = ProgressBar(stream)
    for step in range(1, 5):
        bar(f"adapter (loss {1 / step:.3f})", step, 4)
    bar("features (popularity, label 1)", 50, 100)
    bar("features (itemknn, label 1)", 50, 100)  # a new pass of the same phase starts a new bar
    bar.close()
    text = stream.getvalue()
    assert "adapter" in text and "4/4" in text and "loss 0.250" in text
    assert text.count("features") >= 2 and "50/100" in text
    quiet = io.StringIO()
    off = ProgressBar(quiet, enabled=False)
    off("adapter", 1, 2)
    off.close()
    assert quiet.getvalue() == ""
