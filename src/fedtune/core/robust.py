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
- `multi_krum` (Krum when m = 1) and `bulyan`: distance-based selection that tolerates f
  Byzantine clients (`server.byzantine`); unweighted.
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


# ----------------------------------------------------------------------------- distance-based rules


def _flat(updates: list[Arrays]) -> np.ndarray:
    keys = sorted(updates[0])
    return np.stack([np.concatenate([u[k].astype(np.float64).ravel() for k in keys]) for u in updates])


def _unflat(vec: np.ndarray, like: Arrays) -> Arrays:
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].size
        out[k] = vec[i:i + n].reshape(like[k].shape).astype(like[k].dtype)
        i += n
    return {k: out[k] for k in like}


def krum_scores(updates: list[Arrays], f: int) -> np.ndarray:
    """Krum's score of each update (Blanchard et al., 2017): the sum of its squared L2
    distances to its n - f - 2 nearest other updates. Needs n >= 2f + 3."""
    _check(updates, "krum")
    n = len(updates)
    if n < 2 * f + 3:
        raise ValueError(f"krum with f = {f} Byzantine clients needs at least {2 * f + 3} updates, got {n}")
    x = _flat(updates)
    sq = np.sum(x * x, axis=1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)  # squared distances
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, : n - f - 2].sum(axis=1)


def multi_krum(updates: list[Arrays], f: int, m: int) -> tuple[Arrays, list[int]]:
    """The unweighted mean of the m updates with the lowest Krum scores (m = 1: Krum itself).
    Returns (aggregate, indices selected, best first)."""
    if not 1 <= m <= len(updates):
        raise ValueError(f"multi_krum selects 1..{len(updates)} updates, got m = {m}")
    order = np.argsort(krum_scores(updates, f), kind="stable")[:m]
    x = _flat([updates[i] for i in order])
    return _unflat(x.mean(axis=0), updates[0]), [int(i) for i in order]


def bulyan(updates: list[Arrays], f: int) -> tuple[Arrays, list[int]]:
    """Bulyan (El Mhamdi et al., 2018): pick theta = n - 2f updates by Krum one at a time
    (each pick removed from the pool), then per coordinate average the beta = theta - 2f values
    closest to the coordinate's median. Needs n >= 4f + 3. Returns (aggregate, indices picked)."""
    _check(updates, "bulyan")
    n = len(updates)
    if n < 4 * f + 3:
        raise ValueError(f"bulyan with f = {f} Byzantine clients needs at least {4 * f + 3} updates, got {n}")
    pool = list(range(n))
    picked = []
    for _ in range(n - 2 * f):
        scores = krum_scores([updates[i] for i in pool], f) if len(pool) >= 2 * f + 3 else np.zeros(len(pool))
        best = pool[int(np.argmin(scores))]
        picked.append(best)
        pool.remove(best)
    x = _flat([updates[i] for i in picked])  # (theta, P)
    beta = len(picked) - 2 * f
    med = np.median(x, axis=0)
    closest = np.argsort(np.abs(x - med), axis=0, kind="stable")[:beta]  # (beta, P)
    agg = np.take_along_axis(x, closest, axis=0).mean(axis=0)
    return _unflat(agg, updates[0]), picked
