"""Scoring by likelihood on llama.cpp's logits, shared by the llama.cpp quality benches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_nll(logits: Sequence[np.ndarray], targets: Sequence[int]) -> float:
    """Mean negative log-likelihood of `targets`, row i of `logits` predicting targets[i]
    (float64 log-softmax, so long rows of large logits do not lose precision)."""
    rows = np.stack(logits).astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    logz = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(logz - rows[np.arange(len(targets)), list(targets)]))
