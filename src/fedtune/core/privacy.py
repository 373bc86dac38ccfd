"""Client-level differential privacy: the accountant and the run's privacy ledger
(DP-FedAvg: McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR
2018; adaptive clipping: Andrew et al., "Differentially Private Learning with Adaptive
Clipping", NeurIPS 2021), with Google's dp-accounting. What the server and the clients do
with the updates is in `fedtune.core.dp_fold` (server) and `fedtune.core.dp_client` (client).

Each round the server samples a fixed number m of the N clients (uniformly, without
replacement); each selected client's update (its difference from the global arrays) is
clipped to L2 norm C; Gaussian noise of standard deviation z*C is added to the sum, by the
server (central DP) or as m shares of std z*C/sqrt(m), one added by each client before
secure aggregation (distributed DP). Every client weighs the same.

Accounting: dp-accounting's RDP accountant, each round described as
`SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z_r / 2))`, under the replace-one
neighbouring relation that sampling a fixed number of clients needs (N is public). Replacing
one client's clipped update moves the sum by at most 2C, so the Gaussian's noise multiplier
relative to that sensitivity is z*C / 2C = z / 2. z_r is the round's effective noise
multiplier: z, or, in distributed DP when fewer clients than planned added their share,
z * sqrt(shares / planned) (the ledger keeps every round's z_r, and a checkpoint carries
them). A target epsilon is met by calibrating z with `dp_accounting.calibrate_dp_mechanism`
for the planned rounds. Nothing here is a hand-written bound.

Adaptive clipping releases one more noisy value per round, the count of clients whose update
was within the clip (noise std sigma_b). The update's noise multiplier is then
z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that the two releases together are exactly a
Gaussian mechanism of multiplier z (Andrew et al., Theorem 1; a test checks it with
dp-accounting), and the accountant composes z as before. The clip follows the geometric rule
C <- C * exp(-eta * (noisy fraction within the clip - gamma)).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

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


def _runs(zs: tuple[float, ...]) -> list[tuple[float, int]]:
    """Consecutive equal noise multipliers as (z, count)."""
    out: list[tuple[float, int]] = []
    for z in zs:
        if out and out[-1][0] == z:
            out[-1] = (z, out[-1][1] + 1)
        else:
            out.append((z, 1))
    return out


@functools.lru_cache(maxsize=1024)  # a pure function of its arguments; a run asks each round twice
def epsilon_of(num_clients: int, per_round: int, zs: tuple[float, ...], delta: float) -> float:
    """The (epsilon, delta)-DP epsilon after one round per entry of zs (each round's noise
    multiplier); no rounds: 0."""
    if not zs:
        return 0.0
    acc = _accountant()
    for z, count in _runs(zs):
        acc.compose(_event(num_clients, per_round, z, count))
    return float(acc.get_epsilon(delta))


def epsilon(num_clients: int, per_round: int, z: float, rounds: int, delta: float) -> float:
    """The epsilon after `rounds` rounds at noise multiplier z (0 rounds: 0)."""
    return epsilon_of(num_clients, per_round, (float(z),) * max(0, rounds), delta)


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


def update_noise_multiplier(z: float, count_std: float) -> float:
    """Adaptive clipping: the update's noise multiplier that, with the clip count noised at
    std count_std, makes one round a Gaussian mechanism of multiplier z (Andrew et al.)."""
    if count_std <= z / 2:
        raise FedtuneError(f"privacy.adaptive_clip: the clip count's noise std {count_std:g} must exceed half the noise "
                           f"multiplier ({z:g} / 2), or nothing is left for the update; raise privacy.count_noise")
    return (z ** -2 - (2.0 * count_std) ** -2) ** -0.5


@dataclass(frozen=True)
class DPSettings:
    clip: float  # C: each client's update is clipped to this L2 norm (adaptive: the initial C)
    noise_multiplier: float  # z: noise std = z * C (0: calibrate from target_epsilon)
    delta: float
    target_epsilon: float = 0.0  # 0: no budget, just report epsilon
    rounds: int = 0  # the planned rounds (for calibration)
    mode: str = "central"  # central: the server noises the sum; distributed: each client adds a share
    noise_shares: int = 0  # distributed: the noise is split into this many shares (0 = clients per round)
    adaptive_clip: bool = False
    target_quantile: float = 0.5  # adaptive: gamma, the fraction of updates meant to lie within the clip
    clip_lr: float = 0.2  # adaptive: eta of the geometric update
    count_noise: float = 0.0  # adaptive: std of the noise on the clip count (0 = max(m / 20, z))

    @classmethod
    def from_config(cls, pv, rounds: int) -> "DPSettings | None":
        """From a config's [privacy] section (None when privacy.mode = 'off')."""
        if pv.mode == "off":
            return None
        return cls(pv.clip, pv.noise_multiplier, pv.delta, pv.target_epsilon, rounds, mode=pv.mode,
                   noise_shares=pv.noise_shares, adaptive_clip=pv.adaptive_clip, target_quantile=pv.target_quantile,
                   clip_lr=pv.clip_lr, count_noise=pv.count_noise)


