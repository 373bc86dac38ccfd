"""Rows as the black box encodes them, and the numpy thread setting client code runs under."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Encoded:
    """A batch of rows as token ids, right-padded. Client code treats it as opaque."""

    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64
    slot_start: np.ndarray  # (B,) first prompt slot of each row
    answer_pos: np.ndarray  # (B,) where the verbalizer logits are read
    free: np.ndarray  # (B, T) bool: text tokens (what perturbation may replace)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def take(e: Encoded, rows: np.ndarray) -> Encoded:
    """The given rows of a batch, in that order."""
    return Encoded(e.input_ids[rows], e.attention_mask[rows], e.slot_start[rows], e.answer_pos[rows], e.free[rows])


def concat(a: Encoded, b: Encoded, pad_id: int) -> Encoded:
    """Stack two encoded batches row-wise (right-padding the shorter one)."""
    t = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x, value):
        return np.pad(x, ((0, 0), (0, t - x.shape[1])), constant_values=value)

    return Encoded(np.concatenate([pad(a.input_ids, pad_id), pad(b.input_ids, pad_id)]),
                   np.concatenate([pad(a.attention_mask, 0), pad(b.attention_mask, 0)]),
                   np.concatenate([a.slot_start, b.slot_start]), np.concatenate([a.answer_pos, b.answer_pos]),
                   np.concatenate([pad(a.free, False), pad(b.free, False)]))


_BLAS = None


def numpy_blas_single_threaded():
    """A context in which numpy's BLAS runs on one thread. Client code does its CMA-ES and
    projection algebra in numpy between forwards; a multi-threaded OpenBLAS leaves its threads
    spinning after each call, and on a small CPU they take the cores from the next forward
    (`benchmarks/blas_spin.py` on 2 cores: a 4 x 24-token SmolLM2 forward took 61 ms alone and
    161 ms right after a 5 x 500 @ 500 x 5,760 product). The algebra is small; one thread loses
    nothing."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")
