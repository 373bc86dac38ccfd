"""The one flat-packed training step that benchmarks/lora_dropout_step.py and
benchmarks/head_loss_step.py time: the embedded model with the default config's LoRA, and 8 rows
of 45-335 random tokens (1,450 in all; 40% of each row unlabelled) laid out as one micro-batch."""

import torch

from fedtune import config as C
from fedtune.data.instructions import Tokenized
from fedtune.fedit import flat_attention, packing
from fedtune.fedit.lora import attach_lora
from fedtune.fedit.train import padded_width
from fedtune.models import load_causal_lm

LENGTHS = (45, 90, 120, 160, 180, 220, 300, 335)


def setup(overrides=()):
    """(cfg, loaded model, PEFT model, AdamW over the LoRA weights, flat batch, labelled positions)."""
    torch.manual_seed(0)
    cfg = C.load(None, list(overrides))
    lm = load_causal_lm(cfg.model)
    model = attach_lora(lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in LENGTHS:
        ids = torch.randint(0, 40000, (n,), generator=g).tolist()
        rows.append(Tokenized(ids, [-100] * (n * 4 // 10) + ids[n * 4 // 10:]))
    batch = packing.collate_flat(rows, 0, torch.device("cpu"), padded_width)
    lm.model.set_attn_implementation(flat_attention.register())
    return cfg, lm, model, opt, batch, int((batch.labels != -100).sum())


def alternate(forms: dict, step_with, reps: int) -> dict:
    """Seconds per step of each form, alternating: per rep and form, `step_with(form)` once as a
    warm-up and twice timed. Prints each, the medians, and the median over reps of each form's
    time over the first form's in the same rep (robust to the machine's speed drifting between
    reps); returns {name: median seconds}."""
    import statistics
    import time

    times = {k: [] for k in forms}
    for rep in range(reps):
        for name, form in forms.items():
            for i in range(3):
                if i == 1:
                    t0 = time.perf_counter()
                step_with(form)
            times[name].append((time.perf_counter() - t0) / 2)
            print(f"rep {rep + 1}: {name}: {times[name][-1]:.3f} s per step", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("medians: " + " · ".join(f"{k} {v:.3f} s" for k, v in med.items()))
    first = next(iter(times))
    for k in list(times)[1:]:
        ratio = statistics.median(a / b for a, b in zip(times[first], times[k]))
        print(f"{first} / {k}, median of the per-rep ratios: {ratio:.3f}x")
    return med
