"""FLoRA (Wang et al., NeurIPS 2024) on the client and evaluation side: the stacked factors of
every earlier round act as frozen weight deltas, W x + s B_stack A_stack x, while the round's
fresh adapter trains on top (the paper merges the stack into the base weights; hooks give the
same function and leave the shared base model exactly as it was).

The stack arrives with the adapter under the `stack/` prefix (core/lora_math.py); `applied`
installs one forward hook per adapted module for the duration of a `with` block.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from fedtune.core.arrays import Arrays
from fedtune.core.lora_math import lora_pairs
from fedtune.errors import UpdateRejected


@contextlib.contextmanager
def applied(peft_model, stack: Arrays, adapter: str, device):
    """Within the block, every adapted module adds scale * B_stack A_stack x to its output
    (scale = the module's LoRA scaling of `adapter`: alpha / r at every rank). An empty stack
    (every algorithm but FLoRA) installs nothing."""
    if not stack:
        yield
        return
    modules = dict(peft_model.named_modules())
    hooks = []
    try:
        for a_key, b_key in lora_pairs(stack).values():
            name = a_key.rsplit(".lora_A.", 1)[0]
            module = modules.get(name)
            if module is None or not hasattr(module, "scaling"):
                raise UpdateRejected(f"stacked factor {a_key!r}: the model has no LoRA module {name!r}")
            a, b = stack[a_key], stack[b_key]
            if a.shape[0] != b.shape[1] or a.shape[1] != module.in_features or b.shape[0] != module.out_features:
                raise UpdateRejected(f"stacked factors of {name!r}: shapes {a.shape} and {b.shape} do not fit the "
                                     f"module ({module.in_features} -> {module.out_features})")
            if a.shape[0] == 0:
                continue
            ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
            tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).to(device)
            scale = float(module.scaling[adapter])

            def hook(mod, args, out, ta=ta, tb=tb, scale=scale):
                return out + (F.linear(F.linear(args[0].to(ta.dtype), ta), tb) * scale).to(out.dtype)

            hooks.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in hooks:
            h.remove()
