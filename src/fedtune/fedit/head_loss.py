"""The LM head and its cross-entropy in one autograd function (`head_cross_entropy`).

Computed the usual way, `F.cross_entropy(head(h).float(), target)` keeps the logits in the
compute dtype, their fp32 copy and the log-softmax (three N x vocab tensors), and its backward
builds a fourth (the one-hot of the targets, filled with zeros first) before the softmax
gradient. On SmolLM2-135M (vocabulary 49,152) that element-wise work took about as long as the
head's matmul itself (profiled: 17.5% of a training step for head and loss together).

Here the forward computes the fp32 logits once and turns them in place into exp(logit - max);
the loss of a row is max + log(sum) - logit[target]. The backward reuses that tensor in place
as the softmax (times the incoming gradient), subtracts the gradient at the targets, and runs
the one matmul that gives the hidden states' gradient. The head's weight gets no gradient: the
fused path is taken only for a frozen, bias-free `nn.Linear` head (what LoRA training has),
and the plain path otherwise. Because the backward consumes its saved tensor, a second backward
through the same graph raises instead of returning a wrong gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, scale):
        logits = F.linear(h, weight)  # under autocast: in its compute dtype (bf16), like the head itself
        compute_dtype = logits.dtype
        z = logits.float()
        del logits
        if scale != 1.0:
            z.mul_(scale)
        picked = z.gather(1, target[:, None]).squeeze(1)
        top = z.amax(dim=1)
        z.sub_(top[:, None]).exp_()  # z is now exp(logit - max)
        total = z.sum(dim=1)
        loss = top + total.log() - picked
        ctx.save_for_backward(z, total, target, weight)
        ctx.scale, ctx.compute_dtype, ctx.h_dtype, ctx.used = scale, compute_dtype, h.dtype, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("head_cross_entropy's backward ran twice over the same graph (retain_graph=True): "
                               "its saved softmax is consumed in place by the first backward")
        ctx.used = True
        z, total, target, weight = ctx.saved_tensors
        g = grad_loss.float()
        z.mul_((g / total)[:, None])  # softmax * grad
        z[torch.arange(z.shape[0], device=z.device), target] -= g
        if ctx.scale != 1.0:
            z.mul_(ctx.scale)
        grad_h = z.to(ctx.compute_dtype) @ weight.to(ctx.compute_dtype)
        return grad_h.to(ctx.h_dtype), None, None, None


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
    loss = _HeadCrossEntropy.apply(h, head.weight, target, float(scale))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
