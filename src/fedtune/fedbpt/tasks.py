"""Classification tasks for black-box prompt tuning: a data file, its text and label
columns, a template with the prompt slot `<P>` and the answer slot `<mask>`, verbalizer
words (one per label) and a metric.

A new task needs a config, not code: `[task]` names a built-in definition (the
templates and verbalizers of BBT / FedBPT) and overrides any part of it, or spells out
a custom one. Rows carry their source (`file:line`) so that a bad label points back at it.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedtune.data import hub
from fedtune.errors import ConfigError, DataError
from fedtune.fedbpt.table import TableFormat, read_table

log = logging.getLogger("fedtune.fedbpt")

PROMPT_SLOT = "<P>"
ANSWER_SLOT = "<mask>"
_FIELD = re.compile(r"\{([^{}]+)\}")  # a column name may hold any character but braces


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    label_column: str
    template: str  # with {column} fields, an optional <P> (default: at the start) and one <mask>
    verbalizer: dict  # label value (as a string) -> word; its order fixes the class order
    metric: str = "accuracy"  # accuracy | f1
    hub: tuple[str, str, str, str] = ("", "", "train", "validation")  # (dataset, config, train split, test split)
    skip_labels: tuple[str, ...] = ()  # label values dropped on load (SNLI's -1: no gold label)
    causal_template: str = ""  # what a causal LM reads instead (the answer after every text field); "" = template
    # other names of the same columns and labels in the files as their authors release them (GLUE's TSVs,
    # SNLI's own files): a column is looked up under its aliases when its own name is absent; a label
    # value found in label_map is read as the label it maps to
    column_aliases: tuple[tuple[str, tuple[str, ...]], ...] = ()
    label_map: tuple[tuple[str, str], ...] = ()

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer)

    @property
    def words(self) -> list[str]:
        return list(self.verbalizer.values())

    def to_json(self) -> dict:
        return {"name": self.name, "text_columns": list(self.text_columns), "label_column": self.label_column,
                "template": self.template, "verbalizer": dict(self.verbalizer), "metric": self.metric,
                "skip_labels": list(self.skip_labels), "label_map": dict(self.label_map)}

    @classmethod
    def from_json(cls, d: dict) -> "TaskSpec":
        return cls(d["name"], tuple(d["text_columns"]), d["label_column"], d["template"], dict(d["verbalizer"]),
                   d.get("metric", "accuracy"), skip_labels=tuple(d.get("skip_labels", ())),
                   label_map=tuple(d.get("label_map", {}).items()))


# BBT's templates and verbalizers (txsun1997/Black-Box-Tuning, as used by FedBPT); column names are
# those of the Hugging Face datasets, so hub ids and exported files load as they are. BBT's templates
# are for masked LMs, where <mask> may sit anywhere; a causal LM predicts the label word from what
# precedes it, so where BBT puts the answer before a text field, `causal_template` puts it last.
# The aliases read GLUE's own TSVs (RTE's label words, MRPC's "#1 String" columns) and SNLI's
# release files (sentence1 / sentence2 / gold_label) as they come.
_ENTAIL = (("entailment", "0"), ("not_entailment", "1"))
_NLI = (("entailment", "0"), ("neutral", "1"), ("contradiction", "2"), ("-", "-1"))
BUILTIN: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("sentence",), "label", "<P> . {sentence} . It was <mask> .",
                     {"0": "bad", "1": "great"}, hub=("glue", "sst2", "train", "validation")),
    "yelp": TaskSpec("yelp", ("text",), "label", "<P> . {text} . It was <mask> .",
                     {"0": "bad", "1": "great"}, hub=("yelp_polarity", "plain_text", "train", "test")),
    "agnews": TaskSpec("agnews", ("text",), "label", "<P> . <mask> News: {text}",
                       {"0": "World", "1": "Sports", "2": "Business", "3": "Tech"},
                       hub=("ag_news", "default", "train", "test"), causal_template="<P> . {text} . Topic: <mask> ."),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), "label", "<P> . {sentence1} ? <mask> , {sentence2}",
                     {"0": "No", "1": "Yes"}, metric="f1", hub=("glue", "mrpc", "train", "validation"),
                     causal_template="<P> . {sentence1} . {sentence2} . Do they mean the same? <mask> .",
                     column_aliases=(("sentence1", ("#1 String",)), ("sentence2", ("#2 String",)),
                                     ("label", ("Quality",)))),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), "label", "<P> . {sentence1} ? <mask> , {sentence2}",
                    {"0": "Yes", "1": "No"}, hub=("glue", "rte", "train", "validation"),
                    causal_template="<P> . {sentence1} . Question: {sentence2} ? Answer: <mask> .", label_map=_ENTAIL),
    "snli": TaskSpec("snli", ("premise", "hypothesis"), "label", "<P> . {premise} ? <mask> , {hypothesis}",
                     {"0": "Yes", "1": "Maybe", "2": "No"}, hub=("snli", "", "train", "test"), skip_labels=("-1",),
                     causal_template="<P> . {premise} . Question: {hypothesis} ? Answer: <mask> .",
                     column_aliases=(("premise", ("sentence1",)), ("hypothesis", ("sentence2",)),
                                     ("label", ("gold_label",))), label_map=_NLI),
    "dbpedia": TaskSpec("dbpedia", ("content",), "label", "<P> [ Category: <mask> ] {content}",
                        {"0": "Company", "1": "Education", "2": "Artist", "3": "Athlete", "4": "Office",
                         "5": "Transportation", "6": "Building", "7": "Natural", "8": "Village", "9": "Animal",
                         "10": "Plant", "11": "Album", "12": "Film", "13": "Written"},
                        hub=("dbpedia_14", "", "train", "test"), causal_template="<P> . {content} . Category: <mask> ."),
}


def task_from_config(t) -> TaskSpec:
    """Build the task from the `[task]` section: a built-in definition with overrides, or a
    custom one (name = 'custom') that must spell out columns, template and verbalizer."""
    if t.name in BUILTIN:
        spec = BUILTIN[t.name]
    elif t.name == "custom":
        missing = [k for k in ("text_columns", "template", "verbalizer") if not getattr(t, k)]
        if missing:
            raise ConfigError(f"task.name = 'custom' needs task.{', task.'.join(missing)}")
        spec = TaskSpec("custom", (), "label", "", {})
    else:
        raise ConfigError(f"task.name = '{t.name}' is not a built-in task "
                          f"({', '.join(sorted(BUILTIN))}) or 'custom'")
    over = {}
    if t.text_columns:
        over["text_columns"] = tuple(t.text_columns)
    if t.label_column:
        over["label_column"] = t.label_column
    if t.template:  # the user's template, for every kind of model
        over["template"], over["causal_template"] = t.template, ""
    if t.verbalizer:
        over["verbalizer"] = {str(k): v for k, v in t.verbalizer.items()}
    if t.text_columns or t.label_column:  # the user named the columns: no built-in aliases
        over["column_aliases"] = ()
    if t.metric:
        over["metric"] = t.metric
    if t.skip_labels:
        over["skip_labels"] = tuple(str(x) for x in t.skip_labels)
    if t.label_map:
        over["label_map"] = tuple((str(k), str(v)) for k, v in t.label_map.items())
    else:  # the built-in's map, for the labels the task ends up with; the user's own label values read as they are
        verb, skip = over.get("verbalizer", spec.verbalizer), over.get("skip_labels", spec.skip_labels)
        over["label_map"] = tuple((k, v) for k, v in spec.label_map if k not in verb and (v in verb or v in skip))
    spec = replace(spec, **over)
    check_spec(spec, "task")
    return spec


def check_spec(spec: TaskSpec, where: str = "task") -> None:
    """The template, columns and verbalizer fit together; each problem is its own error."""
    if not spec.text_columns or not all(isinstance(c, str) and c for c in spec.text_columns):
        raise ConfigError(f"{where}.text_columns must name at least one text column")
    fields = _FIELD.findall(spec.template)
    if not fields:
        raise ConfigError(f"{where}.template = {spec.template!r} has no text placeholder; "
                          f"put {{{spec.text_columns[0]}}} where the text goes")
    for c in spec.text_columns:
        if c not in fields:
            raise ConfigError(f"{where}.template = {spec.template!r} has no placeholder {{{c}}} for text column '{c}'")
    for f in fields:
        if f not in spec.text_columns:
            raise ConfigError(f"{where}.template: placeholder {{{f}}} is not one of {where}.text_columns "
                              f"({', '.join(spec.text_columns)})")
    if spec.template.count(ANSWER_SLOT) != 1:
        raise ConfigError(f"{where}.template = {spec.template!r} must hold the answer slot {ANSWER_SLOT} exactly once")
    if spec.template.count(PROMPT_SLOT) > 1:
        raise ConfigError(f"{where}.template = {spec.template!r} holds the prompt slot {PROMPT_SLOT} more than once")
    if PROMPT_SLOT in spec.template and spec.template.index(PROMPT_SLOT) > spec.template.index(ANSWER_SLOT):
        raise ConfigError(f"{where}.template = {spec.template!r}: the prompt slot {PROMPT_SLOT} must come before "
                          f"the answer slot {ANSWER_SLOT}")
    if len(spec.verbalizer) < 2:
        raise ConfigError(f"{where}.verbalizer needs at least two labels, got {dict(spec.verbalizer)}")
    for label, word in spec.verbalizer.items():
        if not isinstance(word, str) or not word.strip() or word != word.strip():
            raise ConfigError(f"{where}.verbalizer: label {label!r} maps to {word!r}; expected one word without spaces")
    dup = [w for w, n in Counter(spec.verbalizer.values()).items() if n > 1]
    if dup:
        raise ConfigError(f"{where}.verbalizer: word {dup[0]!r} is used for more than one label")
    for key, label in spec.label_map:
        if key in spec.verbalizer:
            raise ConfigError(f"{where}.label_map: {key!r} is itself a label of {where}.verbalizer; a file's label "
                              f"value must name one label (key the verbalizer by the file's values instead)")
        if label not in spec.verbalizer and label not in spec.skip_labels:
            raise ConfigError(f"{where}.label_map: {key!r} maps to {label!r}, which is not a label of "
                              f"{where}.verbalizer ({', '.join(repr(x) for x in spec.verbalizer)}) or of skip_labels")
    if spec.metric not in ("accuracy", "f1"):
        raise ConfigError(f"{where}.metric = {spec.metric!r} is not 'accuracy' or 'f1'")


def for_model(spec: TaskSpec, kind: str) -> TaskSpec:
    """The task as a model of this kind reads it. A causal LM predicts the label word from the
    text before the answer slot: it gets the task's causal template (when it has one), and a
    template in which the answer slot precedes every text field is refused (the model would
    never see the text, and score chance)."""
    if kind != "causal":
        return spec
    if spec.causal_template:
        spec = replace(spec, template=spec.causal_template, causal_template="")
        check_spec(spec, f"task '{spec.name}' (causal template)")
    head = spec.template.split(ANSWER_SLOT)[0]
    seen = [c for c in spec.text_columns if "{" + c + "}" in head]
    if not seen:
        raise ConfigError(f"task.template = {spec.template!r}: for a causal LM the label word is predicted from the "
                          f"text before {ANSWER_SLOT}, and no text field ({', '.join(spec.text_columns)}) comes before "
                          f"it; move {ANSWER_SLOT} after the text, e.g. '<P> . {{{spec.text_columns[-1]}}} . Answer: "
                          f"{ANSWER_SLOT} .'")
    if len(seen) < len(spec.text_columns):
        log.warning("task.template = %r: a causal LM does not see %s, which comes after %s", spec.template,
                    ", ".join(c for c in spec.text_columns if c not in seen), ANSWER_SLOT)
    return spec


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]  # one per text column, in order
    label: int  # index into the verbalizer
    source: str = ""


@dataclass(frozen=True)
class Rendered:
    """One example laid out around the two slots: text before the prompt, between the
    prompt and the answer, and after the answer."""

    before_prompt: str
    before_answer: str
    after_answer: str


def render(spec: TaskSpec, texts: tuple[str, ...] | list[str]) -> Rendered:
    """Fill the template's fields and cut it at the prompt slot and the answer slot."""
    values = dict(zip(spec.text_columns, texts))
    filled = _FIELD.sub(lambda m: values[m.group(1)], spec.template)
    if PROMPT_SLOT not in spec.template:
        filled = PROMPT_SLOT + filled
    head, _, rest = filled.partition(PROMPT_SLOT)
    mid, _, tail = rest.partition(ANSWER_SLOT)
    return Rendered(head, mid, tail)


