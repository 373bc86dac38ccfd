"""Metrics on a held-out set, overall and per category.

- Generation: ROUGE-L F-measure (the `rouge-score` package from google-research: its
  tokenizer lower-cases and keeps [a-z0-9] words; Porter stemming on) and exact match
  (first line, stripped, as the demo skills are graded).
Every function takes plain lists (predictions, references, categories) and returns a dict
of floats, so runs, `fedtune compare` and the benchmarks share one definition. (Held-out
token loss is computed with the model, in fedtune.fedit.evaluate.)
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache


def normalize_answer(text: str) -> str:
    """Exact match compares the first line, stripped of spaces and a trailing period."""
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].rstrip() if line.endswith(".") else line


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
