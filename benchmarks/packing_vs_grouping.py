"""One optimizer batch of Dolly rows, trained as length-grouped micro-batches (fedtune's
default), as packed rows with a block-diagonal mask (`train.packing = "on"`) and flat-packed
(`train.packing = "flat"`: one row, each example's attention computed on its own segment,
fedtune/fedit/flat_attention.py): tokens processed, attention scores per head and layer, and
seconds per forward+backward, alternating in one process. The figures behind
docs/benchmarks.md's packing paragraph.

Run:  .venv/bin/python benchmarks/packing_vs_grouping.py [--rows 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly15k" / "databricks-dolly-15k.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if not DOLLY.is_file():
        raise SystemExit(f"{DOLLY} not found: this benchmark needs ../shared/data/dolly15k")

    from fedtune import config as C
    from fedtune.data.instructions import PromptFormatter, load_rows, tokenize_rows
    from fedtune.fedit import flat_attention, packing
    from fedtune.fedit.lora import attach_lora
    from fedtune.fedit.train import causal_lm_loss, collate, micro_batches, padded_width
    from fedtune.models import load_causal_lm

    cfg = C.load(None, [f"train.batch_size={args.rows}", f"train.micro_batch_size={args.rows}"])
    lm = load_causal_lm(cfg.model)
    model = attach_lora(lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    model.get_base_model().set_attn_implementation("eager")  # what train.attention = "auto" trains with on CPU
    rows = load_rows(str(DOLLY))
    pick = np.random.default_rng(0).choice(len(rows), 12 * args.rows, replace=False)
    data = tokenize_rows([rows[i] for i in pick], PromptFormatter("alpaca", lm.tokenizer), 512,
                         train_on_inputs=False, too_long="drop")[:args.rows]
    cpu = torch.device("cpu")
    packed = packing.collate_packed(data, 0, cpu, padded_width)
    flat = packing.collate_flat(data, 0, cpu, padded_width)
    grouped = [collate(g, 0, cpu) for g in micro_batches(data, cfg.train)]
    print(f"row lengths {sorted(len(t) for t in data)} ({sum(len(t) for t in data)} real tokens)")
    print(f"grouped: {[tuple(ids.shape) for ids, _, _ in grouped]}: {sum(ids.numel() for ids, _, _ in grouped)} "
          f"tokens, {sum(ids.shape[0] * ids.shape[1] ** 2 for ids, _, _ in grouped):,} scores per head and layer")
    print(f"packed:  [{tuple(packed.ids.shape)}]: {packed.ids.numel()} tokens, "
          f"{packed.ids.shape[0] * packed.ids.shape[1] ** 2:,} scores per head and layer")
    print(f"flat:    [{tuple(flat.ids.shape)}]: {flat.ids.numel()} tokens, "
          f"{sum(len(t) ** 2 for t in data):,} scores per head and layer")
    base = model.get_base_model()
    flat_impl = flat_attention.register()
    model.train()

    def run_grouped():
        for ids, mask, labels in grouped:
            with lm.autocast():
                causal_lm_loss(model, ids, mask, labels, "sum").backward()

    def run_packed():
        with lm.autocast():
            causal_lm_loss(model, packed.ids, None, packed.labels, "sum", packed.position_ids).backward()

    def run_flat():
        base.set_attn_implementation(flat_impl)
        try:
            with lm.autocast():
                causal_lm_loss(model, flat.ids, None, flat.labels, "sum", flat.position_ids,
                               flat.decoder_kwargs).backward()
        finally:
            base.set_attn_implementation("eager")

    for rep in range(args.reps + 1):  # the first pair is a warm-up (new shapes)
        times = {}
        for name, fn in (("grouped", run_grouped), ("packed", run_packed), ("flat", run_flat)):
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
        tag = "warm-up" if rep == 0 else f"rep {rep}"
        print(f"{tag}: forward+backward grouped {times['grouped']:.2f} s · packed {times['packed']:.2f} s · "
              f"flat {times['flat']:.2f} s")


if __name__ == "__main__":
    main()
