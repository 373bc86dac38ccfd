"""fedit/fast_norm.py: Llama's RMSNorm with a frozen weight, forward and input gradient equal to
Hugging Face's module to float rounding (and no further from an fp64 oracle);
installed only on Llama-style norms with frozen weights, for the round, and removed after."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fedtune.fedit.fast_norm import fast_rms_norm, frozen_rms_norm, is_llama_rms_norm


def _oracle(x, w, eps):
    x = x.double()
    return w.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                          (torch.bfloat16, torch.float32)])
def test_matches_hugging_face_forward_and_backward_to_rounding(dtype, wdtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(wdtype)
    norm.weight.data.normal_(1.0, 0.2)
    norm.weight.requires_grad_(False)
    x = (torch.randn(3, 50, 96) * 3).to(dtype).requires_grad_(True)
    dy = torch.randn(3, 50, 96)
    want = norm(x)
    got = frozen_rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == want.dtype
    out_ulp = torch.finfo(want.dtype).eps * want.abs().max().item()
    np.testing.assert_allclose(got.detach().double().numpy(), want.detach().double().numpy(), rtol=0, atol=2 * out_ulp)
    o = _oracle(x.detach(), norm.weight, 1e-5)
    assert (got.double() - o).abs().max().item() <= (want.double() - o).abs().max().item() + out_ulp
    (g_want,) = torch.autograd.grad(want, x, dy.to(want.dtype))
    (g_got,) = torch.autograd.grad(got, x, dy.to(got.dtype))
    xd = x.detach().double().requires_grad_(True)
    (g_oracle,) = torch.autograd.grad(_oracle(xd, norm.weight, 1e-5), xd, dy.to(want.dtype).double())
    ulp = torch.finfo(dtype).eps * g_want.abs().max().item()
    np.testing.assert_allclose(g_got.double().numpy(), g_want.double().numpy(), rtol=0, atol=2 * ulp)
    err_got = (g_got.double() - g_oracle).abs().max().item()
    err_hf = (g_want.double() - g_oracle).abs().max().item()
    assert err_got <= err_hf + ulp


def test_installed_on_frozen_llama_norms_only_and_removed_after(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.requires_grad_(False)
    layers = model.model.layers
    layers[0].input_layernorm.weight.requires_grad_(True)  # a trainable norm keeps its own forward

    class Other(torch.nn.Module):  # same attributes, different computation: not Llama's
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4), requires_grad=False)
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            return hidden_states * (1.0 + self.weight)

    model.other = Other()
    assert is_llama_rms_norm(LlamaRMSNorm) and not is_llama_rms_norm(Other)
    calls = []
    with fast_rms_norm(model) as swapped:
        assert swapped == 2 * len(layers) + 1 - 1  # every layer's two norms and the final one, less the trainable
        assert "forward" in layers[1].post_attention_layernorm.__dict__
        assert "forward" not in layers[0].input_layernorm.__dict__ and "forward" not in model.other.__dict__
        from fedtune.fedit import fast_norm

        orig = fast_norm._FrozenRMSNorm.apply
        fast_norm._FrozenRMSNorm.apply = lambda *a: calls.append(1) or orig(*a)
        try:
            model(torch.tensor([[5, 6, 7]]))
        finally:
            fast_norm._FrozenRMSNorm.apply = orig
    assert len(calls) == swapped
    assert all("forward" not in m.__dict__ for m in model.modules())
    with fast_rms_norm(model, enabled=False) as swapped:
        assert swapped == 0


def test_train_local_uses_it_on_cpu(tiny_llama, monkeypatch):
    from fedtune import config as C
    from fedtune.data.instructions import Tokenized
    from fedtune.fedit import fast_norm
    from fedtune.fedit.lora import AdapterSlot, attach_lora
    from fedtune.fedit.train import train_local
    from transformers import AutoModelForCausalLM

    calls = []
    monkeypatch.setattr(fast_norm, "frozen_rms_norm", lambda *a: calls.append(1) or frozen_rms_norm(*a))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.requires_grad_(False)
    model = attach_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"])
    slot = AdapterSlot(model)
    rng = np.random.default_rng(0)
    data = [Tokenized(ids := rng.integers(5, 200, n).tolist(), [-100] * (n // 2) + ids[n // 2:]) for n in (9, 14)]
    cfg = C.load(None, ["train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=1"])
    train_local(model, list(slot.params.values()), data, cfg.train, seed=0, pad_id=0, device=torch.device("cpu"),
                amp=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert calls
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, LlamaRMSNorm))
