"""The starting point, chosen before round 1 (BBT-RGB's verbalizer and template search, with
calibration): templates x label words x calibration, each scored by the zero prompt on the
run's training and dev rows (drawn from the training file, never from test), black-box only.

The black box returns label-word logits for a list of candidate tokens, as inference APIs return
top-k log-probabilities: one forward per template scores every candidate word at once. A
template is tried with and without the space before the answer slot (BPE vocabularies hold
" great" and "great" as different tokens), and, for a tokenizer with a chat template, in the
model's chat format (the template in the user turn, the answer first in the assistant's).
Candidates that cannot be read (a word that is not one token, a causal template whose answer
comes before the text) are skipped and listed. The winner is the highest task metric, then the
lowest ce loss; ties keep the earlier candidate, and the task's own configuration comes first.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field, replace

import numpy as np

from fedtune.errors import ConfigError, FedtuneError
from fedtune.fedbpt import objective as O
from fedtune.fedbpt.calibration import calibrate, content_free_texts, log_softmax
from fedtune.fedbpt.tasks import ANSWER_SLOT, PROMPT_SLOT, Example, TaskSpec, check_spec, for_model, space_before_answer

log = logging.getLogger("fedtune.fedbpt")

MAX_COMBINATIONS = 4096  # word combinations scored per template and calibration; more are pruned per class

# Built-in alternatives: templates (answer after the text, for causal and masked LMs alike) and
# label words per class, in the class order of the task's verbalizer.
ALTERNATIVES: dict[str, dict] = {
    "sst2": {"templates": ["<P> Review: {sentence} Sentiment: <mask>", "{sentence} . <P> . It was <mask> .",
                           "<P> {sentence} All in all, the movie was <mask> ."],
             "words": [["bad", "terrible", "negative", "awful", "boring"], ["great", "good", "positive", "excellent", "fun"]]},
    "yelp": {"templates": ["<P> Review: {text} Sentiment: <mask>", "{text} . <P> . It was <mask> ."],
             "words": [["bad", "terrible", "negative", "awful"], ["great", "good", "positive", "excellent"]]},
    "agnews": {"templates": ["<P> Article: {text} Topic: <mask>", "<P> {text} This news is about <mask> .",
                             "{text} . <P> . Topic: <mask> ."],
               "words": [["World", "world", "politics", "international"], ["Sports", "sports", "sport"],
                         ["Business", "business", "economy", "finance"],
                         ["Tech", "technology", "science", "Technology", "Science"]]},
    "mrpc": {"templates": ["<P> Sentence 1: {sentence1} Sentence 2: {sentence2} Same meaning? <mask>",
                           "{sentence1} . {sentence2} . <P> . Paraphrase? <mask> ."],
             "words": [["No", "no", "False"], ["Yes", "yes", "True"]]},
    "rte": {"templates": ["<P> {sentence1} Question: {sentence2} True or False? Answer: <mask>",
                          "{sentence1} . Question: {sentence2} ? <P> . Answer: <mask> ."],
            "words": [["Yes", "yes", "True", "true"], ["No", "no", "False", "false"]]},
    "snli": {"templates": ["<P> {premise} Question: {hypothesis} True, False or Neither? Answer: <mask>"],
             "words": [["Yes", "yes", "True"], ["Maybe", "maybe", "Neither"], ["No", "no", "False"]]},
    "dbpedia": {"templates": ["<P> {content} This article is about a <mask> ."], "words": []},
}


@dataclass
class SearchSpace:
    templates: list[str]
    words: list[list[str]]  # per class, the task's own word first
    calibrations: list[str]
    chat: bool = True  # also the chat format, when the tokenizer has one


@dataclass
class Choice:
    template: str
    verbalizer: dict
    calibration: str
    score: float
    loss: float
    accuracy: float
    rows: int
    scored: list[dict] = field(default_factory=list)  # every template's best, and what was skipped

    def to_json(self) -> dict:
        return {"template": self.template, "verbalizer": self.verbalizer, "calibration": self.calibration,
                "zero_prompt": {"score": self.score, "accuracy": self.accuracy, "loss": self.loss, "rows": self.rows},
                "candidates": self.scored}


def space_from_config(spec: TaskSpec, task_cfg, fb) -> SearchSpace:
    """The candidates: task.template_candidates / task.word_candidates, or the built-in ones."""
    alt = ALTERNATIVES.get(spec.name, {})
    templates = [spec.template] + [t for t in (task_cfg.template_candidates or alt.get("templates", []))
                                   if t != spec.template]
    words = [[w] for w in spec.words]
    given = task_cfg.word_candidates
    if given:
        unknown = [k for k in given if str(k) not in spec.verbalizer]
        if unknown:
            raise ConfigError(f"task.word_candidates: label {unknown[0]!r} is not a label of the task "
                              f"({', '.join(spec.labels)})")
        extra = [list(given.get(label, [])) for label in spec.labels]
    elif task_cfg.verbalizer or len(alt.get("words", [])) != len(spec.labels):
        extra = [[] for _ in spec.labels]  # the user's own words, or a task without built-in alternatives
    else:
        extra = alt["words"]
    for own, more in zip(words, extra):
        own += [w for w in more if w not in own]
    return SearchSpace(templates, words, list(fb.search_calibration), chat=fb.search_chat)


def variants(template: str) -> list[str]:
    """The template with and without the space before the answer slot."""
    head, tail = template.split(ANSWER_SLOT)
    other = head.rstrip() + ANSWER_SLOT + tail if head[-1:].isspace() else head + " " + ANSWER_SLOT + tail
    return [template, other] if head.strip() else [template]


def chat_format(tokenizer, template: str) -> str | None:
    """The template in the model's chat format: the text up to the answer slot in the user turn,
    the answer first in the assistant's turn (None without a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    head = template.split(ANSWER_SLOT)[0].strip()
    if PROMPT_SLOT not in head:
        head = PROMPT_SLOT + " " + head  # the prompt opens the user's turn
    text = tokenizer.apply_chat_template([{"role": "user", "content": head}], tokenize=False, add_generation_prompt=True)
    return text + ANSWER_SLOT if "{" in text and PROMPT_SLOT in text else None