def check_text(text: str, where: str) -> str:
    """Text fields may not hold the slot markers (the template would become ambiguous)."""
    for marker in (PROMPT_SLOT, ANSWER_SLOT):
        if marker in text:
            raise DataError(f"{where}: the text holds the literal marker {marker}, which the template reserves")
    return text


def hub_path(spec: TaskSpec, which: str) -> str:
    """The task's own Hugging Face dataset as a `hub:` path (used when no file is given)."""
    ds, cfg, train, test = spec.hub
    if not ds:
        raise ConfigError(f"task '{spec.name}' has no Hugging Face dataset; give task.train_path and task.test_path")
    return f"hub:{ds}{'@' + cfg if cfg else ''}:{train if which == 'train' else test}"


def _missing(where: str, kind: str, column: str, rec: dict, key: str) -> DataError:
    fields = [str(f) for f in rec]
    close = difflib.get_close_matches(column, fields, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return DataError(f"{where}: missing {kind} column {column!r} (fields: {', '.join(repr(f) for f in fields)}){hint}; "
                     f"set {key}")


def _column(rec: dict, name: str, aliases: dict) -> str | None:
    """The field of this record that holds column `name`: itself, or the first alias present."""
    if name in rec:
        return name
    return next((a for a in aliases.get(name, ()) if a in rec), None)


def load_examples(spec: TaskSpec, path: str, fmt: TableFormat = TableFormat()) -> list[Example]:
    """Read a data file into Examples; every label must be one of the verbalizer's."""
    if path.startswith(hub.PREFIX):
        records = hub.load_records(path)
    else:
        records = read_table(Path(path).expanduser(), fmt)
    label_index = {lab: i for i, lab in enumerate(spec.labels)}
    label_map = dict(spec.label_map)
    aliases = dict(spec.column_aliases)
    out = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with fields, got {type(rec).__name__}")
        key = _column(rec, spec.label_column, aliases)
        if key is None:
            raise _missing(where, "label", spec.label_column, rec, "task.label_column")
        raw = rec[key]
        label = str(int(raw)) if isinstance(raw, (int, float)) and not isinstance(raw, bool) and float(raw).is_integer() \
            else str(raw).strip()
        label = label_map.get(label, label)
        if label in spec.skip_labels:
            continue
        if label not in label_index:
            mapped = f" or task.label_map ({', '.join(f'{k!r} -> {v!r}' for k, v in label_map.items())})" \
                if label_map else ""
            raise DataError(f"{where}: label {label!r} is not in task.verbalizer{mapped} "
                            f"(labels: {', '.join(repr(x) for x in spec.labels)}); map the file's label values "
                            f"with task.label_map or set task.verbalizer with them")
        texts = []
        for c in spec.text_columns:
            key = _column(rec, c, aliases)
            if key is None:
                raise _missing(where, "text", c, rec, "task.text_columns")
            v = rec[key]
            if not isinstance(v, str):
                raise DataError(f"{where}: field '{c}' must be text, got {type(v).__name__}")
            # GLUE keeps a trailing space; Yelp has literal \n
            texts.append(check_text(" ".join(v.replace("\\n", " ").split()), where))
        out.append(Example(tuple(texts), label_index[label], where))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


# ----------------------------------------------------------------------------- few-shot splits


@dataclass
class FewShot:
    train: list[Example]
    dev: list[Example]
    counts: dict = field(default_factory=dict)  # label index -> rows available


def few_shot(examples: list[Example], spec: TaskSpec, k_shot: int, dev_shots: int, seed: int,
             source: str = "") -> FewShot:
    """k_shot rows per class for training and dev_shots more per class for the dev split, disjoint,
    drawn with a seeded shuffle (BBT's true few-shot setting). k_shot = 0 keeps every row for
    training except dev_shots per class."""
    rng = np.random.default_rng([seed, 0xF5])
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    train, dev = [], []
    for li, label in enumerate(spec.labels):
        idx = by_label.get(li, [])
        need = (k_shot if k_shot > 0 else 1) + dev_shots
        if len(idx) < need:
            raise DataError(f"{source or 'training data'}: class {label!r} ({spec.verbalizer[label]}) has {len(idx)} "
                            f"rows; task.k_shot = {k_shot} plus task.dev_shots = {dev_shots} need {need}")
        perm = [idx[j] for j in rng.permutation(len(idx))]
        dev += perm[:dev_shots]
        train += perm[dev_shots:dev_shots + k_shot] if k_shot > 0 else perm[dev_shots:]
    return FewShot([examples[i] for i in sorted(train)], [examples[i] for i in sorted(dev)],
                   {spec.labels[k]: len(v) for k, v in by_label.items()})


def space_before_answer(spec: TaskSpec) -> bool:
    """Whether the label word follows a space in the template (then it is tokenized with one)."""
    head = spec.template.split(ANSWER_SLOT)[0]
    return head == "" or head[-1].isspace()
