"""Calibration of the verbalizer's scores (batch and content-free) against the papers'
definitions written in numpy; it fixes a biased classifier; a FedBPT run with calibration in
evaluation and fitness works end to end and the saved prompt classifies the same way."""

import json

import numpy as np
import pytest

from conftest import bpt_task

from fedtune import config as C
from fedtune.fedbpt.calibration import calibrate


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_batch_and_content_free_calibration_are_the_papers_rescaling():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 7, 4)) * 2
    cf = rng.standard_normal((3, 3, 4))
    for kind, ref in (("batch", logits), ("content_free", cf)):
        got = _softmax(calibrate(kind, logits, cf if kind == "content_free" else None))
        # oracle: p / mean reference probability per class (W = diag(p_ref)^-1, b = 0), renormalized
        q = _softmax(logits) / _softmax(ref).mean(axis=1, keepdims=True)
        np.testing.assert_allclose(got, q / q.sum(-1, keepdims=True), rtol=1e-10)
    assert calibrate("none", logits) is logits
    with pytest.raises(ValueError, match="content-free rows"):
        calibrate("content_free", logits)


def test_batch_calibration_undoes_a_bias_toward_one_class():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    logits = np.stack([3.0 + rng.normal(0, 1, 400), 3.0 * 0 + 1.5 * y + rng.normal(0, 1, 400)], axis=1)[None]
    raw = (logits.argmax(-1)[0] == y).mean()
    cal = (calibrate("batch", logits).argmax(-1)[0] == y).mean()
    assert raw < 0.6 < 0.7 < cal  # almost everything was class 0 before


def _task(tmp_path):
    return bpt_task(tmp_path) + ["partition.num_clients=3", "run.rounds=2", "run.progress=false",
                                 "run.save_every_round=false"]


@pytest.mark.parametrize("mode", ["improved", "generation"])
def test_a_run_with_content_free_calibration_in_evaluation_and_fitness(tiny_llama, tmp_path, mode):
    from fedtune import runner
    from fedtune.fedbpt.classify import classify
    from fedtune.fedbpt.session import FedBPTModel
    from fedtune.fedbpt.tasks import task_from_config

    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'", *_task(tmp_path),
                        "fedbpt.calibration='content_free'", "fedbpt.calibrate_fitness=true",
                        f"fedbpt.mode='{mode}'"])
    (tmp_path / "run").mkdir()
    summary = runner.run(cfg, tmp_path / "run")
    assert summary["rounds"] == 2 and 0 <= summary["final"]["test"]["accuracy"] <= 1
    # the zero prompt's calibrated test accuracy, recomputed by hand from the raw scores
    model = FedBPTModel(cfg, task_from_config(cfg.task))
    rows = [json.loads(x) for x in (tmp_path / "test.jsonl").read_text().splitlines()]
    enc = model.box.encode_texts(model.spec, [(r["sentence"],) for r in rows])
    raw = model.box.logits(None, enc, model.label_ids)
    cf = model.box.logits(None, model.content_free, model.label_ids)
    q = _softmax(raw) / _softmax(cf).mean(axis=1, keepdims=True)
    want = (q.argmax(-1)[0] == np.array([r["label"] for r in rows])).mean()
    assert summary["zero_prompt"]["test"]["accuracy"] == pytest.approx(want)
    # the saved prompt classifies with the calibration it was evaluated with
    out = classify(tmp_path / "run" / "prompt", [(r["sentence"],) for r in rows], cfg.model)
    saved = json.loads((tmp_path / "run" / "prompt" / "prompt.json").read_text())
    assert saved["calibration"] == "content_free" and len(out) == len(rows)