def _prune(lp: np.ndarray, y: np.ndarray, cols: list[list[int]]) -> list[list[int]]:
    """Keep each class's most telling words (mean log-prob on its rows minus on the others)
    until the combinations fit MAX_COMBINATIONS."""
    keep = [list(c) for c in cols]
    while np.prod([len(c) for c in keep]) > MAX_COMBINATIONS:
        k = int(np.argmax([len(c) for c in keep]))
        own = y == k
        gap = [lp[own, j].mean() - (lp[~own, j].mean() if (~own).any() else 0.0) for j in keep[k]]
        keep[k].pop(int(np.argmin(gap)))
    return keep


def search(box, spec: TaskSpec, rows: list[Example], space: SearchSpace) -> Choice:
    """Score every candidate on `rows` with the zero prompt and return the best."""
    if not rows:
        raise FedtuneError("fedbpt.search has no rows to score candidates on (task.k_shot and task.dev_shots are 0)")
    y = np.array([e.label for e in rows], dtype=np.int64)
    templates = []
    for t in space.templates:
        templates += [(v, "") for v in variants(t)]
        if space.chat and box.kind == "causal" and (c := chat_format(box.tokenizer, t)) is not None:
            templates.append((c, "chat format of " + repr(t)))
    best, scored = None, []
    for template, note in templates:
        try:
            t_spec = for_model(replace(spec, template=template, causal_template=""), box.kind)
            check_spec(t_spec, "task")
        except ConfigError as e:
            scored.append({"template": template, "skipped": str(e)})
            continue
        sp = space_before_answer(t_spec)
        vocab, ids = [], []  # per class: (column, word) of each candidate that is one token here
        for words in space.words:
            vocab.append([])
            for w in words:
                tok = box.tokenizer((" " + w) if sp else w, add_special_tokens=False)["input_ids"]
                if len(tok) != 1:
                    continue
                if tok[0] not in ids:
                    ids.append(tok[0])
                vocab[-1].append((ids.index(tok[0]), w))
        if not all(vocab):
            scored.append({"template": template, "skipped": "no candidate word of some class is one token here"})
            continue
        enc = box.encode_texts(t_spec, [e.texts for e in rows])
        lg = box.logits(None, enc, ids)  # (1, rows, candidates): one forward per template
        cf = box.logits(None, box.encode_texts(t_spec, content_free_texts(len(spec.text_columns))), ids) \
            if "content_free" in space.calibrations else None
        cols = _prune(log_softmax(lg[0]), y, [[j for j, _ in v] for v in vocab])
        words_of = {j: w for v in vocab for j, w in v}
        t_best = None
        for combo in itertools.product(*cols):
            if len(set(combo)) < len(combo):
                continue
            c = list(combo)
            for cal in space.calibrations:
                s = calibrate(cal, lg[..., c], cf[..., c] if cf is not None else None)
                r = {"score": float(O.metric(spec.metric, s, y)[0]), "loss": float(O.ce_loss(s, y)[0]),
                     "accuracy": float(O.accuracy(s, y)[0]), "words": [words_of[j] for j in c], "calibration": cal}
                if t_best is None or (r["score"], -r["loss"]) > (t_best["score"], -t_best["loss"]):
                    t_best = r
        if t_best is None:
            scored.append({"template": template, "skipped": "no two classes' words are distinct tokens"})
            continue
        scored.append({"template": template, **({"note": note} if note else {}), **t_best})
        if best is None or (t_best["score"], -t_best["loss"]) > (best[1]["score"], -best[1]["loss"]):
            best = (template, t_best)
    if best is None:
        raise ConfigError("fedbpt.search: no candidate template and words can be scored: "
                          + "; ".join(f"{s['template']!r}: {s['skipped']}" for s in scored))
    template, r = best
    return Choice(template, dict(zip(spec.labels, r["words"])), r["calibration"], r["score"], r["loss"],
                  r["accuracy"], len(rows), scored)


def resolved(cfg, choice: Choice):
    """The run's config with the choice written in (and the search switched off), so that a
    resume, a FLARE job and a reader of config.toml see the same task."""
    out = copy.deepcopy(cfg)
    out.task.template = choice.template
    out.task.verbalizer = dict(choice.verbalizer)
    out.task.template_candidates, out.task.word_candidates = [], {}
    out.fedbpt.calibration = choice.calibration
    out.fedbpt.search = False
    return out
