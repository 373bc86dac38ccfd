"""What a FLARE task and its reply carry besides the arrays (FLModel meta), and the checks
on a reply as it arrives: plain numeric arrays, an integer count, JSON metrics."""

from __future__ import annotations

import json

import numpy as np

from fedtune.core.strategy import FitRes, check_metrics
from fedtune.errors import UpdateRejected

# keys of the task and reply meta (all values are strings or numbers)
META_CONFIG = "fedtune_config"  # JSON: the FitIns config
META_INDEX = "fedtune_client_index"  # this site's position among the job's sorted site names
META_ATTEMPT = "fedtune_attempt"  # 0 for a round's first call, then 1, 2... for retries (seeds [faults])
META_EXAMPLES = "fedtune_num_examples"
META_METRICS = "fedtune_metrics"  # JSON: the FitRes metrics
META_SECONDS = "fedtune_seconds"
META_ERROR = "fedtune_error"  # the reason a site could not produce an update
META_CAUSE = "fedtune_cause"  # with META_ERROR: error (default) or disappeared
META_INJECTED = "fedtune_injected"  # the failure was injected on purpose ([faults])


def plain_arrays(params) -> dict[str, np.ndarray]:
    """Named numeric numpy arrays, sorted by name (as core.arrays.unpack gives them)."""
    if not isinstance(params, dict):
        raise TypeError(f"expected named arrays, got {type(params).__name__}")
    out = {}
    for k, v in sorted(params.items(), key=lambda kv: str(kv[0])):
        if not isinstance(k, str) or not isinstance(v, np.ndarray) or v.dtype == object:
            raise TypeError(f"payload entry {k!r} is {type(v).__name__}, not a numeric numpy array")
        out[k] = v
    return out


def reply_to_fitres(cid: str, reply) -> tuple[FitRes, float]:
    """A site's reply as a FitRes (plain arrays, a count, JSON numbers); UpdateRejected otherwise."""
    meta = reply.meta or {}
    try:
        arrays = plain_arrays(reply.params or {})
    except TypeError as e:
        raise UpdateRejected(str(e)) from None
    examples = meta.get(META_EXAMPLES)
    if isinstance(examples, bool) or not isinstance(examples, (int, np.integer)):
        raise UpdateRejected(f"num_examples must be an integer, got {examples!r}")
    try:
        metrics = check_metrics(json.loads(meta.get(META_METRICS, "{}")))
    except (json.JSONDecodeError, TypeError) as e:
        raise UpdateRejected(f"metrics are not JSON: {e}") from None
    seconds = meta.get(META_SECONDS, 0.0)
    return FitRes(cid, arrays, int(examples), metrics), float(seconds) if isinstance(seconds, (int, float)) else 0.0
