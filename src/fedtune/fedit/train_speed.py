"""Two switches that speed up local training and nothing else: the attention kernel
(`train.attention`) and torch.compile of the decoder layers (`train.compile`).

Attention. On a CPU, PyTorch's fused SDPA kernel (flash attention for CPU) is slow in the
backward pass at instruction-tuning lengths: profiled on SmolLM2-135M (8 rows x 160 tokens,
bf16 autocast) it took 17.6 ms per layer, 23% of a training step, as long as every matmul of
the step together; the plain ("eager") attention, a batched matmul and a softmax, made the
same step 1.19x faster. `train.attention = "auto"` uses eager attention for training on CPU
while a micro-batch's attention scores stay small (eager keeps them for the backward pass; SDPA
does not), and the model's own implementation otherwise and on GPU (SDPA / flash attention).

Compile (`train.compile = "layers"`).

A decoder's layers share one class and one `forward`, so compiling them region by region
(PyTorch's "regional compilation" recipe) builds one graph and reuses it for every layer:
the one-time cost is that of a single layer (about 30 s on a 2-core CPU for SmolLM2-135M,
against about 4 minutes for the whole model), and inductor fuses the element-wise work
between the matmuls (RMSNorm, rotary embeddings, SiLU, the casts of bf16 autocast), which
eager mode runs as separate kernels. Shapes are dynamic, so the varying widths of
length-grouped micro-batches do not recompile.

The compiled forwards are installed only for the duration of a local round
(`compiled_layers` is a context manager): evaluation and generation (with a KV cache) run the
model eagerly, as before. The compiled functions are kept on the layers, so every client
of a simulator process and every round after the first reuses them.
"""

from __future__ import annotations

import contextlib
import shutil

import torch

from fedtune.fedit.lora import base_lm

SETTINGS = ("off", "layers")
_ATTR = "_fedtune_compiled_forward"


# Eager attention keeps its (rows x heads x width x width) scores for the backward pass (fp32
# probabilities and their bf16 copy: about 6 bytes a score, per layer), where SDPA keeps none:
# `auto` uses it only while that stays under EAGER_MAX_BYTES over all layers (SmolLM2-135M, 8 rows:
# up to 575 tokens wide; a 32-layer, 32-head model, 8 rows: 295).
EAGER_MAX_BYTES = 4 << 30
BYTES_PER_SCORE = 6


def attention_for(setting: str, device: torch.device, scores: int = 0) -> str | None:
    """The attention implementation of a training forward that holds `scores` attention scores
    over all layers (None: the model's own)."""
    if setting == "auto":
        return "eager" if device.type == "cpu" and scores * BYTES_PER_SCORE <= EAGER_MAX_BYTES else None
    return setting


class TrainingAttention:
    """Context manager: `use(rows, width)` before each training forward switches the model to
    `train.attention`'s implementation for that micro-batch's shape; on exit the model runs its
    own implementation again (evaluation and generation are untouched)."""

    def __init__(self, model, setting: str, device: torch.device):
        self.lm = base_lm(model)
        self.setting, self.device = setting, device
        self.own = getattr(self.lm.config, "_attn_implementation", None)
        cfg = self.lm.config
        self.heads_x_layers = getattr(cfg, "num_attention_heads", 1) * getattr(cfg, "num_hidden_layers", 1)
        self.now = self.own

    def use(self, rows: int, width: int) -> None:
        self.force(attention_for(self.setting, self.device, rows * self.heads_x_layers * width * width) or self.own)

    def force(self, impl: str | None) -> None:
        if impl != self.now:
            self.lm.set_attn_implementation(impl)
            self.now = impl

    def possible(self) -> list[str | None]:
        """Every implementation `use` may pick in this round."""
        if self.setting == "auto":
            return list(dict.fromkeys(["eager", self.own])) if self.device.type == "cpu" else [self.own]
        return [self.setting]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.now != self.own:
            self.lm.set_attn_implementation(self.own)
            self.now = self.own
        return False


def check_supported(setting: str, device: torch.device, *, dpsgd: bool = False) -> None:
    """Raise a clear error where `train.compile` cannot work, before any training starts."""
    if setting not in SETTINGS:
        raise ValueError(f"train.compile = {setting!r}: expected one of {', '.join(SETTINGS)}")
    if setting == "off":
        return
    if dpsgd:
        raise ValueError("train.compile = 'layers' cannot be combined with train.dpsgd_noise_multiplier > 0: "
                         "DP-SGD's per-example gradients come from hooks on the LoRA layers, inside the compiled "
                         "region; set train.compile = 'off'")
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ValueError("train.compile = 'layers' on CPU needs a C++ compiler for torch's inductor backend "
                         "(none of g++, c++, clang++ is on PATH); install one or set train.compile = 'off'")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a (PEFT-wrapped) Hugging Face causal LM's decoder."""
    lm = base_lm(model)
    layers = getattr(lm.get_decoder(), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"train.compile = 'layers': {type(lm).__name__}'s decoder has no `layers` list to compile; "
                         "set train.compile = 'off'")
    return list(layers)


@contextlib.contextmanager
def compiled_layers(model, setting: str):
    """Within the block, every decoder layer runs its compiled forward (when `setting` is
    "layers"); on exit the layers run eagerly again."""
    if setting == "off":
        yield
        return
    layers = decoder_layers(model)
    for layer in layers:
        if _ATTR not in layer.__dict__:
            layer.__dict__[_ATTR] = torch.compile(layer.forward, dynamic=True)
        layer.__dict__["forward"] = layer.__dict__[_ATTR]  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
