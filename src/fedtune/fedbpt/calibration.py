"""Calibration of the verbalizer's class scores, black-box only (it needs nothing but the
label-word logits the black box already returns).

- `batch` (Zhou et al., "Batch Calibration", ICLR 2024): subtract, per class, the log of the
  class probability averaged over the rows being scored (a candidate's whole batch).
- `content_free` (Zhao et al., "Calibrate Before Use", ICML 2021): subtract the log of the
  class probabilities the same prompt gives content-free inputs ("N/A", "[MASK]", "") in the
  same template.

Both turn logits (P, B, C) into calibrated log-scores of the same shape; every loss and metric
reads them as logits (their softmax is the calibrated distribution).
"""

from __future__ import annotations

import numpy as np

CONTENT_FREE = ("N/A", "[MASK]", "")
KINDS = ("none", "batch", "content_free")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _log_mean_prob(logits: np.ndarray) -> np.ndarray:
    """log of the class probabilities averaged over rows: (P, 1, C)."""
    lp = log_softmax(logits)
    m = lp.max(axis=1, keepdims=True)
    return m + np.log(np.exp(lp - m).mean(axis=1, keepdims=True))


def calibrate(kind: str, logits: np.ndarray, content_free: np.ndarray | None = None) -> np.ndarray:
    """Calibrated scores (P, B, C); `content_free` is the (P, K, C) logits of the content-free rows."""
    if kind == "none":
        return logits
    if kind == "batch":
        return log_softmax(logits) - _log_mean_prob(logits)
    if kind == "content_free":
        if content_free is None:
            raise ValueError("content_free calibration needs the content-free rows' logits")
        return log_softmax(logits) - _log_mean_prob(content_free)
    raise ValueError(f"unknown calibration {kind!r} ({', '.join(KINDS)})")


def content_free_texts(n_fields: int) -> list[tuple[str, ...]]:
    return [(t,) * n_fields for t in CONTENT_FREE]
