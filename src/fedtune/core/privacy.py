"""Client-level differential privacy for the mean rules (DP-FedAvg: McMahan et al., "Learning
Differentially Private Recurrent Language Models", ICLR 2018), with Google's dp-accounting.

Each round the server samples a fixed number m of the N clients (uniformly, without
replacement), clips each client's update (its difference from the global arrays) to L2 norm
C, sums the clipped updates, adds Gaussian noise of standard deviation z*C to every
coordinate, and divides by m (not by the number that replied: a dropped client only lowers
the signal). The result is the mean update a server optimizer (FedAvg, FedAvgM, FedAdam...)
then applies: post-processing, which costs no privacy. Every client weighs the same; example
counts are ignored (they would change the sensitivity).

Accounting: dp-accounting's RDP accountant, the mechanism described as
`SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))` composed once per round,
under the replace-one neighbouring relation that sampling a fixed number of clients needs (N
is public). Replacing one client's clipped update moves the sum by at most 2C, so the
Gaussian's noise multiplier relative to that sensitivity is z*C / 2C = z / 2. A target
epsilon is met by calibrating z with `dp_accounting.calibrate_dp_mechanism` for the planned
rounds. Nothing here is a hand-written bound.

The noise comes from the operating system's entropy, never from the run seed (a seed written
in a config would let anyone who reads it subtract the noise); tests pass their own generator.
"""

from __future__ import annotations

import functools
import math
import secrets
from dataclasses import dataclass

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.robust import clip_to_norm
from fedtune.core.strategy import FitRes, OneExchange
from fedtune.errors import FedtuneError

MIN_Z, MAX_Z = 1e-3, 1e3  # the bracket calibration searches


class BudgetExhausted(FedtuneError):
    """The next round would spend more privacy than privacy.target_epsilon allows."""


def _event(num_clients: int, per_round: int, z: float, rounds: int):
    import dp_accounting

    one = dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients, per_round, dp_accounting.GaussianDpEvent(z / 2.0))
    return dp_accounting.SelfComposedDpEvent(one, rounds)


def _accountant():
    from dp_accounting import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)


@functools.lru_cache(maxsize=1024)  # a pure function of its arguments; a run asks each round twice
def epsilon(num_clients: int, per_round: int, z: float, rounds: int, delta: float) -> float:
    """The (epsilon, delta)-DP epsilon after `rounds` rounds (0 rounds: 0)."""
    if rounds <= 0:
        return 0.0
    acc = _accountant()
    acc.compose(_event(num_clients, per_round, z, rounds))
    return float(acc.get_epsilon(delta))


def calibrate(num_clients: int, per_round: int, rounds: int, target_epsilon: float, delta: float) -> float:
    """The smallest noise multiplier z whose `rounds` rounds stay within target_epsilon."""
    import dp_accounting

    try:
        z = dp_accounting.calibrate_dp_mechanism(
            _accountant, lambda z: _event(num_clients, per_round, z, rounds), target_epsilon, delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(MIN_Z, MAX_Z))
    except Exception as e:  # the library says why (e.g. no z in the bracket reaches the target)
        raise FedtuneError(f"privacy.target_epsilon = {target_epsilon}: no noise multiplier in [{MIN_Z}, {MAX_Z}] "
                           f"reaches it for {rounds} rounds of {per_round} of {num_clients} clients "
                           f"(delta {delta}): {e}") from None
    return float(z)


@dataclass
class DPSettings:
    clip: float  # C: each client's update is clipped to this L2 norm
    noise_multiplier: float  # z: noise std = z * C (0: calibrate from target_epsilon)
    delta: float
    target_epsilon: float = 0.0  # 0: no budget, just report epsilon
    rounds: int = 0  # the planned rounds (for calibration)


class DPAccounting:
    """The run's privacy ledger: z (given or calibrated), and epsilon after each round."""

    def __init__(self, s: DPSettings, num_clients: int, per_round: int, check_plan: bool = True):
        if per_round > num_clients:
            raise FedtuneError(f"DP sampling: {per_round} clients per round but only {num_clients} clients")
        self.s, self.n, self.m = s, num_clients, per_round
        if s.noise_multiplier > 0:
            self.z = s.noise_multiplier
        else:
            self.z = calibrate(num_clients, per_round, s.rounds, s.target_epsilon, s.delta)
        if check_plan and s.target_epsilon and self.epsilon_after(s.rounds) > s.target_epsilon * (1 + 1e-9):
            raise BudgetExhausted(
                f"privacy.noise_multiplier = {self.z:g} spends epsilon = {self.epsilon_after(s.rounds):.4g} over "
                f"{s.rounds} rounds, more than privacy.target_epsilon = {s.target_epsilon:g}: raise the noise "
                "multiplier (or set it to 0 to calibrate it), or run fewer rounds")

    def epsilon_after(self, rounds: int) -> float:
        return epsilon(self.n, self.m, self.z, rounds, self.s.delta)

    def check_budget(self, rnd: int) -> None:
        """Refuse to start round `rnd` if it would exceed the target (the run stops resumably)."""
        if self.s.target_epsilon and self.epsilon_after(rnd) > self.s.target_epsilon * (1 + 1e-9):
            raise BudgetExhausted(
                f"round {rnd} would spend epsilon = {self.epsilon_after(rnd):.4g} > privacy.target_epsilon = "
                f"{self.s.target_epsilon:g} (delta {self.s.delta:g}); the run stops after round {rnd - 1}, which is "
                "in the checkpoint")

    def record(self, rnd: int) -> dict:
        return {"epsilon": self.epsilon_after(rnd), "delta": self.s.delta, "noise_multiplier": self.z,
                "clip": self.s.clip, "clients_per_round": self.m, "clients": self.n}


class DPMeanFold(OneExchange):
    """One round of DP-FedAvg's server step: clip each update, sum, add noise, divide by m, then
    the strategy's server optimizer on that noisy mean."""

    def __init__(self, strategy, global_arrays: Arrays, accounting: DPAccounting, rnd: int,
                 rng: np.random.Generator | None = None):
        self.strategy, self.g, self.acc, self.rnd = strategy, global_arrays, accounting, rnd
        self.rng = rng or np.random.Generator(np.random.PCG64(secrets.randbits(128)))
        self.sum = {k: np.zeros(v.shape, np.float64) for k, v in global_arrays.items()}
        self.clipped, self.count = [], 0

    def add(self, res: FitRes) -> None:
        clipped, norm = clip_to_norm(self.g, res.arrays, self.acc.s.clip)
        if norm > self.acc.s.clip:
            self.clipped.append(res.client_id)
        for k, acc in self.sum.items():
            acc += clipped[k].astype(np.float64) - self.g[k].astype(np.float64)
        self.count += 1

    def result(self) -> tuple[Arrays, dict]:
        std = self.acc.z * self.acc.s.clip
        mean = {k: (self.g[k].astype(np.float64) + (acc + self.rng.normal(0.0, std, acc.shape)) / self.acc.m)
                .astype(self.g[k].dtype) for k, acc in self.sum.items()}
        out = self.strategy.server_step(self.g, mean)
        return out, {"dp": self.acc.record(self.rnd), "clipped": self.clipped, "dp_updates": self.count}


def noise_std_of_mean(z: float, clip: float, per_round: int) -> float:
    """The standard deviation the noise adds to each coordinate of the mean update."""
    return z * clip / per_round if per_round else math.inf
