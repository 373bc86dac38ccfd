"""Pure aggregation of named arrays. No I/O, no engine, no model."""

from __future__ import annotations

import numpy as np

from fedtune.core.arrays import Arrays


def weighted_mean(results: list[tuple[Arrays, float]]) -> Arrays:
    """Weighted mean of named arrays (weights = example counts), in float64, cast back to
    each array's dtype."""
    if not results:
        raise ValueError("weighted_mean of no results")
    total = float(sum(w for _, w in results))
    if total <= 0:
        raise ValueError("weights sum to zero")
    first = results[0][0]
    out = {}
    for k, ref in first.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for arrays, w in results:
            acc += arrays[k].astype(np.float64) * (w / total)
        out[k] = acc.astype(ref.dtype)
    return out
