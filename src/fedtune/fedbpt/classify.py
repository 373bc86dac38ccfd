"""Label new text with a saved global prompt (`fedtune classify`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from fedtune.config import FedBPTSection
from fedtune.errors import ConfigError, DataError, FedtuneError
from fedtune.fedbpt.loading import load_blackbox
from fedtune.fedbpt.prompt import Projection, ProjectionSpec, load_prompt
from fedtune.fedbpt.calibration import calibrate, content_free_texts
from fedtune.fedbpt.table import read_table
from fedtune.fedbpt.tasks import TaskSpec, check_text, space_before_answer


def read_inputs(spec: TaskSpec, texts: list[str], file: str | None) -> list[tuple[str, ...]]:
    """Rows of text fields: --text values (one-field tasks), and/or a file: .txt (one text per
    line, one-field tasks) or .csv/.tsv/.jsonl/.json with the task's text columns."""
    rows = []
    one_field = len(spec.text_columns) == 1
    if texts and not one_field:
        raise ConfigError(f"task '{spec.name}' has {len(spec.text_columns)} text fields "
                          f"({', '.join(spec.text_columns)}): give them in a --file with those columns")
    rows += [(check_text(t, "--text"),) for t in texts]
    if file:
        p = Path(file)
        if p.suffix == ".txt":
            if not one_field:
                raise ConfigError(f"task '{spec.name}' needs columns {', '.join(spec.text_columns)}: use a .jsonl/.csv/.tsv file")
            if not p.is_file():
                raise DataError(f"file not found: {p}")
            rows += [(check_text(line.strip(), f"{p}:{i}"),)
                     for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        else:
            for where, rec in read_table(p):
                missing = [c for c in spec.text_columns if c not in rec]
                if missing:
                    raise DataError(f"{where}: missing text column '{missing[0]}'")
                rows.append(tuple(check_text(" ".join(str(rec[c]).split()), where) for c in spec.text_columns))
    if not rows:
        raise ConfigError("give at least one --text TEXT or a --file")
    return rows


def classify(prompt_dir: str | Path, rows: list[tuple[str, ...]], model_cfg, model_name: str | None = None,
             batch_size: int = 32) -> list[dict]:
    """Predicted label, word and class probabilities for each row under the saved prompt."""
    z, embeds, meta = load_prompt(Path(prompt_dir))
    spec = TaskSpec.from_json(meta["task"])
    proj = Projection(ProjectionSpec.from_json(meta["projection"]))
    deep = meta.get("deep_embeds")  # a deep prompt's per-layer offsets (checked against the model below)
    rebuilt = proj(z[0] if deep is not None else z)[0]
    if not np.allclose(rebuilt, embeds, rtol=1e-4, atol=1e-5):  # A is rebuilt from the seed: it must agree
        raise FedtuneError(f"{prompt_dir}: prompt_embeds differ from A z rebuilt from the saved seed and settings")
    deep = None if deep is None else deep[None]
    bb = meta["blackbox"]
    model_cfg.name = model_name or meta["model"]
    # the [fedbpt] keys the black box reads: the saved prompt's, every other at its default
    settings = replace(FedBPTSection(), model_kind=bb["kind"], n_prompt_tokens=bb["n_prompt_tokens"],
                       prompt_mode=bb["prompt_mode"], init_prompt=bb.get("init_prompt", ""),
                       max_seq_len=int(meta.get("max_seq_len", 256)))
    box = load_blackbox(model_cfg, settings)
    if box.hidden_size != proj.spec.hidden_size:
        raise FedtuneError(f"model '{model_cfg.name}' has hidden size {box.hidden_size}; the prompt was tuned for "
                           f"{proj.spec.hidden_size} ({meta['model']})")

    label_ids = box.label_token_ids(spec.words, space_before_answer(spec))
    cal = meta.get("calibration", "none")  # as the run evaluated it (batch: over the rows given here)
    cf = None
    if cal == "content_free":
        cf = box.logits(embeds[None], box.encode_texts(spec, content_free_texts(len(spec.text_columns))), label_ids, deep)
    scored = [(chunk, box.logits(embeds[None], box.encode_texts(spec, chunk), label_ids, deep))
              for chunk in (rows[i:i + batch_size] for i in range(0, len(rows), batch_size))]
    if cal != "none":
        every = calibrate(cal, np.concatenate([lg for _, lg in scored], axis=1), cf)
        at = np.cumsum([0] + [lg.shape[1] for _, lg in scored])
        scored = [(chunk, every[:, at[k]:at[k + 1]]) for k, (chunk, _) in enumerate(scored)]
    out = []
    for chunk, lg in scored:
        logits = lg[0]  # (B, C)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        for texts, probs in zip(chunk, p):
            k = int(np.argmax(probs))
            out.append({"text": texts[0] if len(texts) == 1 else dict(zip(spec.text_columns, texts)),
                        "label": spec.labels[k], "word": spec.words[k],
                        "probs": {w: round(float(q), 4) for w, q in zip(spec.words, probs)}})
    return out
