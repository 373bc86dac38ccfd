"""The fused LM head + cross-entropy against torch's own F.linear + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from fedtune.fedit import head_loss
from fedtune.fedit.head_loss import fusable, head_cross_entropy


def _setup(seed=0, n=37, hidden=24, vocab=301):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    head.weight.requires_grad_(False)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float32)
    target = torch.randint(0, vocab, (n,), generator=g)
    return head, h, target


def _oracle(head, h, target, scale, reduction):
    logits = F.linear(h, head.weight.detach()).float() * scale
    return F.cross_entropy(logits, target, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale", [1.0, 0.0625])
@pytest.mark.parametrize("chunked", [False, True])
def test_loss_and_gradient_equal_torch(reduction, scale, chunked, monkeypatch):
    head, h, target = _setup()
    assert fusable(head)
    if chunked:  # 37 rows in chunks of 16, 16 and 5
        monkeypatch.setattr(head_loss, "_CHUNK_ELEMENTS", 16 * 301)
        assert head_loss.chunk_rows(301) == 16
    a = h.clone().requires_grad_(True)
    b = h.clone().requires_grad_(True)
    ours = head_cross_entropy(head, a, target, scale=scale, reduction=reduction)
    ref = _oracle(head, b, target, scale, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    weights = torch.linspace(0.5, 2.0, ours.numel()).reshape(ours.shape)  # a non-uniform incoming gradient
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_torch_under_the_same_autocast():
    head, h, target = _setup(seed=1)
    a = h.clone().requires_grad_(True)
    b = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = head_cross_entropy(head, a, target, reduction="sum")
        ref = F.cross_entropy(head(b).float(), target, reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=2e-3, atol=1e-2)
    ours.backward()
    ref.backward()
    assert a.grad.dtype == torch.float32
    torch.testing.assert_close(a.grad, b.grad, rtol=2e-2, atol=2e-2)


def test_trainable_or_wrapped_head_takes_the_plain_path_and_gets_its_gradient():
    head, h, target = _setup(seed=2)
    head.weight.requires_grad_(True)
    assert not fusable(head)
    loss = head_cross_entropy(head, h.requires_grad_(True), target)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_softcap_matches_the_formula():
    head, h, target = _setup(seed=3)
    h.requires_grad_(True)
    ours = head_cross_entropy(head, h, target, softcap=3.0, reduction="sum")
    logits = F.linear(h, head.weight).float()
    ref = F.cross_entropy(torch.tanh(logits / 3.0) * 3.0, target, reduction="sum")
    torch.testing.assert_close(ours, ref)


def test_second_backward_over_the_same_graph_adds_the_same_gradient():
    """The input gradient is computed in the forward and kept, not consumed: backward twice
    (retain_graph=True) accumulates it twice, as torch's own computation does."""
    head, h, target = _setup(seed=4)
    a = h.clone().requires_grad_(True)
    b = h.clone().requires_grad_(True)
    ours = head_cross_entropy(head, a, target, reduction="sum")
    ref = _oracle(head, b, target, 1.0, "sum")
    for _ in range(2):
        ours.backward(retain_graph=True)
        ref.backward(retain_graph=True)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_bad_reduction_is_refused():
    head, h, target = _setup()
    with pytest.raises(ValueError, match="reduction"):
        head_cross_entropy(head, h.requires_grad_(True), target, reduction="avg")


def test_under_autocast_a_float32_head_weight_is_cast_once_not_per_chunk(monkeypatch):
    """Autocast does not cache casts of frozen weights: casting per chunk would convert the whole
    (vocab x hidden) head every chunk, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    head, h, target = _setup(seed=5)
    monkeypatch.setattr(head_loss, "_CHUNK_ELEMENTS", 16 * 301)  # 3 chunks

    class CountHeadCasts(TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_) and \
                    getattr(out, "shape", None) == head.weight.shape:
                CountHeadCasts.casts += 1
            return out

    a = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), CountHeadCasts():
        head_cross_entropy(head, a, target, reduction="sum").backward()
    assert CountHeadCasts.casts == 1
