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

FedExP (Jhunjhunwala, Wang and Joshi, "FedExP: Speeding Up Federated Averaging via
Extrapolation", ICLR 2023, Algorithm 1): FedAvg with a server step chosen each round from the
clients' own updates Δ_i = y_i - x_t (p_i = example shares, Δ_t = Σ p_i Δ_i):

    η_t = max(1, Σ p_i ||Δ_i||² / (2 (||Δ_t||² + ε))),   x_{t+1} = x_t + η_t Δ_t

When the clients' updates point in different directions (heterogeneous data) their mean is
short against each of them and the step grows; identical updates give η_t = 1 (FedAvg).
"""

from __future__ import annotations

import numpy as np

from fedtune.core.arrays import Arrays

RULES = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
FEDEXP = "fedexp"  # needs each client's update norm, so not a rule over the mean alone (no DP, no secagg)


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


def squared_distance(x: Arrays, y: Arrays) -> float:
    """||y - x||² over every named array, in float64."""
    return float(sum(np.sum((y[k].astype(np.float64) - x[k].astype(np.float64)) ** 2) for k in x))


def fedexp_step(x: Arrays, mean: Arrays, mean_sq_update: float, eps: float) -> tuple[Arrays, float, float]:
    """(next global arrays, η_t, the ratio before the floor of 1) from the global x, the clients'
    weighted mean and the weighted mean of their squared update norms Σ p_i ||Δ_i||² (FedExP,
    Algorithm 1)."""
    if eps < 0 or mean_sq_update < 0:
        raise ValueError(f"FedExP needs eps >= 0 and a mean squared norm >= 0, got {eps}, {mean_sq_update}")
    d2 = squared_distance(x, mean)
    ratio = 0.0 if d2 + eps == 0 else mean_sq_update / (2.0 * (d2 + eps))
    eta = max(1.0, ratio)
    out = {k: (g.astype(np.float64) + eta * (mean[k].astype(np.float64) - g.astype(np.float64))).astype(g.dtype)
           for k, g in x.items()}
    return out, eta, ratio
