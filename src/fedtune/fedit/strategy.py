"""FedIT server step: FedAvg of LoRA adapters weighted by example counts, optionally
followed by a server optimizer (FedAvgM, FedAdam) on the averaged update (FedOpt)."""

from __future__ import annotations

import numpy as np

from fedtune.core.aggregate import weighted_mean
from fedtune.core.arrays import Arrays, copy
from fedtune.core.strategy import FitIns, FitRes, SelectingStrategy


class FedAvgStrategy(SelectingStrategy):
    def __init__(self, initial: Arrays, *, seed: int, fraction: float = 1.0, clients_per_round: int = 0,
                 aggregation: str = "fedavg", server_lr: float = 1.0, momentum: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3, max_update_norm: float = 0.0,
                 train_config: dict | None = None):
        super().__init__(seed, fraction, clients_per_round, max_update_norm)
        if aggregation not in ("fedavg", "fedavgm", "fedadam"):
            raise ValueError(f"unknown aggregation {aggregation!r}")
        self._initial = copy(initial)
        self.aggregation = aggregation
        self.server_lr, self.momentum, self.beta2, self.tau = server_lr, momentum, beta2, tau
        self.train_config = dict(train_config or {})
        self.m: Arrays = {}  # first moment / momentum buffer (fedavgm, fedadam)
        self.v: Arrays = {}  # second moment (fedadam)
        self.steps = 0

    def initial_arrays(self) -> Arrays:
        return copy(self._initial)

    def configure_fit(self, rnd: int, global_arrays: Arrays, client_ids: list[str]) -> dict[str, FitIns]:
        return {cid: FitIns(global_arrays, {"round": rnd, **self.train_config}) for cid in self.select(rnd, client_ids)}

    def aggregate_fit(self, rnd: int, global_arrays: Arrays, results: list[FitRes]) -> tuple[Arrays, dict]:
        avg = weighted_mean([(r.arrays, r.num_examples) for r in results])
        if self.aggregation == "fedavg":
            return avg, {}
        self.steps += 1
        out = {}
        for k, g in global_arrays.items():
            delta = avg[k].astype(np.float64) - g
            if self.aggregation == "fedavgm":
                m = self.momentum * self.m.get(k, 0.0) + delta
                self.m[k] = m
                step = m
            else:  # fedadam (Reddi et al., 2021), no bias correction, as in the paper
                m = self.momentum * self.m.get(k, 0.0) + (1 - self.momentum) * delta
                v = self.beta2 * self.v.get(k, 0.0) + (1 - self.beta2) * delta**2
                self.m[k], self.v[k] = m, v
                step = m / (np.sqrt(v) + self.tau)
            out[k] = (g + self.server_lr * step).astype(g.dtype)
        return out, {}

    def state(self) -> tuple[Arrays, dict]:
        arrays = {f"m/{k}": np.asarray(v) for k, v in self.m.items()}
        arrays.update({f"v/{k}": np.asarray(v) for k, v in self.v.items()})
        return arrays, {"steps": self.steps}

    def load_state(self, arrays: Arrays, meta: dict) -> None:
        self.m = {k[2:]: v for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: v for k, v in arrays.items() if k.startswith("v/")}
        self.steps = int(meta.get("steps", 0))
