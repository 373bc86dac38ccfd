"""Robust aggregation of named arrays: rules that a few bad clients cannot drag far.

Pure functions over `dict[str, np.ndarray]`; no I/O, no engine, no model. Every rule
computes in float64 and casts back to each array's dtype, like `weighted_mean`.

- `clip_to_norm`: scale each client's update (its difference from the global arrays)
  down to an L2 norm of at most `clip_norm`, over all arrays together. A client that
  scales its update by 10 then moves the global no farther than an honest one may.
- `coordinate_median`: the median of each coordinate across clients (Yin et al., 2018).
  It ignores example counts: a client cannot buy weight by claiming many examples.
- `trimmed_mean`: per coordinate, drop the `floor(trim_fraction * n)` largest and as many
  smallest values, and average the rest (unweighted, for the same reason).
"""

from __future__ import annotations

import math

import numpy as np

from fedtune.core.arrays import Arrays


def _stack(updates: list[Arrays], key: str) -> np.ndarray:
    return np.stack([u[key].astype(np.float64) for u in updates])  # (clients, *shape)


def _check(updates: list[Arrays], what: str) -> None:
    if not updates:
        raise ValueError(f"{what} of no updates")
    keys = set(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if set(u) != keys:
            raise ValueError(f"{what}: update {i} has keys {sorted(u)[:3]}..., update 0 has {sorted(keys)[:3]}...")


def update_norm(global_arrays: Arrays, update: Arrays) -> float:
    """L2 norm of (update - global) over all arrays together."""
    return math.sqrt(sum(float(np.sum(np.square(update[k].astype(np.float64) - g.astype(np.float64))))
                         for k, g in global_arrays.items()))


def clip_to_norm(global_arrays: Arrays, update: Arrays, clip_norm: float) -> tuple[Arrays, float]:
    """Return (clipped update, its norm before clipping). The update's difference from
    the global arrays is scaled by min(1, clip_norm / norm); the input is not modified."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = update_norm(global_arrays, update)
    if norm <= clip_norm:
        return {k: np.array(v, copy=True) for k, v in update.items()}, norm
    scale = clip_norm / norm
    out = {}
    for k, g in global_arrays.items():
        g64 = g.astype(np.float64)
        out[k] = (g64 + (update[k].astype(np.float64) - g64) * scale).astype(update[k].dtype)
    return out, norm


def coordinate_median(updates: list[Arrays]) -> Arrays:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    _check(updates, "coordinate_median")
    return {k: np.median(_stack(updates, k), axis=0).astype(ref.dtype) for k, ref in updates[0].items()}


def trimmed_count(n: int, trim_fraction: float) -> int:
    """How many values trimmed_mean drops at each end, per coordinate, out of n."""
    return int(math.floor(trim_fraction * n))


def trimmed_mean(updates: list[Arrays], trim_fraction: float) -> Arrays:
    """Coordinate-wise mean after dropping the floor(trim_fraction * n) smallest and as
    many largest values. trim_fraction must be in [0, 0.5); at least one value remains."""
    _check(updates, "trimmed_mean")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = len(updates)
    cut = trimmed_count(n, trim_fraction)
    out = {}
    for k, ref in updates[0].items():
        s = np.sort(_stack(updates, k), axis=0)
        out[k] = s[cut:n - cut].mean(axis=0).astype(ref.dtype)
    return out
