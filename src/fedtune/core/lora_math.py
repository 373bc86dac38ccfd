"""LoRA adapters as the products they stand for: the exact mean of the clients' B A, and its
best rank-r factorization (FlexLoRA: Bai et al., 2024), and FLoRA's stacking (Wang et al., 2024).
Pure numpy over named arrays.

Averaging A and B separately is not the average of the products: mean(B_i) mean(A_i) !=
mean(B_i A_i). `ProductMean` folds w_i B_i A_i per adapted module (one float64 matrix each,
never the clients' adapters), then `result(rank)` re-factors each mean by truncated SVD,
M = U S V^T -> B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, and reports the energy it discards,
sum of the squared singular values beyond r over the total.
"""

from __future__ import annotations

import numpy as np

from fedtune.core.arrays import Arrays

PAIRS = ((".lora_A.", ".lora_B."), (".lora_embedding_A", ".lora_embedding_B"))


def lora_pairs(keys) -> dict[str, tuple[str, str]]:
    """{module: (A key, B key)} for every adapted module; ValueError on an A without its B."""
    keys = set(keys)
    out = {}
    for k in sorted(keys):
        for a_tag, b_tag in PAIRS:
            if a_tag in k:
                b = k.replace(a_tag, b_tag)
                if b not in keys:
                    raise ValueError(f"adapter key {k!r} has no matching {b!r}")
                out[k.replace(a_tag, "|")] = (k, b)
    return out


class ProductMean:
    """A weighted mean of B A per module, folded one adapter at a time (plus a plain weighted
    mean of any array that is not part of a LoRA pair)."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.other: dict[str, np.ndarray] = {}
        self.pairs: dict[str, tuple[str, str]] | None = None
        self.like: Arrays = {}
        self.total = 0.0

    def add(self, adapter: Arrays, weight: float) -> None:
        if self.pairs is None:
            self.pairs = lora_pairs(adapter)
            paired = {k for ab in self.pairs.values() for k in ab}
            self.like = {k: v for k, v in adapter.items()}
            self.other = {k: np.zeros(v.shape) for k, v in adapter.items() if k not in paired}
        for m, (a, b) in self.pairs.items():
            prod = adapter[b].astype(np.float64) @ adapter[a].astype(np.float64)
            if m in self.sums:
                self.sums[m] += weight * prod
            else:
                self.sums[m] = weight * prod
        for k, acc in self.other.items():
            acc += weight * adapter[k].astype(np.float64)
        self.total += float(weight)

    def mean_products(self) -> dict[str, np.ndarray]:
        return {m: s / self.total for m, s in self.sums.items()}

    def result(self, rank: int) -> tuple[Arrays, dict]:
        """(the rank-r adapter closest to the mean products, {"discarded_energy": max over modules,
        "discarded_energy_mean": mean})."""
        if self.total <= 0:
            raise ValueError("no adapters to aggregate")
        out, lost = {}, []
        for m, mean in self.mean_products().items():
            a, b = self.pairs[m]
            u, s, vt = np.linalg.svd(mean, full_matrices=False)
            r = min(rank, len(s))
            root = np.sqrt(s[:r])
            new_b = np.zeros(self.like[b].shape)
            new_a = np.zeros(self.like[a].shape)
            new_b[:, :r] = u[:, :r] * root
            new_a[:r] = root[:, None] * vt[:r]
            out[a], out[b] = new_a.astype(self.like[a].dtype), new_b.astype(self.like[b].dtype)
            total = float(np.sum(s**2))
            lost.append(float(np.sum(s[r:] ** 2)) / total if total > 0 else 0.0)
        for k, acc in self.other.items():
            out[k] = (acc / self.total).astype(self.like[k].dtype)
        return {k: out[k] for k in self.like}, {"discarded_energy": max(lost, default=0.0),
                                                "discarded_energy_mean": float(np.mean(lost)) if lost else 0.0}


def truncate(arrays: Arrays, rank: int) -> Arrays:
    """The first `rank` components of every LoRA pair (A's rows, B's columns): what a client of
    that rank receives (HetLoRA). After an SVD re-factoring (FlexLoRA) the components are in
    order of singular value, so B[:, :r] A[:r] is the best rank-r approximation of B A."""
    out = dict(arrays)
    for a, b in lora_pairs(arrays).values():
        out[a], out[b] = arrays[a][:rank].copy(), arrays[b][:, :rank].copy()
    return out


def zero_pad(arrays: Arrays, like: Arrays) -> Arrays:
    """A lower-rank adapter zero-padded to the shapes of `like` (HetLoRA's padding)."""
    out = dict(arrays)
    for a, b in lora_pairs(arrays).values():
        r = arrays[a].shape[0]
        pa, pb = np.zeros_like(like[a]), np.zeros_like(like[b])
        pa[:r], pb[:, :r] = arrays[a], arrays[b]
        out[a], out[b] = pa, pb
    return out


def rank_of(client_id: str, client_ids: list[str], ranks: list[int]) -> int:
    """A client's LoRA rank: ranks[i % len(ranks)] for the client's position i in sorted ids."""
    return int(ranks[sorted(client_ids).index(client_id) % len(ranks)])


STACK = "stack/"  # FLoRA: the stacked factors travel beside the round's fresh adapter under this prefix


def split_stack(arrays: Arrays) -> tuple[Arrays, Arrays]:
    """(the adapter, the stacked factors under their adapter keys) of a FLoRA payload."""
    adapter = {k: v for k, v in arrays.items() if not k.startswith(STACK)}
    return adapter, {k[len(STACK):]: v for k, v in arrays.items() if k.startswith(STACK)}


def empty_stack(adapter: Arrays) -> Arrays:
    """Rank-0 stacked factors for every LoRA pair of `adapter` (FLoRA before round 1)."""
    out = {}
    for a, b in lora_pairs(adapter).values():
        if ".lora_A." not in a:
            raise ValueError(f"FLoRA stacking is for linear-layer LoRA; {a!r} is an embedding adapter")
        out[STACK + a] = np.zeros((0, adapter[a].shape[1]), adapter[a].dtype)
        out[STACK + b] = np.zeros((adapter[b].shape[0], 0), adapter[b].dtype)
    return out


def stack(old: Arrays, adapters: list[Arrays], weights: list[float]) -> Arrays:
    """FLoRA: A_new = [A_old; A_1; ...; A_n], B_new = [B_old, p_1 B_1, ..., p_n B_n] with
    p_i = w_i / sum(w), so that B_new A_new = B_old A_old + sum_i p_i B_i A_i exactly: the
    weighted mean of the clients' products is added to the global update, with no
    cross terms and no truncation (the rank grows by the clients' ranks every round)."""
    total = float(sum(weights))
    if not adapters or total <= 0:
        raise ValueError("no adapters to stack")
    out = dict(old)
    for a, b in lora_pairs(adapters[0]).values():
        out[STACK + a] = np.concatenate([old[STACK + a], *(x[a] for x in adapters)], axis=0)
        out[STACK + b] = np.concatenate([old[STACK + b], *((w / total) * x[b] for x, w in zip(adapters, weights))],
                                        axis=1).astype(old[STACK + b].dtype)
    return out
