"""Server optimizers on the averaged client update (FedOpt: Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2). Pure numpy over named arrays.

With Δ_t = mean of the client models - x_t (the pseudo-gradient, pointing where the clients
went) and m_{-1} = 0, v_{-1} = τ²:

    m_t = β1 m_{t-1} + (1 - β1) Δ_t                          (FedAdagrad, FedAdam, FedYogi)
    FedAdagrad: v_t = v_{t-1} + Δ_t²
    FedAdam:    v_t = β2 v_{t-1} + (1 - β2) Δ_t²
    FedYogi:    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)
    x_{t+1} = x_t + η m_t / (sqrt(v_t) + τ)

FedAvgM (Hsu et al., 2019): m_t = β1 m_{t-1} + Δ_t, x_{t+1} = x_t + η m_t. FedAvg: x_{t+1} =
the mean (η = 1 and no state: the same as FedAvgM with β1 = 0, η = 1). The update rule is the
only difference between them; no bias correction, as in the paper.
"""

from __future__ import annotations

import numpy as np

from fedtune.core.arrays import Arrays

RULES = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")


def second_moment(rule: str, v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    d2 = delta * delta
    if rule == "fedadagrad":
        return v + d2
    if rule == "fedadam":
        return beta2 * v + (1 - beta2) * d2
    if rule == "fedyogi":
        return v - (1 - beta2) * d2 * np.sign(v - d2)
    raise ValueError(f"no second moment for {rule!r}")


def step(rule: str, x: Arrays, mean: Arrays, m: Arrays, v: Arrays, *, lr: float, beta1: float, beta2: float,
         tau: float) -> tuple[Arrays, Arrays, Arrays]:
    """(next global arrays, m, v) from the global x and the clients' mean; in float64, cast back
    to each array's dtype. m and v are new dicts (the inputs are not modified)."""
    if rule not in RULES:
        raise ValueError(f"unknown server optimizer {rule!r} (one of {', '.join(RULES)})")
    if rule == "fedavg":
        return {k: np.array(mean[k], copy=True) for k in x}, {}, {}
    out, m_new, v_new = {}, {}, {}
    for k, g in x.items():
        g64 = g.astype(np.float64)
        delta = mean[k].astype(np.float64) - g64
        if rule == "fedavgm":
            m_new[k] = beta1 * m.get(k, 0.0) + delta
            upd = m_new[k]
        else:
            m_new[k] = beta1 * m.get(k, 0.0) + (1 - beta1) * delta
            v_prev = v[k] if k in v else np.full(g.shape, tau * tau)
            v_new[k] = second_moment(rule, v_prev, delta, beta2)
            upd = m_new[k] / (np.sqrt(v_new[k]) + tau)
        out[k] = (g64 + lr * upd).astype(g.dtype)
    return out, m_new, v_new
