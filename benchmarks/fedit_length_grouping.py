"""FedIT local training on variable-length data: micro-batches grouped by length
(`train.group_by_length = true`) vs one micro-batch per optimizer batch (the default).

Both sides run fedtune's `train_local` on the same Dolly rows, in the same seeded order, with
the same model, LoRA and batch size (8, cutoff 512: Shepherd's settings). They alternate in one
process, `--reps` blocks each; the first optimizer step of every block is a warm-up. Tokens/s
counts non-pad tokens through forward and backward. Also printed: the padded tokens each side
feeds the model, micro-batches per step, and the process's RSS after each side's blocks
(more micro-batch shapes make oneDNN build and keep more kernels).

Run:  .venv/bin/python benchmarks/fedit_length_grouping.py      (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DOLLY, fedtune_block, fedtune_order, model_shape, timed  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per timed block (the first is a warm-up)")
    ap.add_argument("--reps", type=int, default=3, help="blocks per side, alternating")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cutoff-len", type=int, default=512)
    ap.add_argument("--overhead", type=int, default=256, help="train.micro_batch_overhead_tokens")
    ap.add_argument("--demo-batches", type=int, default=2000, help="random demo batches checked for splitting")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if not DOLLY.is_file():
        print(f"skipped: {DOLLY} not found")
        return 0
    import psutil

    from fedtune import config as C
    from fedtune.data.instructions import PromptFormatter, load_rows, tokenize_rows
    from fedtune.fedit.lora import AdapterSlot, attach_lora
    from fedtune.fedit.train import micro_batches, padded_width
    from fedtune.models import load_causal_lm

    def cfg_for(grouped: bool):
        return C.load(None, [f"train.batch_size={args.batch_size}", f"train.micro_batch_size={args.batch_size}",
                             f"train.max_steps={args.steps}", f"train.group_by_length={str(grouped).lower()}",
                             f"train.micro_batch_overhead_tokens={args.overhead}"])

    cfgs = {False: cfg_for(False), True: cfg_for(True)}
    torch.manual_seed(0)
    lm = load_causal_lm(cfgs[False].model)
    lora = cfgs[False].lora
    peft_model = attach_lora(lm.model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    slot = AdapterSlot(peft_model)
    start = slot.get()
    shape = model_shape(peft_model)
    rows = load_rows(str(DOLLY))
    n_rows = args.steps * args.batch_size
    pick = np.random.default_rng(0).choice(len(rows), size=n_rows * 2, replace=False)
    data = tokenize_rows([rows[i] for i in pick], PromptFormatter("alpaca", lm.tokenizer), args.cutoff_len,
                         train_on_inputs=False, too_long="drop")[:n_rows]
    seed = 1234
    ordered = [data[i] for i in fedtune_order(len(data), seed, n_rows)]
    batches = [ordered[i:i + args.batch_size] for i in range(0, n_rows, args.batch_size)]
    print(f"load average at start: {os.getloadavg()}")
    print(f"model {lm.path} · batch {args.batch_size} · cutoff {args.cutoff_len} · {args.steps} steps x {args.reps} "
          f"blocks per side · {sum(len(t) for t in ordered) / n_rows:.0f} tokens/row · torch threads {torch.get_num_threads()}")
    names = {False: "one micro-batch", True: "grouped by length"}
    plan = {}
    for g, cfg in cfgs.items():
        groups = [micro_batches(b, cfg.train) for b in batches[1:]]  # timed steps only
        plan[g] = {"padded_tokens": sum(len(m) * padded_width(max(len(t) for t in m)) for gs in groups for m in gs),
                   "micro_batches_per_step": sum(len(gs) for gs in groups) / len(groups)}
    real = sum(len(t) for b in batches[1:] for t in b)
    # the packaged demo's rows (chat template, cutoff 256): does grouping ever split a batch of 8?
    from fedtune.data import skills

    demo = tokenize_rows(skills.generate(240, 0), PromptFormatter("chat", lm.tokenizer), 256, train_on_inputs=False)
    draw = np.random.default_rng(0)
    demo_split = sum(len(micro_batches([demo[i] for i in draw.choice(len(demo), 8, replace=False)], cfgs[True].train)) > 1
                     for _ in range(args.demo_batches))
    demo_lengths = [len(t) for t in demo]
    print(f"demo rows {min(demo_lengths)}-{max(demo_lengths)} tokens: {demo_split} of {args.demo_batches} random "
          f"batches of 8 split by length grouping")
    runs = {False: [], True: []}
    rss = {}
    for rep in range(args.reps):
        for g in (False, True):
            slot.set(start)  # every block from the same adapter
            st = fedtune_block(peft_model, list(slot.params.values()), data, cfgs[g].train, lm.tokenizer.pad_token_id,
                               lm.autocast, seed)
            runs[g].append(timed(st, batches, shape))
            rss[g] = psutil.Process().memory_info().rss / 2**20
            s, tok, _ = runs[g][-1]
            print(f"  block {rep + 1} {names[g]:18}: {tok / s:7.1f} tokens/s", flush=True)
    out = {"real_tokens": real, "sides": {}, "demo": {"batches": args.demo_batches, "split": demo_split,
                                                      "min_tokens": min(demo_lengths), "max_tokens": max(demo_lengths)}}
    for g in (False, True):
        tps = statistics.median(x[1] / x[0] for x in runs[g])
        out["sides"][names[g]] = {"tokens_per_s": tps, **plan[g], "rss_mb_after": rss[g],
                                  "blocks": [{"seconds": round(x[0], 3), "tokens": x[1]} for x in runs[g]]}
    a, b = out["sides"][names[False]], out["sides"][names[True]]
    out["ratio"] = b["tokens_per_s"] / a["tokens_per_s"]
    out["ratio_per_block"] = [(y[1] / y[0]) / (x[1] / x[0]) for x, y in zip(runs[False], runs[True])]
    print(f"\n{'side':18} {'tokens/s':>9} {'padded / real tokens':>21} {'micro-batches/step':>19} {'RSS after (MB)':>15}")
    for name, r in out["sides"].items():
        print(f"{name:18} {r['tokens_per_s']:9.1f} {r['padded_tokens'] / real:21.2f} {r['micro_batches_per_step']:19.2f} "
              f"{r['rss_mb_after']:15.0f}")
    print(f"grouped / one micro-batch: {out['ratio']:.2f}x (per block: "
          + ", ".join(f"{x:.2f}" for x in out["ratio_per_block"]) + ")")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
