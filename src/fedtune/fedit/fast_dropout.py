"""LoRA dropout with a cheaper random mask, for local training on CPU.

PEFT applies `nn.Dropout(lora.dropout)` to the input of every LoRA layer: with r = 8 on q/v of
SmolLM2-135M that is a (tokens x 576) mask drawn twice per layer, 60 times a step. On a CPU,
`torch.bernoulli_` draws it element by element: on a 2-core AMD EPYC (AVX2), one flat
micro-batch of 8 rows (1,450 tokens), `F.dropout` took 5.7 ms per call (this module 2.0 ms) and
`bernoulli_` 4.2% of the step (`benchmarks/lora_dropout_step.py`; 9% on an Intel CPU with AMX,
docs/benchmarks.md).

`FastDropout` draws 64 random bits at a time from torch's generator (`random_` over the whole
int64 range: about 1 ns per element here) and reads them as four 16-bit uniforms, one per element:
an element is dropped when its uniform falls below round(p * 65536), and kept ones are scaled
by 1 / (1 - p'), with p' = round(p * 65536) / 65536 the probability actually applied (for
p = 0.05, p' = 0.0500031), so the output's expectation is the input, exactly as with
`nn.Dropout`. The mask is saved as booleans for the backward pass. It is drawn from torch's
default generator, so fedtune's seeding makes runs repeat.

`fast_lora_dropout` installs it in place of PEFT's dropout modules for the duration of a local
round (on CPU, eager layers only: on GPU `F.dropout` is already one fused kernel, and a compiled
layer fuses PEFT's own), and puts PEFT's modules back on exit.
"""

from __future__ import annotations

import contextlib
import math

import torch

_BITS = 16
_LEVELS = 1 << _BITS


class FastDropout(torch.nn.Module):
    """Inverted dropout with drop probability round(p * 65536) / 65536 (see the module doc)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        self.p = p
        self.threshold = round(p * _LEVELS)  # drop where the 16-bit uniform (0..65535) is below this
        self.scale = _LEVELS / (_LEVELS - self.threshold)

    def keep_mask(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
        u = bits.view(torch.int16)[:n].view(shape)  # signed: 0..65535 shifted down by 32768
        return u >= self.threshold - (_LEVELS >> 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return torch.where(self.keep_mask(x.shape, x.device), x * self.scale, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _lora_dropouts(model):
    for module in model.modules():
        holder = getattr(module, "lora_dropout", None)
        if isinstance(holder, torch.nn.ModuleDict):
            yield holder


@contextlib.contextmanager
def fast_lora_dropout(model, enabled: bool = True):
    """Within the block, every `nn.Dropout` of the model's LoRA layers is a `FastDropout` of the
    same p; on exit PEFT's own modules are back."""
    swapped = []
    if enabled:
        for holder in _lora_dropouts(model):
            for name, mod in list(holder.items()):
                if type(mod) is torch.nn.Dropout and mod.p > 0:
                    holder[name] = FastDropout(mod.p).train(mod.training)
                    swapped.append((holder, name, mod))
    try:
        yield len(swapped)
    finally:
        for holder, name, mod in swapped:
            mod.train(holder[name].training)
            holder[name] = mod
