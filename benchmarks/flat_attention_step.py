"""The flat attention (fedtune/fedit/flat_attention.py) in one flat-packed training step of the
embedded model: as shipped (the segments split once; the causal mask filled in outside autograd)
against the previous form, reproduced below as `sliced_attention` (a slice per segment, whose
backward zero-fills and accumulates a whole-width gradient per segment; the mask filled in
through autograd, whose backward fills it again). The figures behind flat_attention.py's comment
and docs/benchmarks.md.

Run:  .venv/bin/python benchmarks/flat_attention_step.py [--reps 4]
8 rows of 45-335 random tokens (1,450 in all, 870 labelled), one micro-batch, flat packing, the
default config's LoRA, fedtune's fast LoRA dropout and autocast (model.dtype as the config
resolves it); the two forms alternate, one warm-up step then 2 timed steps each per rep; prints
seconds per step, the medians and the speed-up (before / shipped), and checks that both give the same loss and LoRA gradients.
"""

import argparse

import torch
from transformers import AttentionInterface

import flat_step  # benchmarks/flat_step.py: the model and the flat batch
from fedtune.fedit import flat_attention


def sliced_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                     sliding_window=None, **kwargs):
    """The previous form (no softcap, no attention dropout: what SmolLM2 uses)."""
    assert not softcap and not (dropout and module.training)
    cu = kwargs["cu_seq_lens_q"]
    _, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    q = (query[0] * scaling).view(kv_heads, group, width, dim)
    k, v = key[0], value[0]
    bounds = cu.tolist()
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        n = b - a
        qs = q[:, :, a:b].reshape(kv_heads, group * n, dim)
        scores = (qs @ k[:, a:b].transpose(1, 2)).view(kv_heads, group, n, n).float()
        scores.masked_fill_(~flat_attention._causal_keep(n, sliding_window, scores.device), float("-inf"))
        probs = scores.softmax(dim=-1).to(v.dtype)
        outs.append((probs.view(kv_heads, group * n, n) @ v[:, a:b]).view(heads, n, dim))
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    cfg, lm, model, opt, p, labelled = flat_step.setup()
    forms = {"sliced (before)": sliced_attention, "split (shipped)": flat_attention.flat_attention_forward}

    def step_with(fn, update=True):
        AttentionInterface.register(flat_attention.FLAT_ATTENTION, fn)
        return flat_step.step(lm, model, opt, p, labelled, update)

    print(f"weights {next(lm.model.parameters()).dtype}, {p.tokens} tokens, {labelled} labelled")
    flat_step.ab(forms, step_with, model, args.reps)
    AttentionInterface.register(flat_attention.FLAT_ATTENTION, flat_attention.flat_attention_forward)


if __name__ == "__main__":
    main()
