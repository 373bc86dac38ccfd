"""The fused LM head + loss (fedtune/fedit/head_loss.py) in one flat-packed training step of the
embedded model: row chunks with the hidden states' gradient computed in the forward (as shipped)
against the previous form, which kept the whole (labelled rows x vocabulary) fp32 softmax for
the backward (reproduced below as `whole_logits`). The figures behind head_loss.py's docstring.

Run:  .venv/bin/python benchmarks/head_loss_step.py [--dtype bfloat16] [--reps 4]
8 rows of 45-335 random tokens (1,450 in all, 870 labelled), one micro-batch, flat packing, the
default config's LoRA, fedtune's fast LoRA dropout and autocast; the two forms alternate, one
warm-up step then 2 timed steps each per rep; prints seconds per step, the medians and the
speed-up (before / shipped), and checks that both give the same loss.
"""

import argparse
import torch
import torch.nn.functional as F

import flat_step  # benchmarks/flat_step.py: the model and the flat batch
from fedtune.fedit import head_loss
from fedtune.fedit import train as train_mod
from fedtune.fedit.fast_dropout import fast_lora_dropout
from fedtune.fedit.train import causal_lm_loss


class _WholeLogits(torch.autograd.Function):
    """The previous form: the fp32 softmax of all rows kept for the backward, consumed there."""

    @staticmethod
    def forward(ctx, h, weight, target):
        logits = F.linear(h, weight)
        ctx.compute_dtype = logits.dtype
        z = logits.float()
        del logits
        picked = z.gather(1, target[:, None]).squeeze(1)
        top = z.amax(dim=1)
        z.sub_(top[:, None]).exp_()
        total = z.sum(dim=1)
        ctx.save_for_backward(z, total, target, weight)
        ctx.h_dtype = h.dtype
        return top + total.log() - picked

    @staticmethod
    def backward(ctx, grad_loss):
        z, total, target, weight = ctx.saved_tensors
        g = grad_loss.float()
        z.mul_((g / total)[:, None])
        z[torch.arange(z.shape[0]), target] -= g
        return (z.to(ctx.compute_dtype) @ weight.to(ctx.compute_dtype)).to(ctx.h_dtype), None, None


def whole_logits(head, h, target, *, scale=1.0, softcap=None, reduction="mean"):
    assert scale == 1.0 and not softcap and head_loss.fusable(head)
    loss = _WholeLogits.apply(h, head.weight, target)
    return loss.sum() if reduction == "sum" else loss.mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "auto"], help="model.dtype")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    cfg, lm, model, opt, p, labelled = flat_step.setup([f"model.dtype='{args.dtype}'"])
    forms = {"whole logits (before)": whole_logits, "chunked (shipped)": head_loss.head_cross_entropy}

    def loss_with(fn):
        train_mod.head_cross_entropy = fn
        with lm.autocast():
            return causal_lm_loss(model, p.ids, None, p.labels, "sum", p.position_ids, p.decoder_kwargs) / labelled

    with torch.no_grad():
        model.eval()
        with torch.enable_grad():  # the fused path needs hidden states that require grad
            b, a = (float(loss_with(fn).detach()) for fn in forms.values())
    print(f"weights {next(lm.model.parameters()).dtype}, {p.tokens} tokens, {labelled} labelled; "
          f"loss chunked {a:.5f}, whole {b:.5f}")
    model.train()

    def step_with(fn):
        loss_with(fn).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with fast_lora_dropout(model, True):
        flat_step.alternate(forms, step_with, args.reps)
    train_mod.head_cross_entropy = head_loss.head_cross_entropy


if __name__ == "__main__":
    main()
