"""SCAFFOLD (Karimireddy et al., ICML 2020) on LoRA adapters: control variates that correct
client drift.

The server keeps c and sends it with the global adapter, under the keys `scaffold.c/<name>`;
each client keeps its own c_i between the rounds it takes part in (a ClientStateStore: on
disk, one file per client), moves its parameters by -lr (c - c_i) after every local optimizer
step (the correction term of y <- y - lr (g + c - c_i), kept out of AdamW's rescaling; see
fedit.train.train_local), and after its K local steps
sets c_i+ = c_i - c + (x - y_i) / (K lr) (option II; K lr = the sum of its step sizes) and
replies with y_i and delta c_i = c_i+ - c_i under the same keys. The server then sets
x+ = x + server_lr * (mean of y_i - x) (example-weighted, as fedtune's FedAvg) and
c+ = c + (1/N) sum of delta c_i over the clients that replied, N being all clients.
"""

from __future__ import annotations

import numpy as np

from fedtune.core.aggregate import RunningMean
from fedtune.core.arrays import Arrays
from fedtune.core.strategy import FitRes, OneExchange

VARIATE_PREFIX = "scaffold.c/"


def split_variates(arrays: Arrays) -> tuple[Arrays, Arrays | None]:
    """(the adapter, the control variates or None) of a message's arrays."""
    c = {k[len(VARIATE_PREFIX):]: v for k, v in arrays.items() if k.startswith(VARIATE_PREFIX)}
    return {k: v for k, v in arrays.items() if not k.startswith(VARIATE_PREFIX)}, (c or None)


def with_variates(adapter: Arrays, c: Arrays) -> Arrays:
    return {**adapter, **{VARIATE_PREFIX + k: v for k, v in c.items()}}


class ScaffoldFold(OneExchange):
    """One round of SCAFFOLD's server step, fed one reply at a time (two running sums)."""

    def __init__(self, global_arrays: Arrays, c: Arrays, num_clients: int, server_lr: float):
        self.global_arrays, self.c, self.n, self.lr = global_arrays, c, num_clients, server_lr
        self.mean = RunningMean()
        self.dc: dict[str, np.ndarray] = {k: np.zeros(v.shape, np.float64) for k, v in c.items()}
        self.count = 0

    def add(self, res: FitRes) -> None:
        y, dc = split_variates(res.arrays)
        self.mean.add(y, res.num_examples)
        for k, acc in self.dc.items():
            acc += dc[k].astype(np.float64)
        self.count += 1

    def result(self) -> tuple[Arrays, dict]:
        mean = self.mean.result()
        x = {k: (g.astype(np.float64) + self.lr * (mean[k].astype(np.float64) - g)).astype(g.dtype)
             for k, g in self.global_arrays.items()}
        self.c_next = {k: (self.c[k].astype(np.float64) + self.dc[k] / self.n).astype(self.c[k].dtype) for k in self.c}
        norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in self.c_next.values())))
        return x, {"control_variate_norm": norm}
