"""One local training step of the embedded model, timed and profiled (torch.profiler), under a
choice of base-weight dtype, train.compile and attention kernel: the figures of
docs/benchmarks.md's AMX section (seconds per step, the top operators).

Run:  .venv/bin/python benchmarks/train_step_profile.py DTYPE COMPILE [ATTENTION]
      e.g. float32 off sdpa · float32 off eager · float32 layers eager · bfloat16 layers eager
8 rows x 160 random tokens, half of each row labelled, bf16 autocast where the CPU has it;
3 warm-up steps, 3 timed steps, then one profiled step.
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fedtune import config as C
from fedtune.fedit.lora import attach_lora
from fedtune.fedit.train import causal_lm_loss
from fedtune.fedit.train_speed import compiled_layers
from fedtune.models import load_causal_lm


def main(dtype: str, compile_setting: str, attention: str | None = None) -> None:
    torch.manual_seed(0)
    cfg = C.load(None, [f"model.dtype='{dtype}'"])
    lm = load_causal_lm(cfg.model)
    model = attach_lora(lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rows, width = 8, 160
    ids = torch.randint(0, 40000, (rows, width))
    mask = torch.ones(rows, width, dtype=torch.long)
    labels = ids.clone()
    labels[:, : width // 2] = -100
    if attention:
        lm.model.set_attn_implementation(attention)
    print(f"dtype {dtype} · train.compile {compile_setting} · attention {lm.model.config._attn_implementation}")

    def step():
        with lm.autocast():
            loss = causal_lm_loss(model, ids, mask, labels, reduction="sum") / (rows * width // 2)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    with compiled_layers(model, compile_setting):
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        secs = (time.perf_counter() - t0) / 3
        print(f"{secs:.3f} s per step · {rows * width / secs:.1f} tokens/s")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main(*sys.argv[1:4])
