"""Metrics against small numpy oracles: ROUGE-L (LCS) and exact match."""

import numpy as np
import pytest

from fedtune.eval.metrics import exact_match, generation_scores, rouge_l

# words that the Porter stemmer and rouge-score's tokenizer leave as they are
VOCAB = "cat dog red sun box tea map pen cup hat".split()


def lcs_oracle(a: list[str], b: list[str]) -> int:
    t = np.zeros((len(a) + 1, len(b) + 1), dtype=np.int64)
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i, j] = t[i - 1, j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1, j], t[i, j - 1])
    return int(t[-1, -1])


def rouge_l_oracle(pred: list[str], ref: list[str]) -> float:
    lcs = lcs_oracle(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def test_rouge_l_matches_an_lcs_oracle_on_random_sentences():
    rng = np.random.default_rng(0)
    for _ in range(200):
        pred = list(rng.choice(VOCAB, size=int(rng.integers(1, 12))))
        ref = list(rng.choice(VOCAB, size=int(rng.integers(1, 12))))
        assert rouge_l(" ".join(pred), " ".join(ref)) == pytest.approx(rouge_l_oracle(pred, ref), abs=1e-12)


def test_rouge_l_edge_cases():
    assert rouge_l("The cat, the dog.", "the cat the dog") == pytest.approx(1.0)  # case and punctuation ignored
    assert rouge_l("", "cat") == 0.0 and rouge_l("cat", "") == 0.0
    assert rouge_l("running dogs", "run dog") == pytest.approx(1.0)  # Porter stemming
    assert rouge_l("cat dog", "dog cat") == pytest.approx(0.5)  # order matters: LCS is 1 of 2


def test_exact_match_uses_the_first_line_and_ignores_a_trailing_period():
    assert exact_match(" 42.\nbecause", "42")
    assert not exact_match("41", "42")


def test_generation_scores_overall_and_per_category():
    preds = ["cat dog", "42", "red sun", "x"]
    refs = ["cat dog", "42", "red box", "y"]
    cats = ["a", "b", "a", "b"]
    s = generation_scores(preds, refs, cats)
    assert s["exact_match"] == pytest.approx(0.5)
    assert s["exact_match_by_category"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    assert s["rouge_l_by_category"]["a"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["rouge_l_by_category"]["b"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["rouge_l"] == pytest.approx((1.0 + 1.0 + 0.5 + 0.0) / 4)
    with pytest.raises(ValueError):
        generation_scores(["a"], ["a", "b"])
