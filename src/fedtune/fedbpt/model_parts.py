"""Model-side helpers of the black box: a grouped-query attention function for CPU, the
special tokens a tokenizer wraps text in, and the placeholder tokens of add-mode prompt slots."""

from __future__ import annotations

from fedtune.errors import ConfigError

PLACEHOLDER_OFFSET = 1000  # BBT fills add-mode prompt slots with the token ids 1000, 1001, ...


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA that lets grouped-query attention broadcast its key/value heads even when there is
    a mask (torch's CPU kernels support it). transformers' own SDPA path repeats the key/value
    heads whenever a mask is given: on CPU that copy of every layer's keys and values cost more
    than the attention itself in padded and cached forwards. Inference only (no dropout)."""
    import torch

    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                           is_causal=is_causal, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


_GQA_ATTENTION = "fedtune_sdpa_gqa"


def use_cpu_gqa_attention(model) -> None:
    """Switch a causal LM that runs on CPU with SDPA to `_sdpa_gqa` (same masks as SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return
    AttentionInterface.register(_GQA_ATTENTION, _sdpa_gqa)
    AttentionMaskInterface.register(_GQA_ATTENTION, sdpa_mask)
    model.set_attn_implementation(_GQA_ATTENTION)


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. <s> ... </s>)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain):])
    return [], []


def placeholder_ids(vocab: int, n: int, specials: set[int]) -> list[int]:
    """n distinct non-special token ids from PLACEHOLDER_OFFSET up (lower for tiny vocabularies)."""
    start = PLACEHOLDER_OFFSET if vocab > PLACEHOLDER_OFFSET + n + len(specials) else 0
    ids, i = [], start
    while len(ids) < n and i < start + vocab:
        t = i % vocab
        if t not in specials:
            ids.append(t)
        i += 1
    if len(ids) < n:
        raise ConfigError(f"fedbpt.n_prompt_tokens = {n} exceeds the model's {vocab - len(specials)} ordinary tokens")
    return ids
