"""How much the starting point moves FedBPT's zero prompt: SST-2 accuracy of the untuned
embedded SmolLM2-135M-Instruct on all 872 rows of GLUE's dev file (what FedBPT calls "test"),
per template, label-word pair (with and without the leading space BPE vocabularies
distinguish) and calibration (none / batch / content-free).

This is a map, not a selection: it is scored on the test file, so picking the best row from
it would be selecting on test. A run must choose its starting point on its dev split (rows
drawn from the training file); this table only shows how large the lever is.

Run:  .venv/bin/python benchmarks/fedbpt_zero_prompt.py --json docs/benchmarks/fedbpt_zero_prompt.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "glue_sst2" / "dev.tsv"
WORDS = [("bad", "great"), ("bad", "good"), ("terrible", "great"), ("negative", "positive")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not DEV.is_file():
        print(f"skipped: {DEV} is absent (../shared/data holds GLUE SST-2)", file=sys.stderr)
        return 0

    from fedtune import config as C
    from fedtune.fedbpt.calibration import calibrate, content_free_texts
    from fedtune.fedbpt.session import FedBPTModel
    from fedtune.fedbpt.tasks import load_examples, task_from_config

    cfg = C.load(str(ROOT / "configs" / "fedbpt_sst2_bbt.toml"), [])
    model = FedBPTModel(cfg, task_from_config(cfg.task))
    box, tok = model.box, model.box.tokenizer
    rows = load_examples(model.spec, str(DEV))
    y = np.array([e.label for e in rows])
    chat = tok.apply_chat_template([{"role": "user", "content": "<P> {sentence} Is this review positive or negative?"}],
                                   tokenize=False, add_generation_prompt=True) + "<mask>"
    templates = {"BBT: <P> . {sentence} . It was <mask> .": "<P> . {sentence} . It was <mask> .",
                 "<P> Review: {sentence} Sentiment: <mask>": "<P> Review: {sentence} Sentiment: <mask>",
                 "{sentence} . <P> . It was <mask> .": "{sentence} . <P> . It was <mask> .",
                 "chat format, question in the user turn": chat}
    out, t0 = [], time.perf_counter()
    for name, template in templates.items():
        spec = replace(model.spec, template=template)
        enc = box.encode_texts(spec, [e.texts for e in rows])
        cf_enc = box.encode_texts(spec, content_free_texts(1))
        for space in (True, False):  # one forward per template and spacing scores every candidate word
            vocab = {}
            for w in sorted({w for pair in WORDS for w in pair}):
                ids = tok((" " + w) if space else w, add_special_tokens=False)["input_ids"]
                if len(ids) == 1:
                    vocab[w] = ids[0]
            words = list(vocab)
            all_lg = box.logits(None, enc, [vocab[w] for w in words])
            all_cf = box.logits(None, cf_enc, [vocab[w] for w in words])
            for neg, pos in WORDS:
                if neg not in vocab or pos not in vocab:
                    continue  # a word that is not one token with this spacing
                cols = [words.index(neg), words.index(pos)]
                lg, cf = all_lg[..., cols], all_cf[..., cols]
                acc = {kind: float((calibrate(kind, lg, cf if kind == "content_free" else None).argmax(-1)[0] == y).mean())
                       for kind in ("none", "batch", "content_free")}
                out.append({"template": name, "words": f"{neg} / {pos}", "space": space, **acc})
                print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    lines = ["| template | words | leading space | none | batch | content-free |", "|---|---|---|---:|---:|---:|"]
    for r in out:
        lines.append(f"| {r['template']} | {r['words']} | {'yes' if r['space'] else 'no'} | {100 * r['none']:.1f}% | "
                     f"{100 * r['batch']:.1f}% | {100 * r['content_free']:.1f}% |")
    print("\n".join(lines))
    print(f"majority class: {100 * max(y.mean(), 1 - y.mean()):.1f}% · {len(y)} rows · {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": out, "table": lines, "majority": float(max(y.mean(), 1 - y.mean()))},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
