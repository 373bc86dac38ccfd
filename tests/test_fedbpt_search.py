"""fedbpt.search: the starting point (template, label words, calibration) chosen with the zero
prompt on training and dev rows, against designed scores whose best candidate is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import bpt_task
from fedtune import config as C
from fedtune.fedbpt.search import SearchSpace, chat_format, search, variants
from fedtune.fedbpt.tasks import Example, TaskSpec


class _Tok:
    """One id per distinct string; a string with a space inside is two tokens."""

    chat_template = None

    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        parts = [text] if " " not in text.strip() else text.split()
        return {"input_ids": [self.ids.setdefault(p, len(self.ids)) for p in parts]}


class _Box:
    """A black box whose label-word scores are designed: under template `good` (with a space
    before the answer) the words of `truth` predict the label on all rows but `wrong`;
    everything else scores noise. Class 0 gets `bias` added."""

    kind = "causal"

    def __init__(self, good, truth, wrong, bias=0.0):
        self.tokenizer, self.good, self.truth, self.wrong, self.bias = _Tok(), good, truth, wrong, bias
        self.rng = np.random.default_rng(0)

    def encode_texts(self, spec, texts):
        return spec.template, [t[0] for t in texts]

    def logits(self, prompt, enc, ids):
        template, texts = enc
        out = self.rng.normal(0, 0.1, (1, len(texts), len(ids)))
        if template == self.good:
            cols = [ids.index(self.tokenizer(" " + w)["input_ids"][0]) for w in self.truth]
            for i, t in enumerate(texts):
                if t.startswith("row"):
                    label = int(t.split("_")[1])
                    hit = label if i not in self.wrong else 1 - label
                    out[0, i, cols[hit]] += 2.0
                out[0, i, cols[0]] += self.bias
        return out


def _rows(n=20):
    return [Example((f"row{i}_{i % 2}",), i % 2, f"f:{i}") for i in range(n)]


SPEC = TaskSpec("custom", ("s",), "label", "<P> {s} It was <mask>", {"0": "bad", "1": "good"})


def test_the_designed_best_template_and_words_win_and_unreadable_candidates_are_listed():
    good = "<P> {s} Sentiment: <mask>"
    box = _Box(good, ("neg", "pos"), wrong={3})
    space = SearchSpace([SPEC.template, good, "<P> <mask> {s}"], [["bad", "neg", "two words"], ["good", "pos"]],
                        ["none"])
    c = search(box, SPEC, _rows(), space)
    assert c.template == good and c.verbalizer == {"0": "neg", "1": "pos"} and c.calibration == "none"
    assert c.accuracy == pytest.approx(19 / 20) and c.rows == 20
    tried = {s["template"]: s for s in c.scored}
    assert set(tried) == {SPEC.template, "<P> {s} It was<mask>", good, "<P> {s} Sentiment:<mask>", "<P> <mask> {s}",
                          "<P><mask> {s}"}
    assert "no text field" in tried["<P> <mask> {s}"]["skipped"]  # a causal LM would never see the text
    assert max(s["score"] for s in c.scored if "score" in s) == c.score


def test_batch_calibration_is_chosen_where_a_class_bias_hides_the_signal():
    good = "<P> {s} Sentiment: <mask>"
    box = _Box(good, ("neg", "pos"), wrong=set(), bias=5.0)  # class 0 always wins uncalibrated
    space = SearchSpace([good], [["neg"], ["pos"]], ["none", "batch"])
    c = search(box, SPEC, _rows(), space)
    assert c.calibration == "batch" and c.accuracy == 1.0  # batch calibration removes the constant shift
    raw = next(s for s in c.scored if s["template"] == good)
    assert raw["calibration"] == "batch"


def test_variants_and_chat_format(tiny_llama):
    from transformers import AutoTokenizer

    assert variants("{s} It was <mask> .") == ["{s} It was <mask> .", "{s} It was<mask> ."]
    assert variants("{s} It was:<mask>") == ["{s} It was:<mask>", "{s} It was: <mask>"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    chat = chat_format(tok, "<P> Review: {sentence} Sentiment: <mask>")
    assert chat == "<|im_start|>user\n<P> Review: {sentence} Sentiment:<|im_end|>\n<|im_start|>assistant\n<mask>"


def test_a_run_with_search_resolves_its_config_once(tiny_llama, tmp_path):
    from fedtune import runner
    from fedtune.fedbpt.session import FedBPTModel, encode_eval, prepare_task
    from fedtune.fedbpt.tasks import task_from_config

    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'", *bpt_task(tmp_path),
                        "partition.num_clients=2", "run.rounds=1", "run.progress=false", "fedbpt.search=true",
                        "task.template_candidates=['<P> {sentence} . The movie was <mask> .']",
                        "task.word_candidates={0 = ['bad', 'terrible'], 1 = ['good', 'great']}"])
    run = tmp_path / "run"
    run.mkdir()
    summary = runner.run(cfg, run)
    choice = json.loads((run / "search.json").read_text())
    assert summary["search"] == choice
    saved = C.load(run / "config.toml")  # a resume or a FLARE job reads the choice, not the search
    assert saved.fedbpt.search is False and saved.task.template == choice["template"]
    assert saved.task.verbalizer == choice["verbalizer"] and saved.fedbpt.calibration == choice["calibration"]
    # the chosen zero prompt's score, recomputed through the ordinary evaluation path
    data = prepare_task(saved)
    model = FedBPTModel(saved, task_from_config(saved.task))
    ev = model.evaluate(None, encode_eval(model.box, model.spec, data.train + data.dev, 7))
    assert ev["score"] == pytest.approx(choice["zero_prompt"]["score"])
    assert all(c["score"] <= ev["score"] + 1e-12 for c in choice["candidates"] if "score" in c)
    assert len([c for c in choice["candidates"] if "score" in c]) >= 4  # 2 templates x 2 spacings (+ chat)
