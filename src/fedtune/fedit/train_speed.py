"""Two switches that speed up local training and nothing else: the attention kernel
(`train.attention`) and torch.compile of the decoder layers (`train.compile`).

Attention. On a CPU, PyTorch's fused SDPA kernel (flash attention for CPU) is slow in the
backward pass at instruction-tuning lengths: profiled on SmolLM2-135M (8 rows x 160 tokens,
bf16 autocast) it took 17.6 ms per layer, 23% of a training step, as long as every matmul of
the step together; the plain ("eager") attention, a batched matmul and a softmax, made the
same step 1.19x faster. `train.attention = "auto"` uses eager attention for training on CPU
and the model's own implementation elsewhere (on GPU SDPA / flash attention win).

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

SETTINGS = ("off", "layers")
_ATTR = "_fedtune_compiled_forward"


def attention_for(setting: str, device: torch.device) -> str | None:
    """The attention implementation local training runs with (None: the model's own)."""
    if setting == "auto":
        return "eager" if device.type == "cpu" else None
    return setting


@contextlib.contextmanager
def training_attention(model, setting: str, device: torch.device):
    """Within the block the model runs `train.attention`'s implementation; on exit its own again."""
    want = attention_for(setting, device)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(lm.config, "_attn_implementation", None)
    if want is None or want == before:
        yield
        return
    lm.set_attn_implementation(want)
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


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
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
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
