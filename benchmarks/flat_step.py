"""The one flat-packed training step that the step benchmarks (lora_dropout_step.py,
head_loss_step.py, flat_attention_step.py, lora_input_cast_step.py, rms_norm_step.py,
flat_step_profile.py) time: the embedded model with the default config's LoRA, and 8 rows of
45-335 random tokens (1,450 in all; 40% of each row unlabelled) laid out as one micro-batch; and
the side-by-side loop they share."""

import statistics
import time

import torch

from fedtune import config as C
from fedtune.data.instructions import Tokenized
from fedtune.fedit import flat_attention, packing
from fedtune.fedit.fast_dropout import fast_lora_dropout
from fedtune.fedit.lora import attach_lora
from fedtune.fedit.train import causal_lm_loss, padded_width
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


def step(lm, model, opt, p, labelled: int, update: bool = True):
    """One training step on the flat batch `p` under the model's autocast (the loss a token mean);
    returns (loss, the LoRA gradients)."""
    with lm.autocast():
        loss = causal_lm_loss(model, p.ids, None, p.labels, "sum", p.position_ids, p.decoder_kwargs) / labelled
    loss.backward()
    if update:
        opt.step()
    grads = [x.grad.clone() for x in model.parameters() if x.requires_grad]
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def same_step(forms: dict, step_with, model) -> None:
    """Each form once without dropout or update (`step_with(form, update=False)` returning
    (loss, grads)): prints each loss and how far its LoRA gradients are from the first form's, as a
    share of their largest entry (0: identical)."""
    model.eval()
    results = {name: step_with(form, update=False) for name, form in forms.items()}
    model.train()
    first = next(iter(results.values()))[1]
    for name, (loss, grads) in results.items():
        gap = max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(grads, first))
        print(f"{name}: loss {loss:.5f}; LoRA gradients differ from the first form's by at most {gap:.2e} "
              "of their largest entry")


def ab(forms: dict, step_with, model, reps: int) -> dict:
    """`same_step`, then `alternate` with fedtune's fast LoRA dropout (as a local round on CPU)."""
    same_step(forms, step_with, model)
    with fast_lora_dropout(model, True):
        return alternate(forms, step_with, reps)
