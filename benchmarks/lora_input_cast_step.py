"""PEFT's cast of each LoRA layer's input to the LoRA weights' dtype, in one flat-packed training
step of the embedded model under bf16 autocast: with it (PEFT's default) and without it (what
fedtune/fedit/train.py does under autocast, through `peft.helpers.disable_input_dtype_casting`).
With bf16 base weights and fp32 LoRA weights, the cast copies each LoRA input to fp32 (and
autocast copies it back to bf16 for lora_A's matmul), and the same for its gradient.

Run:  .venv/bin/python benchmarks/lora_input_cast_step.py [--reps 4]
8 rows of 45-335 random tokens (1,450 in all, 870 labelled), one micro-batch, flat packing, the
default config's LoRA, fedtune's fast LoRA dropout and autocast (model.dtype as the config
resolves it); the two alternate, one warm-up step then 2 timed steps each per rep; prints
seconds per step, the medians and the speed-up (before / shipped), and checks that both give the same loss and LoRA gradients.
"""

import argparse

import torch
from peft.helpers import disable_input_dtype_casting

import flat_step  # benchmarks/flat_step.py: the model and the flat batch
from fedtune.fedit.fast_dropout import fast_lora_dropout
from fedtune.fedit.train import causal_lm_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    cfg, lm, model, opt, p, labelled = flat_step.setup()
    forms = {"PEFT's cast (before)": False, "uncast (shipped)": True}
    lora = [x for x in model.parameters() if x.requires_grad]

    def step_with(uncast, update=True):
        with disable_input_dtype_casting(model, active=uncast), lm.autocast():
            loss = causal_lm_loss(model, p.ids, None, p.labels, "sum", p.position_ids, p.decoder_kwargs) / labelled
        loss.backward()
        if update:
            opt.step()
        grads = [x.grad.clone() for x in lora]
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    model.eval()  # no dropout: both see the same computation
    (lb, gb), (la, ga) = (step_with(u, update=False) for u in forms.values())
    same = all(torch.equal(x, y) for x, y in zip(ga, gb))
    print(f"weights {next(lm.model.parameters()).dtype}, LoRA {lora[0].dtype}, {p.tokens} tokens; loss uncast {la:.5f}, "
          f"cast {lb:.5f}; LoRA gradients {'identical' if same else 'DIFFER'}")
    model.train()
    with fast_lora_dropout(model, True):
        flat_step.alternate(forms, step_with, args.reps)


if __name__ == "__main__":
    main()
