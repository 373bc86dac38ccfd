"""Client selection, seeded per round from the run seed."""

from __future__ import annotations

import math
import warnings

import numpy as np


def select_clients(client_ids: list[str], rnd: int, seed: int, fraction: float = 1.0, count: int = 0) -> list[str]:
    """Pick `count` clients (or ceil(fraction * N) when count is 0) without replacement.

    The draw depends only on (seed, rnd), so a resumed run picks the same clients.
    """
    n = len(client_ids)
    k = count if count > 0 else max(1, math.ceil(fraction * n - 1e-9))
    k = min(k, n)
    if k == 1 and n > 1:
        warnings.warn(
            f"round {rnd}: only 1 of {n} clients is selected; federated averaging degenerates to "
            "sequential single-client training (raise server.fraction or server.clients_per_round)",
            stacklevel=2,
        )
    if k == n:
        return list(client_ids)
    rng = np.random.default_rng([seed, rnd, 0x5E1EC7])
    picked = rng.choice(n, size=k, replace=False)
    return [client_ids[i] for i in sorted(picked)]
