"""Robust aggregation under attack: the final global metric per aggregation rule, with no
attackers and with 20% malicious clients, through the real `Simulator` and `FedAvgStrategy`.

The federation fits a linear model y = X w* + b* + noise. Each of 10 clients holds its own
samples (sizes and feature means differ per client: mildly non-IID), starts each round
from the global (w, b), runs full-batch gradient descent on its squared error, and
returns its parameters. The global metric is the mean squared error of the global model
on a held-out set drawn from all clients' distributions; the noise floor is
`NOISE**2 = 0.01`.

Attacks (2 of 10 clients, chosen by the seed): `scaled` returns g - 10 (w - g) (its
honest update reversed and scaled by 10); `sign_flip` returns g - (w - g).

    .venv/bin/python benchmarks/robust_aggregation.py            # the table in docs/reliability.md

`tests/test_reliability.py` imports this module and checks the same runs (fewer rounds).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from fedtune.core.strategy import FitIns, FitRes
from fedtune.engines.simulator import Simulator, SimulatorSettings
from fedtune.fedit.strategy import FedAvgStrategy

DIM = 16
CLIENTS = 10
NOISE = 0.1
LOCAL_STEPS = 5
LOCAL_LR = 0.05
ATTACKS = ("none", "scaled", "sign_flip")
# (label, FedAvgStrategy keyword arguments)
RULES = {
    "fedavg": {"aggregation": "fedavg"},
    "median": {"aggregation": "median"},
    "trimmed_mean (0.2)": {"aggregation": "trimmed_mean", "trim_fraction": 0.2},
    "fedavg + clip_norm 0.5": {"aggregation": "fedavg", "clip_norm": 0.5},
    "median + clip_norm 0.5": {"aggregation": "median", "clip_norm": 0.5},
}


class Problem:
    """Client data, a held-out set, and the true parameters, all from one seed."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng([seed, 1])
        self.w_true = rng.standard_normal(DIM)
        self.b_true = float(rng.standard_normal())
        self.data = {}
        shifts = []
        for i in range(CLIENTS):
            n = int(rng.integers(40, 160))
            shift = rng.normal(0, 0.5, DIM)  # each client's features are centred elsewhere
            shifts.append(shift)
            self.data[f"c{i:02d}"] = self._draw(rng, n, shift)
        self.test = self._draw(rng, 2000, np.mean(shifts, axis=0), spread=np.std(shifts, axis=0))

    def _draw(self, rng, n, shift, spread=None):
        x = rng.standard_normal((n, DIM)) + shift
        if spread is not None:
            x += rng.standard_normal((n, DIM)) * spread
        y = x @ self.w_true + self.b_true + rng.normal(0, NOISE, n)
        return x, y

    def initial(self) -> dict[str, np.ndarray]:
        return {"w": np.zeros(DIM, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}

    def mse(self, arrays) -> float:
        x, y = self.test
        pred = x @ arrays["w"].astype(np.float64) + float(arrays["b"][0])
        return float(np.mean((pred - y) ** 2))


class LinearClients:
    """A ClientApp: local gradient descent on each client's squared error. Malicious
    clients run the same training, then report a manipulated result."""

    def __init__(self, problem: Problem, attackers: set[str] = frozenset(), attack: str = "none"):
        self.problem, self.attackers, self.attack = problem, set(attackers), attack

    def fit(self, cid: str, ins: FitIns) -> FitRes:
        x, y = self.problem.data[cid]
        w = ins.arrays["w"].astype(np.float64)
        b = float(ins.arrays["b"][0])
        for _ in range(LOCAL_STEPS):
            err = x @ w + b - y
            w = w - LOCAL_LR * 2 * x.T @ err / len(y)
            b = b - LOCAL_LR * 2 * float(err.mean())
        out = {"w": w.astype(np.float32), "b": np.array([b], dtype=np.float32)}
        loss = float(np.mean((x @ w + b - y) ** 2))
        if cid in self.attackers and self.attack != "none":
            factor = {"scaled": -10.0, "sign_flip": -1.0}[self.attack]
            out = {k: (ins.arrays[k] + factor * (v - ins.arrays[k])).astype(np.float32) for k, v in out.items()}
        return FitRes(cid, out, len(y), {"train_loss": loss})


def pick_attackers(seed: int, fraction: float = 0.2) -> set[str]:
    ids = [f"c{i:02d}" for i in range(CLIENTS)]
    k = int(round(fraction * CLIENTS))
    return {ids[i] for i in np.random.default_rng([seed, 2]).choice(CLIENTS, k, replace=False)}


def run_rule(rule: str, attack: str, rounds: int = 40, seed: int = 0) -> dict:
    """One federated run; returns the final held-out MSE and its trace."""
    problem = Problem(seed)
    attackers = pick_attackers(seed) if attack != "none" else set()
    strategy = FedAvgStrategy(problem.initial(), seed=seed, **RULES[rule])
    sim = Simulator(strategy, LinearClients(problem, attackers, attack), sorted(problem.data),
                    SimulatorSettings(rounds=rounds, progress=False),
                    evaluate=lambda rnd, arrays: {"mse": problem.mse(arrays)})
    state = sim.run()
    trace = [rec["eval"]["mse"] for rec in state.history]
    final = trace[-1]
    return {"rule": rule, "attack": attack, "final_mse": final if math.isfinite(final) else float("inf"),
            "trace": trace, "attackers": sorted(attackers)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--early", type=int, default=10, help="also report the metric after this many rounds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    runs = {(r, a): run_rule(r, a, args.rounds, args.seed) for r in RULES for a in ATTACKS}
    print(f"Held-out MSE of the global model; {CLIENTS} clients, 2 of them malicious in the attack columns "
          f"(seed {args.seed}, attackers {runs[('fedavg', 'scaled')]['attackers']}); noise floor {NOISE ** 2:g}.\n")
    for at in sorted({min(args.early, args.rounds), args.rounds}):
        print(f"After {at} rounds:\n")
        print("| aggregation | no attack | 20% scaled x(-10) | 20% sign-flipped |")
        print("|---|---:|---:|---:|")
        for r in RULES:
            cells = [runs[(r, a)]["trace"][at - 1] for a in ATTACKS]
            print(f"| {r} | " + " | ".join(f"{c:.4g}" for c in cells) + " |")
        print()
    print(f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