class DPAccounting:
    """The run's privacy ledger: z (given or calibrated), every completed round's effective
    noise multiplier, the current clip, and epsilon after each round."""

    def __init__(self, s: DPSettings, num_clients: int, per_round: int, check_plan: bool = True):
        if per_round > num_clients:
            raise FedtuneError(f"DP sampling: {per_round} clients per round but only {num_clients} clients")
        self.s, self.n, self.m = s, num_clients, per_round
        if s.noise_multiplier > 0:
            self.z = s.noise_multiplier
        else:
            self.z = calibrate(num_clients, per_round, s.rounds, s.target_epsilon, s.delta)
        self.round_z: list[float] = []  # completed rounds' effective noise multipliers
        self.clip = s.clip
        self.shares = s.noise_shares or per_round
        self.count_std = (s.count_noise or max(per_round / 20.0, self.z)) if s.adaptive_clip else 0.0
        self.z_update = update_noise_multiplier(self.z, self.count_std) if s.adaptive_clip else self.z
        if check_plan and s.target_epsilon and self.epsilon_after(s.rounds) > s.target_epsilon * (1 + 1e-9):
            raise BudgetExhausted(
                f"privacy.noise_multiplier = {self.z:g} spends epsilon = {self.epsilon_after(s.rounds):.4g} over "
                f"{s.rounds} rounds, more than privacy.target_epsilon = {s.target_epsilon:g}: raise the noise "
                "multiplier (or set it to 0 to calibrate it), or run fewer rounds")

    def _plan(self, rounds: int) -> tuple[float, ...]:
        """Each of the first `rounds` rounds' noise multiplier: the completed ones as they were, the rest z."""
        zs = tuple(self.round_z[:rounds])
        return zs + (self.z,) * max(0, rounds - len(zs))

    def epsilon_after(self, rounds: int) -> float:
        return epsilon_of(self.n, self.m, self._plan(rounds), self.s.delta)

    def spent(self) -> float:
        return epsilon_of(self.n, self.m, tuple(self.round_z), self.s.delta)

    def check_budget(self, rnd: int) -> None:
        """Refuse to start round `rnd` if it would exceed the target (the run stops resumably)."""
        eps = epsilon_of(self.n, self.m, self._plan(rnd - 1) + (self.z,), self.s.delta)
        if self.s.target_epsilon and eps > self.s.target_epsilon * (1 + 1e-9):
            raise BudgetExhausted(
                f"round {rnd} would spend epsilon = {eps:.4g} > privacy.target_epsilon = "
                f"{self.s.target_epsilon:g} (delta {self.s.delta:g}); the run stops after round {rnd - 1}, which is "
                "in the checkpoint")

    # ------------------------------------------------------------------ one round's noise

    def update_std(self) -> float:
        """Std of the noise on the sum of the clipped updates (all shares together)."""
        return self.z_update * self.clip

    def share_std(self) -> float:
        """Distributed DP: the std of one client's share of the update noise."""
        return self.update_std() / math.sqrt(self.shares)

    def close_round(self, rnd: int, shares_added: int | None = None, within_clip: float | None = None) -> dict:
        """Book round rnd (shares_added: distributed DP's count of noise shares in the sum;
        within_clip: adaptive clipping's noisy count of updates within the clip, which moves
        the clip for the next round). Returns the round's record."""
        del self.round_z[rnd - 1:]
        z_r = self.z if shares_added is None else self.z * math.sqrt(shares_added / self.shares)
        self.round_z.append(z_r)
        rec = {"epsilon": self.spent(), "delta": self.s.delta, "noise_multiplier": self.z, "clip": self.clip,
               "clients_per_round": self.m, "clients": self.n, "mode": self.s.mode}
        if shares_added is not None:
            rec.update(noise_shares=shares_added, planned_shares=self.shares, round_noise_multiplier=z_r)
        if within_clip is not None:
            fraction = within_clip / self.m
            rec.update(within_clip=round(fraction, 4), update_noise_multiplier=self.z_update,
                       count_noise=self.count_std)
            self.clip *= math.exp(-self.s.clip_lr * (fraction - self.s.target_quantile))
            rec["next_clip"] = self.clip
        return rec

    # ------------------------------------------------------------------ checkpoints

    def to_meta(self) -> dict:
        return {"noise_multiplier": self.z, "round_z": list(self.round_z), "clip": self.clip}


