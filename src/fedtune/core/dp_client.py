"""Distributed DP on the client (goes inside `fedtune.core.secagg_client.SecAggClient`): the
client clips its own update to the round's clip and adds its share of the Gaussian noise
(std z*C / sqrt(shares), drawn from the operating system's entropy), so that the sum secure
aggregation reveals carries the calibrated total and no single update is ever seen.

The server sends the round's clip and noise in the round config; a client refuses a round
whose noise multiplier is below its own `privacy.noise_multiplier` (when the client's config
sets one), so a server cannot quietly turn the noise down."""

from __future__ import annotations

import numpy as np

from fedtune.core.dp_fold import WITHIN_CLIP, clipped_delta, os_rng
from fedtune.core.strategy import FitIns, FitRes
from fedtune.errors import UpdateRejected

ROUND_KEYS = ("dp_clip", "dp_share_std", "dp_shares", "dp_count_share_std")


def round_config(accounting) -> dict:
    """What the server tells each client about this round's noise."""
    return {"dp_clip": accounting.clip, "dp_share_std": accounting.share_std(), "dp_shares": accounting.shares,
            "dp_count_share_std": accounting.count_std / float(np.sqrt(accounting.shares))
            if accounting.s.adaptive_clip else 0.0}


class DistributedDPClient:
    def __init__(self, inner, min_noise_multiplier: float = 0.0, trainable=None, rng=None):
        self.inner = inner
        self.min_z = min_noise_multiplier
        self.trainable = trainable  # which arrays are updates (None: all)
        self.rng = rng  # tests only; else the OS's entropy for every round

    def fit(self, cid: str, ins: FitIns) -> FitRes:
        c = ins.config
        if any(k not in c for k in ROUND_KEYS):
            raise UpdateRejected(f"distributed DP: the round config lacks {[k for k in ROUND_KEYS if k not in c]}")
        clip, std, shares, count_std = (float(c["dp_clip"]), float(c["dp_share_std"]), int(c["dp_shares"]),
                                        float(c["dp_count_share_std"]))
        if not (clip > 0 and std >= 0 and shares >= 1):
            raise UpdateRejected(f"distributed DP: clip {clip}, share std {std}, shares {shares}")
        z = std * np.sqrt(shares) / clip
        if self.min_z and z < self.min_z * (1 - 1e-9):
            raise UpdateRejected(f"distributed DP: the server asks for noise multiplier {z:.4g}, below this client's "
                                 f"privacy.noise_multiplier = {self.min_z:g}")
        res = self.inner.fit(cid, ins)
        keys = [k for k in ins.arrays if self.trainable is None or self.trainable(k)]
        delta, norm = clipped_delta(ins.arrays, res.arrays, keys, clip)
        rng = self.rng or os_rng()
        out = {}  # only the updates (what the server's layout expects); frozen arrays stay the server's
        for k in keys:
            g = ins.arrays[k]
            out[k] = (g.astype(np.float64) + delta[k] + rng.normal(0.0, std, g.shape)).astype(g.dtype)
        if count_std > 0:  # whether this update was within the clip, only ever seen summed and noised
            out[WITHIN_CLIP] = np.array([float(norm <= clip) + rng.normal(0.0, count_std)], np.float32)
        return FitRes(cid, out, res.num_examples, res.metrics)
