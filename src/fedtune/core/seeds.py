"""Derived seeds: every (run seed, round, client, purpose) gets its own stream."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from non-negative integers; stable across processes and engines."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])
