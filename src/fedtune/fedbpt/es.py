"""Options for the `cma` library's CMA-ES, with a private random generator, and the initial step.

By default `cma` seeds numpy's global random state and draws from it (`np.random.randn`):
anything else in the process that draws from that state changes the search, and the
search changes everything else's draws. Each ES here gets its own `RandomState(seed).randn`,
the very stream `cma` would have drawn after `np.random.seed(seed)`, so the reference's
mechanics are unchanged and no ES shares its generator with anything.
"""

from __future__ import annotations

import numpy as np


def es_options(seed: int, **opts) -> dict:
    """`cma` options with a private generator seeded by `seed` (0 becomes 1, as cma would not seed 0)."""
    seed = int(seed) or 1
    return {**opts, "randn": np.random.RandomState(seed).randn, "seed": np.nan}


SIGMA0 = {"reference": 1.0, "improved": 0.3, "generation": 0.3}  # fedbpt.sigma0 = 0: each mode's initial step


def initial_sigma(fb) -> float:
    """The initial CMA-ES step of a [fedbpt] section: fedbpt.sigma0, or its mode's default when 0
    (FedBPT's 1.0 in reference mode; 0.3 otherwise, where 1.0 drifts: docs/fedbpt.md)."""
    return float(fb.sigma0) if fb.sigma0 > 0 else SIGMA0[fb.mode]
