"""Losses over verbalizer logits, the perturbation objective, and the task metrics.

All functions take logits of shape (P, B, C) (P candidate prompts, B rows, C classes) and
labels (B,), and return one number per candidate. Lower fitness is better (CMA-ES minimizes).
"""

from __future__ import annotations

import numpy as np

HINGE_MARGIN = 2.0  # BBT's multi-class hinge margin


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def ce_rows(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy over the verbalizer words, per row: (P, B)."""
    x = logits.astype(np.float64)
    picked = np.take_along_axis(x, labels[None, :, None].repeat(len(x), 0), axis=-1)[..., 0]
    return _logsumexp(x) - picked


def ce_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy over the verbalizer words, mean over rows."""
    return ce_rows(logits, labels).mean(axis=1)


def hinge_rows(logits: np.ndarray, labels: np.ndarray, margin: float = HINGE_MARGIN) -> np.ndarray:
    """Multi-class margin loss (as torch.nn.MultiMarginLoss) per row: sum_{j != y} max(0, margin - x_y + x_j) / C."""
    x = logits.astype(np.float64)
    c = x.shape[-1]
    picked = np.take_along_axis(x, labels[None, :, None].repeat(len(x), 0), axis=-1)  # (P, B, 1)
    viol = np.maximum(0.0, margin - picked + x)
    viol[:, np.arange(x.shape[1]), labels] = 0.0
    return viol.sum(axis=-1) / c


def hinge_loss(logits: np.ndarray, labels: np.ndarray, margin: float = HINGE_MARGIN) -> np.ndarray:
    """The multi-class margin loss, mean over rows."""
    return hinge_rows(logits, labels, margin).mean(axis=1)


def predictions(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=-1)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (predictions(logits) == labels[None]).mean(axis=1)


def f1(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Binary F1 of the second class (MRPC's 'paraphrase') for two classes; macro F1 otherwise."""
    pred = predictions(logits)
    c = logits.shape[-1]
    classes = [1] if c == 2 else list(range(c))
    scores = []
    for k in classes:
        tp = ((pred == k) & (labels[None] == k)).sum(axis=1)
        fp = ((pred == k) & (labels[None] != k)).sum(axis=1)
        fn = ((pred != k) & (labels[None] == k)).sum(axis=1)
        denom = 2 * tp + fp + fn
        scores.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    return np.mean(scores, axis=0)


def scores(metric_name: str, pair: bool, logits: np.ndarray, labels: np.ndarray) -> dict:
    """What an evaluation reports for one prompt's logits (1, B, C): accuracy, ce loss, and F1
    where the task's metric is F1 or the task is a pair task (two text fields: MRPC, RTE), which
    are reported with both; `score` is the task's own metric."""
    out = {"metric": metric_name, "accuracy": float(accuracy(logits, labels)[0]),
           "loss": float(ce_loss(logits, labels)[0]), "rows": int(len(labels))}
    if metric_name == "f1" or pair:
        out["f1"] = float(f1(logits, labels)[0])
    out["score"] = out[metric_name]
    return out


def metric(name: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return f1(logits, labels) if name == "f1" else accuracy(logits, labels)


def loss(kind: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`ce`, `hinge`, or `perf` (= -accuracy), one value per candidate: the mean of `row_losses`."""
    return row_losses(kind, logits, labels).mean(axis=1)


def row_losses(kind: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each candidate's loss on each row, (P, B): what sums across clients (`perf`: -1 per correct row)."""
    if kind == "ce":
        return ce_rows(logits, labels)
    if kind == "hinge":
        return hinge_rows(logits, labels)
    if kind == "perf":
        return -(predictions(logits) == labels[None]).astype(np.float64)
    raise ValueError(f"unknown loss {kind!r}")


def fitness(kind: str, clean: np.ndarray, labels: np.ndarray, perturbed: np.ndarray | None = None) -> np.ndarray:
    """FedBPT's objective: the loss on the clean rows, divided by the loss on a perturbed copy
    when one is given (a prompt that also fits noise is penalized)."""
    f = loss(kind, clean, labels)
    if perturbed is None:
        return f
    return f / np.maximum(loss(kind, perturbed, labels), 1e-12)
