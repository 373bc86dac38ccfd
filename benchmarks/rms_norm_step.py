"""Llama-style RMSNorm with a frozen weight (fedtune/fedit/fast_norm.py) against Hugging Face's
`LlamaRMSNorm`: one norm of the embedded model's width over a flat micro-batch's tokens, forward
and backward (median of 20 calls per rep, 7 reps alternating), then one flat-packed training step
of the embedded model with and without it, alternating. The figures behind fast_norm.py's
docstring and docs/benchmarks.md.

Run:  .venv/bin/python benchmarks/rms_norm_step.py [--reps 4]
The step: 8 rows of 45-335 random tokens (1,450 in all, 870 labelled), one micro-batch, flat
packing, the default config's LoRA, fedtune's fast LoRA dropout, the LoRA inputs uncast, and
autocast (model.dtype as the config resolves it); one warm-up step then 2 timed steps per rep and
form; prints seconds per step, the medians and the speed-up (before / shipped), how far the two
forms' losses and LoRA gradients are apart, and how far each is from a float32 model's step.
"""

import argparse
import statistics
import time

import torch
from peft.helpers import disable_input_dtype_casting
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import flat_step  # benchmarks/flat_step.py: the model and the flat batch
from fedtune.fedit.fast_norm import fast_rms_norm, frozen_rms_norm


def one_norm(hidden: int, tokens: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    norm.weight.data.normal_(1.0, 0.1)
    norm.weight.requires_grad_(False)
    x = torch.randn(1, tokens, hidden).to(dtype).requires_grad_(True)
    dy = torch.randn(1, tokens, hidden).to(dtype)
    forms = {"LlamaRMSNorm": norm, "frozen_rms_norm": lambda v: frozen_rms_norm(v, norm.weight, 1e-5)}
    y0, y1 = (f(x) for f in forms.values())
    print(f"one norm, {tokens} x {hidden} {dtype}: outputs differ in {int((y0 != y1).sum())} of {y0.numel()} values")
    times = {k: [] for k in forms}
    for _ in range(7):
        for name, f in forms.items():
            t0 = time.perf_counter()
            for _ in range(20):
                torch.autograd.grad(f(x), x, dy)
            times[name].append((time.perf_counter() - t0) / 20)
    print("  forward + backward: " + " · ".join(f"{k} {1e3 * statistics.median(v):.2f} ms" for k, v in times.items()))


def fp32_reference(forms: dict, step_with, model) -> None:
    """How far each form's LoRA gradients are from those of the same step of a float32 model
    without autocast (relative norm of the difference): bf16 rounding through 30 layers moves
    them by several percent either way, so the two forms' own gap is read against this."""
    _, lm32, model32, opt32, p32, labelled32 = flat_step.setup(["model.dtype='float32'", "model.autocast='off'"])
    model32.eval()
    _, ref = flat_step.step(lm32, model32, opt32, p32, labelled32, update=False)
    ref = torch.cat([g.flatten().double() for g in ref])
    model.eval()
    for name, form in forms.items():
        grads = torch.cat([g.flatten().double() for g in step_with(form, update=False)[1]])
        print(f"{name}: LoRA gradients {float((grads - ref).norm() / ref.norm()):.2%} from the fp32 model's")
    model.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    cfg, lm, model, opt, p, labelled = flat_step.setup()
    dtype = next(lm.model.parameters()).dtype
    one_norm(lm.model.config.hidden_size, p.tokens, dtype)
    forms = {"LlamaRMSNorm (before)": False, "frozen_rms_norm (shipped)": True}

    def step_with(fast, update=True):
        with fast_rms_norm(model, fast), disable_input_dtype_casting(model):
            return flat_step.step(lm, model, opt, p, labelled, update)

    print(f"step, weights {dtype}, {p.tokens} tokens, {labelled} labelled")
    fp32_reference(forms, step_with, model)
    flat_step.ab(forms, step_with, model, args.reps)


if __name__ == "__main__":
    main()
