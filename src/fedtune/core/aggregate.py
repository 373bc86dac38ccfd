"""Pure aggregation of named arrays. No I/O, no engine, no model."""

from __future__ import annotations

import numpy as np

from fedtune.core.arrays import Arrays


class RunningMean:
    """A weighted mean of named arrays folded in one update at a time: it holds one float64
    sum, never the list of updates (so a server's memory does not grow with its clients)."""

    def __init__(self):
        self.sums: Arrays | None = None
        self.dtypes: dict = {}
        self.total = 0.0

    def add(self, arrays: Arrays, weight: float) -> None:
        if self.sums is None:
            self.sums = {k: np.zeros(v.shape, dtype=np.float64) for k, v in arrays.items()}
            self.dtypes = {k: v.dtype for k, v in arrays.items()}
        for k, acc in self.sums.items():
            acc += arrays[k].astype(np.float64) * float(weight)
        self.total += float(weight)

    def result(self) -> Arrays:
        if self.sums is None:
            raise ValueError("weighted_mean of no results")
        if self.total <= 0:
            raise ValueError("weights sum to zero")
        return {k: (acc / self.total).astype(self.dtypes[k]) for k, acc in self.sums.items()}


def weighted_mean(results: list[tuple[Arrays, float]]) -> Arrays:
    """Weighted mean of named arrays (weights = example counts), in float64, cast back to
    each array's dtype. The same arithmetic as folding the results into a RunningMean."""
    mean = RunningMean()
    for arrays, w in results:
        mean.add(arrays, w)
    return mean.result()
