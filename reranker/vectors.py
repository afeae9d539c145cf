"""Vector helpers shared by the encoders and the scoring code (below both, so neither imports the other)."""

from __future__ import annotations

import numpy as np

FloatArray = np.ndarray


def l2_normalize(vectors: FloatArray, eps: float = 1e-12) -> FloatArray:
    """Row-wise L2 normalization (a 1-D vector is treated as one row). Zero rows stay zero."""
    arr = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    return arr / np.maximum(norms, eps)
