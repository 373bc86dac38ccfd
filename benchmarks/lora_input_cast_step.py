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

from peft.helpers import disable_input_dtype_casting

import flat_step  # benchmarks/flat_step.py: the model and the flat batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    cfg, lm, model, opt, p, labelled = flat_step.setup()
    forms = {"PEFT's cast (before)": False, "uncast (shipped)": True}

    def step_with(uncast, update=True):
        with disable_input_dtype_casting(model, active=uncast):
            return flat_step.step(lm, model, opt, p, labelled, update)

    lora = next(x for x in model.parameters() if x.requires_grad)
    print(f"weights {next(lm.model.parameters()).dtype}, LoRA {lora.dtype}, {p.tokens} tokens, {labelled} labelled")
    flat_step.ab(forms, step_with, model, args.reps)


if __name__ == "__main__":
    main()
