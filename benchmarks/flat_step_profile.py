"""Where one flat-packed training step of the embedded model spends its time, as a local round
runs it on CPU (fast LoRA dropout, Llama-style RMSNorm with its frozen weight, the LoRA inputs
left in autocast's dtype, the fused head loss, flat attention): seconds per step, then the
torch.profiler tables of one step by operator and by operator and input shape. The profile
behind docs/benchmarks.md's AVX512-BF16 sections.

Run:  .venv/bin/python benchmarks/flat_step_profile.py [--rows 20]
8 rows of 45-335 random tokens (1,450 in all, 870 labelled), one micro-batch, the default
config's LoRA and autocast (model.dtype as the config resolves it); 2 warm-up steps, 3 timed,
then one profiled.
"""

import argparse
import time

from peft.helpers import disable_input_dtype_casting
from torch.profiler import ProfilerActivity, profile

import flat_step  # benchmarks/flat_step.py: the model and the flat batch
from fedtune.fedit.fast_dropout import fast_lora_dropout
from fedtune.fedit.fast_norm import fast_rms_norm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20, help="rows of each table")
    args = ap.parse_args()
    cfg, lm, model, opt, p, labelled = flat_step.setup()

    def step():
        flat_step.step(lm, model, opt, p, labelled)

    model.train()
    with fast_lora_dropout(model), fast_rms_norm(model), disable_input_dtype_casting(model):
        step()
        step()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        secs = (time.perf_counter() - t0) / 3
        for _ in range(2):  # the second: the first profiled step runs slower (the profiler's own warm-up)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                step()
    print(f"weights {next(lm.model.parameters()).dtype}, {p.tokens} tokens, {labelled} labelled: {secs:.3f} s per step "
          f"(mean of 3), {p.tokens / secs:.1f} tokens/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                              max_name_column_width=30))


if __name__ == "__main__":
    main()
