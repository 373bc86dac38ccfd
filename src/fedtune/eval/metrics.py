"""Metrics on a held-out set, overall and per category.

- Language modelling: held-out token loss and perplexity, overall and per category
  (`heldout_loss`, defined in `fedtune.fedit.evaluate` and re-exported here).
- Generation: ROUGE-L F-measure (the `rouge-score` package from google-research: its
  tokenizer lower-cases and keeps [a-z0-9] words; Porter stemming on) and exact match
  (first line, stripped, as the demo skills are graded).
- Classification: accuracy and macro-F1 over the label set.

Every function takes plain lists (predictions, references, categories) and returns a dict
of floats, so recipes, `fedtune compare` and the benchmarks share one definition.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache

from fedtune.data.skills import normalize_answer
from fedtune.fedit.evaluate import heldout_loss  # noqa: F401  (re-export: one home for every metric)


# ----------------------------------------------------------------------------- generation


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one prediction against one reference, in [0, 1]."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def _by_category(values: list[float], categories: list[str]) -> tuple[float, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for v, c in zip(values, categories):
        groups[c].append(v)
    overall = sum(values) / len(values) if values else 0.0
    return overall, {c: sum(v) / len(v) for c, v in sorted(groups.items())}


def generation_scores(predictions: list[str], references: list[str], categories: list[str] | None = None) -> dict:
    """Mean ROUGE-L and exact match, overall and per category."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    cats = categories if categories is not None else ["all"] * len(references)
    rl, rl_cat = _by_category([rouge_l(p, r) for p, r in zip(predictions, references)], cats)
    em, em_cat = _by_category([float(exact_match(p, r)) for p, r in zip(predictions, references)], cats)
    return {"rouge_l": rl, "rouge_l_by_category": rl_cat, "exact_match": em, "exact_match_by_category": em_cat}


# ----------------------------------------------------------------------------- classification


def accuracy(predictions: list, labels: list) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels) if labels else 0.0


def macro_f1(predictions: list, labels: list, label_set: list | None = None) -> float:
    """Unweighted mean of per-class F1 over `label_set` (default: every label seen in
    either list). A class with no true and no predicted instance scores 0, as in
    scikit-learn's `f1_score(average='macro', zero_division=0)`."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    classes = list(label_set) if label_set is not None else sorted(set(labels) | set(predictions), key=str)
    if not classes:
        return 0.0
    f1s = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def classification_scores(predictions: list, labels: list, categories: list[str] | None = None,
                          label_set: list | None = None) -> dict:
    """Accuracy and macro-F1, overall and (accuracy) per category."""
    out = {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels, label_set)}
    if categories is not None:
        _, out["accuracy_by_category"] = _by_category([float(p == y) for p, y in zip(predictions, labels)],
                                                      categories)
    return out
