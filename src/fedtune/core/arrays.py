"""Named arrays: the only payload that crosses the wire.

A payload is a `dict[str, np.ndarray]`. On the wire it is a safetensors blob: no pickle,
nothing executes on load. Scalars travel as 0-d or 1-element arrays.
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from fedtune.errors import UpdateRejected

Arrays = dict[str, np.ndarray]


def pack(arrays: Arrays, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize named arrays to safetensors bytes."""
    return _st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)


def unpack(blob: bytes) -> Arrays:
    """Deserialize safetensors bytes; raises UpdateRejected on anything that is not one.

    Keys come back sorted: safetensors returns them in an arbitrary order that changes
    from call to call, and a client that walks its arrays in order (drawing noise, say)
    must see the same order on every run."""
    try:
        return dict(sorted(_st_load(blob).items()))
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise UpdateRejected(f"payload is not a valid safetensors blob: {e}") from None


def nbytes(arrays: Arrays) -> int:
    return int(sum(v.nbytes for v in arrays.values()))


def copy(arrays: Arrays) -> Arrays:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def global_norm(arrays: Arrays) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values())))


def check_update(reference: Arrays, update: Arrays, max_norm: float = 0.0) -> None:
    """Raise UpdateRejected unless `update` has exactly the keys, shapes and dtypes of
    `reference`, holds only finite values, and (if max_norm > 0) its distance from the
    reference is at most max_norm."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateRejected(f"keys differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for k, ref in reference.items():
        u = update[k]
        if u.shape != ref.shape:
            raise UpdateRejected(f"'{k}': shape {u.shape}, expected {ref.shape}")
        if u.dtype != ref.dtype:
            raise UpdateRejected(f"'{k}': dtype {u.dtype}, expected {ref.dtype}")
        if not np.all(np.isfinite(u)):
            raise UpdateRejected(f"'{k}': holds NaN or Inf")
    if max_norm > 0:
        dist = global_norm({k: update[k].astype(np.float64) - reference[k] for k in reference})
        if dist > max_norm:
            raise UpdateRejected(f"update norm {dist:.4g} exceeds the bound {max_norm:.4g}")
