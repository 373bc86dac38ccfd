"""LoRA dropout's cost in one flat-packed training step of the embedded model: PEFT's
`nn.Dropout` (`bernoulli_`) against fedtune's `FastDropout` (fedtune/fedit/fast_dropout.py),
the figures behind docs/benchmarks.md's AVX2 section and fast_dropout.py's docstring.

Prints: one `F.dropout` call and one `FastDropout` call on the step's LoRA input shape (median
of 20); the torch.profiler table of one step with PEFT's dropout; then seconds per step with
each, alternating (--reps pairs, 3 timed steps each after one warm-up).

Run:  .venv/bin/python benchmarks/lora_dropout_step.py [--reps 2]
8 rows of 45-335 random tokens (1,460 in all; 40% of each row unlabelled), one micro-batch, flat
packing, the default config's LoRA (r = 8 on q/v, dropout 0.05) and autocast.
"""

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import flat_step  # benchmarks/flat_step.py: the model and the flat batch
from fedtune.fedit.fast_dropout import FastDropout, fast_lora_dropout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    cfg, lm, model, opt, p, labelled = flat_step.setup()

    x = torch.randn(p.tokens, lm.model.config.hidden_size)
    for name, fn in (("F.dropout", lambda: torch.nn.functional.dropout(x, cfg.lora.dropout, True)),
                     ("FastDropout", lambda: FastDropout(cfg.lora.dropout).train()(x))):
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(f"{name} on {tuple(x.shape)}: {1e3 * statistics.median(times[1:]):.2f} ms per call (median of 20)")

    def step():
        flat_step.step(lm, model, opt, p, labelled)

    model.train()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    for rep in range(args.reps):
        for fast in (False, True):
            with fast_lora_dropout(model, fast):
                step()
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                secs = (time.perf_counter() - t0) / 3
            print(f"rep {rep + 1}: {'FastDropout' if fast else 'PEFT nn.Dropout'}: {secs:.3f} s per step "
                  f"({p.tokens / secs:.1f} tokens/s)")


if __name__ == "__main__":
    main()