class DPLedger:
    """What a strategy with client-level DP carries: the settings, the ledger once the clients
    are known, and the ledger's state from a checkpoint until then."""

    def __init__(self, settings: DPSettings | None):
        self.settings = settings
        self.accounting: DPAccounting | None = None
        self.resumed: dict | None = None
        self.rng = None  # tests only: a seeded generator for the noise (else the OS's entropy)

    def __bool__(self) -> bool:
        return self.settings is not None

    def start_round(self, rnd: int, num_clients: int, per_round: int) -> DPAccounting:
        """The ledger for round rnd (created on the first round; no round past the budget)."""
        if self.accounting is None:
            s = self.settings
            if self.resumed:  # a resumed run keeps its noise multiplier: never recalibrated mid-run
                s = replace(s, noise_multiplier=float(self.resumed["noise_multiplier"]))
            self.accounting = DPAccounting(s, num_clients, per_round, check_plan=self.resumed is None)
            if self.resumed:
                self.accounting.round_z = [float(z) for z in self.resumed.get("round_z", [])]
                self.accounting.clip = float(self.resumed.get("clip", s.clip))
        self.accounting.check_budget(rnd)
        return self.accounting

    def state(self) -> dict:
        if self.accounting is not None:
            return {"dp": self.accounting.to_meta()}
        return {"dp": self.resumed} if self.resumed else {}

    def load_state(self, meta: dict) -> None:
        if self.settings is None:
            return
        dp = meta.get("dp")
        if dp is None and meta.get("dp_noise_multiplier"):  # a checkpoint from before the ledger kept rounds
            dp = {"noise_multiplier": meta["dp_noise_multiplier"]}
        self.resumed, self.accounting = dp, None


def privacy_summary(history: list[dict]) -> dict | None:
    """The run's privacy statement for summary.json: the last round's DP record."""
    dp = history[-1].get("aggregate", {}).get("dp") if history else None
    return dict(dp) if dp else None


def epsilon_text(record: dict) -> str:
    """The console's note of a round's spent epsilon ('' without DP)."""
    dp = record.get("aggregate", {}).get("dp")
    return f" · ε {dp['epsilon']:.3g} (δ {dp['delta']:g})" if dp else ""
