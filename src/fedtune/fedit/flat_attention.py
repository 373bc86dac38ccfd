"""Padding-free ("flat") packing: a micro-batch as one sequence, attention row by row
(`train.packing = "flat"`).

`train.packing = "on"` lays rows end to end into packed rows as wide as the longest row and
lets the model's attention apply a block-diagonal mask: every score of each packed row's square
is still computed, and the last packed row is padded. Here the whole micro-batch is one
sequence (batch 1, its width the sum of the rows' lengths rounded up by `padded_width`), so the
linear layers, about 70% of a CPU training step, see only real tokens; the attention runs
segment by segment (each row, then the padding tail), each a causal square of its own, through
an attention function registered with transformers' `AttentionInterface`. Grouped-query
attention is computed without repeating the key/value heads (the query heads of a group share
one matmul with their key head), the softmax in fp32 as in transformers' eager attention.

The row boundaries travel to the attention function as `cu_seq_lens_q` / `cu_seq_lens_k`
(the cumulative row lengths, the names flash attention's variable-length path uses), passed
through the decoder's keyword arguments, which Hugging Face decoders hand to their attention
function. A decoder that does not pass them on raises here, and the packing probe
(fedtune/fedit/packing.py) runs the flat path on two short rows against each alone before the
first flat forward, so a model that would let rows see each other is refused, not trained.
"""

from __future__ import annotations

import torch

FLAT_ATTENTION = "fedtune_flat"
_UNSUPPORTED = ("s_aux",)  # attention sinks (gpt-oss): not implemented here


def _causal_keep(n: int, window: int | None, device) -> torch.Tensor:
    i = torch.arange(n, device=device)
    keep = i[None, :] <= i[:, None]
    if window:
        keep &= i[:, None] - i[None, :] < window
    return keep


def _segment(qs, ks, vs, window, softcap, dropout: float) -> torch.Tensor:
    """One row's causal attention: qs (Hkv, G, n, D), ks/vs (Hkv, n, D) -> (Hkv, G, n, D). (Splitting
    a long row's square into query pieces that skip the keys no query of the piece sees computes
    less, but was not faster on a 2-core AVX512-BF16 CPU with pieces of 96 or 128 rows.)"""
    kv_heads, group, n, dim = qs.shape
    scores = (qs.reshape(kv_heads, group * n, dim) @ ks.transpose(1, 2)).view(kv_heads, group, n, n).float()
    drop = ~_causal_keep(n, window, scores.device)
    if softcap:
        scores = (torch.tanh(scores / softcap) * softcap).masked_fill(drop, float("-inf"))
    else:
        # in place and outside autograd: no op saved the scores, and the softmax's backward is
        # already 0 where its output is (a masked_fill's backward would zero those again)
        scores.detach().masked_fill_(drop, float("-inf"))
    probs = scores.softmax(dim=-1).to(vs.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    return (probs.view(kv_heads, group * n, n) @ vs).view(kv_heads, group, n, dim)


def flat_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           softcap=None, sliding_window=None, **kwargs):
    """query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D), None: causal attention
    within each segment of `cu_seq_lens_q` (cumulative lengths, first 0, last T)."""
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"train.packing = 'flat' does not support {type(module).__name__}'s `{name}`; "
                             "set train.packing = 'off'")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(f"train.packing = 'flat': {type(module).__name__} got no row boundaries (cu_seq_lens_q): "
                         "its decoder does not pass keyword arguments on to the attention; set train.packing = 'off'")
    if query.shape[0] != 1:
        raise ValueError(f"train.packing = 'flat' expects one packed sequence per forward, got {query.shape[0]}")
    _, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    if int(cu[-1]) != width or key.shape[2] != width:
        raise ValueError(f"train.packing = 'flat': row boundaries end at {int(cu[-1])}, the sequence is {width} wide")
    scaling = dim ** -0.5 if scaling is None else scaling
    q = (query[0] * scaling).view(kv_heads, heads // kv_heads, width, dim)
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    dropout = dropout if module.training else 0.0
    # split, not a slice per segment: the backward of a slice writes its gradient into a zeroed
    # tensor of the whole width and adds it to the others' (segments x the whole width, per layer);
    # split's backward concatenates once
    outs = []
    for qs, ks, vs in zip(q.split(lengths, dim=2), key[0].split(lengths, dim=1), value[0].split(lengths, dim=1)):
        outs.append(_segment(qs, ks, vs, sliding_window, softcap, dropout))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # (Hkv, G, T, D)
    return out.view(heads, width, dim).transpose(0, 1).unsqueeze(0).contiguous(), None


def _no_mask(*args, **kwargs):
    return None  # the segments are the mask


def register() -> str:
    """Register the flat attention (and its absent mask) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(FLAT_ATTENTION, flat_attention_forward)
    AttentionMaskInterface.register(FLAT_ATTENTION, _no_mask)
    return FLAT_ATTENTION


def segment_kwargs(cu_seqlens: torch.Tensor, max_len: int) -> dict:
    """The decoder keyword arguments that carry the row boundaries."""
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_len, "max_length_k": max_len}
