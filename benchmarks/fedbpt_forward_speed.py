"""Forward speed of the embedded model behind the FedBPT black box: torch threads (1 vs 2)
and weight dtype (float32 under bf16 autocast vs bf16 weights), on real SST-2 rows; and the
zero-prompt accuracy with both dtypes (bf16 activations may flip a few rows).

    .venv/bin/python benchmarks/fedbpt_forward_speed.py      # writes docs/fedbpt_forward_speed.json

Each setting runs in its own process (torch's thread count is fixed once work has started).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "data" / "glue_sst2" / "dev.tsv"


def child(threads: int, dtype: str, rows: int, reps: int, acc_rows: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "src"))
    from fedtune import config as C
    from fedtune.fedbpt import objective as O
    from fedtune.fedbpt.loading import load_blackbox
    from fedtune.fedbpt.session import encode_eval
    from fedtune.fedbpt.tasks import space_before_answer
    from fedtune.fedbpt.tasks import BUILTIN, load_examples

    spec = BUILTIN["sst2"]
    cfg = C.load(None, [f"model.dtype='{dtype}'", "model.autocast='auto'", "run.algorithm='fedbpt'",
                        "fedbpt.n_prompt_tokens=10", "fedbpt.prompt_mode='add'", "fedbpt.max_forward_rows=4096"])
    box = load_blackbox(cfg.model, cfg.fedbpt)  # every [fedbpt] key at its default but these
    ids = box.label_token_ids(spec.words, space_before_answer(spec))
    examples = load_examples(spec, str(DEV))
    enc = box.encode_texts(spec, [e.texts for e in examples[:rows]])
    box.logits(None, enc, ids)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        box.logits(None, enc, ids)
        times.append(time.perf_counter() - t)
    sec = sorted(times)[len(times) // 2]
    out = {"threads": threads, "dtype": dtype, "amp": str(box._amp_dtype), "rows": rows, "tokens": enc.tokens,
           "padded_tokens": int(enc.input_ids.size), "seconds_median": sec, "tokens_per_s": enc.tokens / sec}
    if acc_rows:
        sub = examples[::max(1, len(examples) // acc_rows)][:acc_rows]
        ev = encode_eval(box, spec, sub, 64)
        lg = np.concatenate([box.logits(None, e, ids)[0] for e, _ in ev.batches])[None]
        y = np.concatenate([yy for _, yy in ev.batches])
        out.update(acc_rows=len(y), zero_prompt_accuracy=float(O.accuracy(lg, y)[0]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16, help="rows per forward")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--acc-rows", type=int, default=218)
    p.add_argument("--out", default=str(ROOT / "docs" / "fedbpt_forward_speed.json"))
    p.add_argument("--child", nargs=2, metavar=("THREADS", "DTYPE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(int(a.child[0]), a.child[1], a.rows, a.reps, a.acc_rows)))
        return 0
    results = []
    for threads in (1, 2):
        for dtype in ("float32", "bfloat16"):
            acc = a.acc_rows if threads == 1 else 0
            r = subprocess.run([sys.executable, __file__, "--child", str(threads), dtype, "--rows", str(a.rows),
                                "--reps", str(a.reps), "--acc-rows", str(acc)], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                return 1
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    Path(a.out).write_text(json.dumps({"command": " ".join([".venv/bin/python", "benchmarks/fedbpt_forward_speed.py",
                                                            *sys.argv[1:]]), "loadavg_after": load,
                                       "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
