"""The bare decoder's forward speed on this machine: where batching stops paying.

Tokens per second of the embedded model's decoder (bf16 weights, no LM head, inference
mode) on batches of B rows of 24 tokens (SST-2-sized rows), B = 1 ... 88; the share of
forward time spent in matrix multiplies (torch.profiler, aten::mm self time) at the largest
batch; and, with --compile, the same batches through `torch.compile(dynamic=True)` with
the time of the first (compiling) call.

This is the ceiling behind the FedBPT batched-population ratio in docs/benchmarks.md: a
batched population can at most move from the tokens/s of one candidate's rows to the
saturated tokens/s of a large batch.

Run:  .venv/bin/python benchmarks/decoder_forward.py [--compile]     (1-2 minutes; +2 with --compile)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def tokens_per_s(fn, hidden: int, b: int, t: int, reps: int) -> tuple[float, float]:
    import torch

    x = torch.randn(b, t, hidden, dtype=torch.bfloat16) * 0.02
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -3:] = 0  # one padded row, as in a real batch
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn(inputs_embeds=x, attention_mask=mask, use_cache=False)
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(inputs_embeds=x, attention_mask=mask, use_cache=False)
            times.append(time.perf_counter() - t0)
    return b * t / statistics.median(times), first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="decoder forward tokens/s by batch size")
    ap.add_argument("--batches", default="1,4,11,44,88")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import profile

    from fedtune import config as C
    from fedtune.models import load_causal_lm

    cfg = C.load(None, ["model.dtype='bfloat16'"])
    model = load_causal_lm(cfg.model).model.eval()
    body, hidden = model.get_decoder(), model.config.hidden_size
    print(f"load average at start: {os.getloadavg()} · torch threads {torch.get_num_threads()} · "
          f"attention {model.config._attn_implementation}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    eager = {b: tokens_per_s(body, hidden, b, args.tokens, args.reps)[0] for b in batches}
    x = torch.randn(batches[-1], args.tokens, hidden, dtype=torch.bfloat16) * 0.02
    with torch.inference_mode(), profile() as prof:
        for _ in range(2):
            body(inputs_embeds=x, use_cache=False)
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    mm_share = ops.get("aten::mm", 0.0) / max(sum(ops.values()), 1e-9)
    compiled = {}
    if args.compile:
        fn = torch.compile(body, dynamic=True)
        compiled = {b: tokens_per_s(fn, hidden, b, args.tokens, args.reps) for b in batches}
    print(f"\n{'rows':>5} {'tokens':>7} {'eager tok/s':>12}" + (f" {'compiled tok/s':>15} {'first call s':>13}" if compiled else ""))
    for b in batches:
        line = f"{b:5d} {b * args.tokens:7d} {eager[b]:12.0f}"
        if compiled:
            line += f" {compiled[b][0]:15.0f} {compiled[b][1]:13.1f}"
        print(line)
    print(f"largest / smallest batch: {eager[batches[-1]] / eager[batches[0]]:.2f}x · "
          f"share of forward time in aten::mm at {batches[-1]} rows: {100 * mm_share:.0f}%")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "eager": eager, "mm_share": mm_share,
                                               "compiled": {b: {"tokens_per_s": v[0], "first_call_s": v[1]}
                                                            for b, v in compiled.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
