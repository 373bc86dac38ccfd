"""The LM head and its cross-entropy in one autograd function (`head_cross_entropy`).

Computed the usual way, `F.cross_entropy(head(h).float(), target)` keeps the logits in the
compute dtype, their fp32 copy and the log-softmax (three N x vocab tensors), and its backward
builds a fourth (the one-hot of the targets, filled with zeros first) before the softmax
gradient. On SmolLM2-135M (vocabulary 49,152) that element-wise work took about as long as the
head's matmul itself (profiled: 17.5% of a training step for head and loss together).

Here the forward runs the head over a chunk of rows at a time (16 MiB of fp32 logits, 85
rows for that vocabulary), computes each row's loss, max + log(sum exp(logit - max)) -
logit[target], turns the chunk in place into the softmax minus the one-hot (the gradient of the
loss at the logits) and multiplies it by the head's weight: the gradient of each row's loss
with respect to its hidden state, kept (rows x hidden, fp32). The backward only scales those
rows by the incoming gradient (the head is frozen, so the hidden states' gradient is all there
is). No rows x vocab tensor outlives its chunk, and a chunk's element-wise work runs in cache:
a training step of SmolLM2-135M with bf16 weights on an AVX512-BF16 CPU took 3.64 s against
3.73 s when the whole (870 x 49,152) fp32 softmax was kept for the backward (median of 4,
alternating: benchmarks/head_loss_step.py), and keeps 870 x 49,152 x 4 bytes = 171 MB less
(computed). The head's weight gets no gradient: the fused path is taken only for a frozen,
bias-free `nn.Linear` head (what LoRA training has), and the plain path otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


_CHUNK_ELEMENTS = 1 << 22  # fp32 logits of one chunk of rows: 16 MiB, so a chunk's element-wise work stays in cache


def chunk_rows(vocab: int) -> int:
    """Rows of the head computed at a time: 85 for SmolLM2's 49,152 tokens, 16 for a 262k vocabulary."""
    return max(16, _CHUNK_ELEMENTS // vocab)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, scale, rows):
        n, dev = h.shape[0], h.device.type
        # the compute dtype of the head itself: autocast's (bf16) where it is on. The frozen weight is
        # cast once here; autocast would cast it again for every chunk (it caches only trainable leaves)
        compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        w, hc = weight.to(compute_dtype), h.to(compute_dtype)
        loss = torch.empty(n, dtype=torch.float32, device=h.device)
        grad = torch.empty(h.shape, dtype=torch.float32, device=h.device)  # d loss_i / d h_i, row by row
        for i in range(0, n, rows):
            logits = hc[i:i + rows] @ w.t()
            z = logits.float()
            del logits
            if scale != 1.0:
                z.mul_(scale)
            t = target[i:i + rows]
            picked = z.gather(1, t[:, None]).squeeze(1)
            top = z.amax(dim=1)
            z.sub_(top[:, None]).exp_()  # exp(logit - max)
            total = z.sum(dim=1)
            loss[i:i + rows] = top + total.log() - picked
            z.div_(total[:, None])  # the softmax
            z[torch.arange(z.shape[0], device=z.device), t] -= 1.0  # minus the one-hot: d loss / d logits
            if scale != 1.0:
                z.mul_(scale)
            grad[i:i + rows] = z.to(compute_dtype) @ w
        ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.float()[:, None]).to(ctx.h_dtype), None, None, None, None


def fusable(head: torch.nn.Module) -> bool:
    """Whether `head` is a frozen, bias-free linear layer (not wrapped, e.g. by LoRA)."""
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def head_cross_entropy(head: torch.nn.Module, h: torch.Tensor, target: torch.Tensor, *, scale: float = 1.0,
                       softcap: float | None = None, reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(scale * head(h) [soft-capped], target) over the rows of `h` (N, H); equal to
    the plain computation up to float rounding. `reduction` is "mean", "sum" or "none"."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction = {reduction!r}: expected mean, sum or none")
    if softcap or not fusable(head) or not h.requires_grad:
        logits = head(h).float()
        if scale != 1.0:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, target, reduction=reduction)
    loss = _HeadCrossEntropy.apply(h, head.weight, target, float(scale), chunk_rows(head.weight.shape[0]))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
