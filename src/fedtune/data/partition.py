"""Seeded partitioning of rows across clients, and the held-out global test set.

All functions take category labels (one per row) and return lists of row indices, so they
serve instruction data (category = Dolly category or demo skill) and classification data
(category = label) alike.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from fedtune.errors import DataError

log = logging.getLogger(__name__)


def holdout_stratified(categories: list[str], per_category: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick `per_category` rows of each category as the global test set.

    Returns (train_idx, test_idx), both sorted. A category with too few rows keeps at
    least one row for training.
    """
    rng = np.random.default_rng(seed)
    cats = np.asarray(categories)
    test = []
    for c in sorted(set(categories)):
        idx = np.flatnonzero(cats == c)
        k = min(per_category, max(len(idx) - 1, 0))
        if k:
            test.extend(rng.choice(idx, size=k, replace=False).tolist())
    test_idx = np.array(sorted(test), dtype=np.int64)
    mask = np.ones(len(categories), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def iid(n_rows: int, num_clients: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n_rows)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def category_shards(categories: list[str], num_clients: int, shards_per_client: int, seed: int) -> list[np.ndarray]:
    """Shepherd's diff_quantity 0: sort by category, cut into equal contiguous shards,
    shuffle the shards, give each client `shards_per_client` of them."""
    order = np.array(sorted(range(len(categories)), key=lambda i: (categories[i], i)), dtype=np.int64)
    n_shards = num_clients * shards_per_client
    shards = np.array_split(order, n_shards)
    shard_ids = np.random.default_rng(seed).permutation(n_shards)
    return [np.sort(np.concatenate([shards[s] for s in shard_ids[c::num_clients]])) for c in range(num_clients)]


def dirichlet(categories: list[str], num_clients: int, alpha: float, min_size: int, seed: int,
              max_tries: int = 10_000) -> list[np.ndarray]:
    """Shepherd's diff_quantity 1: per category, Dirichlet(alpha) proportions over clients
    (clients already holding their fair share get none of the next category); redrawn until
    every client holds at least `min_size` rows."""
    rng = np.random.default_rng(seed)
    cats = np.asarray(categories)
    n = len(categories)
    if min_size * num_clients > n:
        raise DataError(
            f"partition.min_client_size = {min_size} x {num_clients} clients needs {min_size * num_clients} rows; "
            f"only {n} are left for training"
        )
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in sorted(set(categories)):
            idx = np.flatnonzero(cats == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = np.array([pi * (len(parts[j]) < n / num_clients) for j, pi in enumerate(p)])
            if p.sum() == 0:
                p = np.full(num_clients, 1.0)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"Dirichlet partitioning found no split with every client >= {min_size} rows in {max_tries} draws; "
        "lower partition.min_client_size, raise partition.alpha, or use fewer clients"
    )


def partition(categories: list[str], method: str, num_clients: int, seed: int, *, shards_per_client: int = 2,
              alpha: float = 0.5, min_size: int = 1) -> list[np.ndarray]:
    """Dispatch to a partitioner and check that no client is left empty."""
    n = len(categories)
    if n < num_clients:
        raise DataError(f"{n} training rows cannot be split across {num_clients} clients: lower "
                        "partition.num_clients (or partition.test_per_category), or give more data")
    if method in ("shards", "dirichlet") and len(set(categories)) == 1:
        log.warning("partition.method = '%s' splits by category, but every row has the same one (%r): the clients "
                    "get rows of one kind, only their numbers differ. Instruction data: name the category field with "
                    "data.format = 'columns' and data.columns.category", method, categories[0])
    if method == "iid":
        parts = iid(n, num_clients, seed)
    elif method == "shards":
        if n < num_clients * shards_per_client:
            raise DataError(f"{n} training rows are fewer than the {num_clients * shards_per_client} shards asked for "
                            "(partition.num_clients x partition.shards_per_client)")
        parts = category_shards(categories, num_clients, shards_per_client, seed)
    elif method == "dirichlet":
        parts = dirichlet(categories, num_clients, alpha, max(min_size, 1), seed)
    else:
        raise DataError(f"unknown partition method '{method}' (iid, shards, dirichlet)")
    for i, p in enumerate(parts):
        if len(p) == 0:
            raise DataError(f"partitioning left client {i} with no rows; use fewer clients or another method")
    return parts


def category_mix(categories: list[str], idx: np.ndarray) -> dict[str, int]:
    return dict(sorted(Counter(categories[i] for i in idx).items(), key=lambda kv: -kv[1]))


def stratified_subset(items: list, categories: list[str], limit: int) -> list:
    """At most `limit` items (0 = all), taken round-robin over categories in order, so a
    small evaluation budget still covers every category."""
    if not limit or limit >= len(items):
        return list(items)
    queues: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        queues.setdefault(c, []).append(i)
    picked: list[int] = []
    while len(picked) < limit:
        for c in sorted(queues):
            if queues[c] and len(picked) < limit:
                picked.append(queues[c].pop(0))
    return [items[i] for i in sorted(picked)]
