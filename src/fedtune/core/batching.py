"""Grouping rows of different lengths into passes: used by the FedBPT black box (a
population's forwards) and by FedIT local training (micro-batches of an optimizer batch)."""

from __future__ import annotations

import numpy as np


def plan_forwards(lengths: np.ndarray, p_count: int, max_rows: int, overhead_tokens: int) -> list[tuple[np.ndarray, int]]:
    """Split the P x B forward rows (row index p * B + b; row b is lengths[b] tokens wide for
    every candidate) into forwards: a list of (forward row indices, width).

    The rows are sorted by width (longest first) and cut into contiguous groups so as to
    minimize the modelled cost: each forward costs `overhead_tokens` (the fixed cost of a
    pass, in tokens) plus rows x its own width (padding included), and holds at most
    `max_rows` rows. Dynamic programming over the distinct widths (at most B of them), so
    planning is cheap next to a forward.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    b_count = len(lengths)
    if p_count == 0 or b_count == 0:
        return []
    widths = np.unique(lengths)[::-1]  # distinct widths, longest first
    counts = np.array([int((lengths == w).sum()) * p_count for w in widths])
    g = len(widths)
    best = np.full(g + 1, np.inf)
    best[g] = 0.0
    cut = np.zeros(g, dtype=np.int64)
    for i in range(g - 1, -1, -1):  # best[i]: cost of forwarding groups i.. (rows of width <= widths[i])
        rows = 0
        for j in range(i, g):
            rows += counts[j]
            passes = -(-rows // max_rows)
            cost = passes * overhead_tokens + rows * widths[i] + best[j + 1]
            if cost < best[i]:
                best[i], cut[i] = cost, j + 1
    # rows ordered by width, longest first; candidates of one example stay together
    order_b = np.argsort(-lengths, kind="stable")
    plan, i = [], 0
    while i < g:
        j = int(cut[i])
        members = [b for b in order_b if widths[j - 1] <= lengths[b] <= widths[i]]
        idx = (np.arange(p_count)[None, :] * b_count + np.array(members)[:, None]).reshape(-1)
        for s in range(0, len(idx), max_rows):
            plan.append((idx[s:s + max_rows], int(widths[i])))
        i = j
    return plan
