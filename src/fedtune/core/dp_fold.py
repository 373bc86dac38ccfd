"""The server's side of client-level DP in one round (the ledger is `fedtune.core.privacy`).

Central DP (`DPMeanFold`): the server clips each selected client's update to C, sums the
clipped updates, adds Gaussian noise of std z*C to every coordinate (drawn from the operating
system's entropy, never from the run seed, which anyone reading the config knows), and
divides by m, the clients per round, not by the number that replied (a dropped client only
lowers the signal, never the noise). The noisy mean then goes through the strategy's server
step (FedAvg, FedOpt, FedBPT's step): post-processing, which costs no privacy.

Distributed DP (`DistributedDPFinish`): each client clipped its own update and added its
share of the noise (`fedtune.core.dp_client`); secure aggregation gives the server only the
sum, which it divides by the number of shares in it (every client weighs 1) and books.

Only the arrays named by `keys` are updates (FedIT: the trained LoRA factors; FedBPT: the
prompt mean); the others stay as the server sent them.
"""

from __future__ import annotations

import secrets

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.privacy import DPAccounting
from fedtune.core.secagg import SecAggFailed
from fedtune.core.strategy import FitRes, OneExchange

WITHIN_CLIP = "dp/within_clip"  # distributed DP with adaptive clipping: each client's noisy 0/1 in the masked sum


def os_rng() -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def clipped_delta(global_arrays: Arrays, arrays: Arrays, keys: list[str], clip: float) -> tuple[dict, float]:
    """(the update on `keys` as float64, scaled to L2 norm <= clip; its norm before clipping)."""
    delta = {k: arrays[k].astype(np.float64) - global_arrays[k].astype(np.float64) for k in keys}
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values())))
    if norm > clip:
        scale = clip / norm
        delta = {k: d * scale for k, d in delta.items()}
    return delta, norm


def update_keys(global_arrays: Arrays, trainable=None) -> list[str]:
    return [k for k in global_arrays if trainable is None or trainable(k)]


class DPMeanFold(OneExchange):
    """One round of central DP's server step: clip each update, sum, add noise, divide by m,
    then the strategy's server step on that noisy mean."""

    def __init__(self, strategy, global_arrays: Arrays, accounting: DPAccounting, rnd: int,
                 rng: np.random.Generator | None = None, keys: list[str] | None = None):
        self.strategy, self.g, self.acc, self.rnd = strategy, global_arrays, accounting, rnd
        self.rng = rng or os_rng()
        self.keys = list(keys) if keys is not None else list(global_arrays)
        self.sum = {k: np.zeros(global_arrays[k].shape, np.float64) for k in self.keys}
        self.clipped, self.count, self.within = [], 0, 0

    def add(self, res: FitRes) -> None:
        delta, norm = clipped_delta(self.g, res.arrays, self.keys, self.acc.clip)
        if norm > self.acc.clip:
            self.clipped.append(res.client_id)
        else:
            self.within += 1
        for k, acc in self.sum.items():
            acc += delta[k]
        self.count += 1

    def result(self) -> tuple[Arrays, dict]:
        std, m = self.acc.update_std(), self.acc.m
        mean = dict(self.g)
        for k, acc in self.sum.items():
            g64 = self.g[k].astype(np.float64)
            mean[k] = (g64 + (acc + self.rng.normal(0.0, std, acc.shape)) / m).astype(self.g[k].dtype)
        within = None
        if self.acc.s.adaptive_clip:
            within = self.within + float(self.rng.normal(0.0, self.acc.count_std))
        dp = self.acc.close_round(self.rnd, within_clip=within)
        out = self.strategy.server_step(self.g, mean)
        return out, {"dp": dp, "clipped": self.clipped, "dp_updates": self.count}


class DistributedDPFinish:
    """Distributed DP after secure aggregation: the unmasked sums of the clients' noisy,
    clipped arrays (each client weighs 1), to the next global arrays and the round's record."""

    def __init__(self, strategy, global_arrays: Arrays, accounting: DPAccounting, rnd: int, keys: list[str]):
        self.strategy, self.g, self.acc, self.rnd, self.keys = strategy, global_arrays, accounting, rnd, keys

    def layout(self) -> Arrays:
        """What each client's masked vector holds, in this order (sorted by name)."""
        out = {k: self.g[k] for k in self.keys}
        if self.acc.s.adaptive_clip:
            out[WITHIN_CLIP] = np.zeros(1, np.float32)
        return out

    def __call__(self, sums: dict[str, np.ndarray], weight: float, survivors: int) -> tuple[Arrays, dict]:
        if abs(weight - survivors) > 1e-3:  # the sum of weights is public: each client must weigh exactly 1
            raise SecAggFailed(f"round {self.rnd}: distributed DP: the weights sum to {weight:g}, not {survivors} (each "
                               "client weighs 1): a client changed its weight; the round is not applied")
        mean = dict(self.g)
        for k in self.keys:
            mean[k] = (sums[k] / survivors).astype(self.g[k].dtype)
        within = float(sums[WITHIN_CLIP][0]) if self.acc.s.adaptive_clip else None
        dp = self.acc.close_round(self.rnd, shares_added=survivors, within_clip=within)
        return self.strategy.server_step(self.g, mean), {"dp": dp}
