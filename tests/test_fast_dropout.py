"""fedit/fast_dropout.py: LoRA dropout drawn 16 bits per element is dropout with p' =
round(p * 65536) / 65536, unbiased, with the right gradient; PEFT's layers use it only during a
local round on CPU and get their own modules back."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from fedtune.fedit.fast_dropout import FastDropout, fast_lora_dropout
from fedtune.fedit.lora import AdapterSlot, attach_lora


def test_drop_rate_scale_and_every_lane_of_the_random_word():
    p = 0.05
    torch.manual_seed(0)
    d = FastDropout(p).train()
    x = torch.ones(1000, 1001)  # an odd count: the last 64-bit word is only partly used
    y = d(x)
    p_eff = round(p * 65536) / 65536
    values = torch.unique(y)
    assert values.tolist() == pytest.approx([0.0, 1 / (1 - p_eff)])
    dropped = (y == 0).numpy().reshape(-1)
    n = dropped.size
    sd = math.sqrt(p_eff * (1 - p_eff) / n)  # binomial oracle
    assert abs(dropped.mean() - p_eff) < 6 * sd
    # each of the four 16-bit lanes of a 64-bit word drops at the same rate (a generator whose
    # words leave the top bit clear would never drop in the last lane)
    for lane in range(4):
        part = dropped[lane::4]
        assert abs(part.mean() - p_eff) < 6 * math.sqrt(p_eff * (1 - p_eff) / part.size)
    # unbiased: E[y] = x
    assert abs(float(y.mean()) - 1.0) < 6 * math.sqrt(p_eff / (1 - p_eff) / n)


def test_gradient_is_the_mask_times_the_scale_and_eval_is_identity():
    torch.manual_seed(1)
    d = FastDropout(0.3).train()
    x = torch.randn(64, 48, requires_grad=True)
    w = torch.randn(64, 48)
    y = d(x)
    (y * w).sum().backward()
    kept = (y != 0).float()
    np.testing.assert_allclose(x.grad.numpy(), (kept * w * d.scale).numpy(), rtol=1e-6)
    np.testing.assert_allclose(y.detach().numpy(), (kept * x.detach() * d.scale).numpy(), rtol=1e-6)
    assert d.eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="must be in"):
        FastDropout(1.0)


def _peft(path, dropout):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path)
    base.requires_grad_(False)
    return attach_lora(base, 4, 8, dropout, ["q_proj", "v_proj"])


def test_peft_lora_layer_computes_the_oracle_with_the_fast_mask(tiny_llama):
    model = _peft(tiny_llama, 0.25)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # B = 0 at init would hide the LoRA branch
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    model.train()
    x = torch.randn(3, 7, layer.in_features)
    with fast_lora_dropout(model) as swapped:
        assert swapped == 2 * len(model.get_base_model().model.layers)  # q and v of every layer
        assert isinstance(layer.lora_dropout["default"], FastDropout)
        torch.manual_seed(11)
        got = layer(x)
    torch.manual_seed(11)
    d = FastDropout(0.25)
    keep = d.keep_mask(x.shape, x.device)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.base_layer(x) + (torch.where(keep, x * d.scale, 0.0) @ a.T @ b.T) * layer.scaling["default"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert type(layer.lora_dropout["default"]) is torch.nn.Dropout  # PEFT's module back on exit
    with fast_lora_dropout(model, enabled=False) as swapped:
        assert swapped == 0


def test_train_local_uses_it_on_cpu_and_restores_peft_modules(tiny_llama, monkeypatch):
    from fedtune import config as C
    from fedtune.data.instructions import Tokenized
    from fedtune.fedit.train import train_local

    calls = []
    forward = FastDropout.forward
    monkeypatch.setattr(FastDropout, "forward", lambda self, x: calls.append(x.shape) or forward(self, x))
    rng = np.random.default_rng(0)
    data = [Tokenized(ids := rng.integers(5, 200, n).tolist(), [-100] * (n // 2) + ids[n // 2:])
            for n in (9, 14, 21, 12)]
    model = _peft(tiny_llama, 0.1)
    slot = AdapterSlot(model)
    start = slot.get()
    cfg = C.load(None, ["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=2", "train.lr=1e-2"])
    train_local(model, list(slot.params.values()), data, cfg.train, seed=0, pad_id=0,
                device=torch.device("cpu"), amp=nullcontext)
    assert calls  # the LoRA layers drew their masks through FastDropout
    assert any(not np.allclose(slot.get()[k], start[k]) for k in start)
    assert all(type(m) is torch.nn.Dropout for n, m in model.named_modules() if n.endswith("lora_dropout.default"))


def test_train_local_under_autocast_feeds_lora_its_input_uncast_and_trains_the_same(tiny_llama, monkeypatch):
    """bf16 base weights, fp32 LoRA weights, bf16 autocast: PEFT would cast each LoRA layer's input
    to fp32 (and autocast back to bf16 for the matmul). train_local turns that cast off for the
    round: the dropout sees the bf16 input, the trained adapter is bit for bit the same, and
    PEFT's setting is back afterwards."""
    from transformers import AutoModelForCausalLM

    from fedtune import config as C
    from fedtune.data.instructions import Tokenized
    from fedtune.fedit import train as train_mod

    rng = np.random.default_rng(0)
    data = [Tokenized(ids := rng.integers(5, 200, n).tolist(), [-100] * (n // 2) + ids[n // 2:])
            for n in (9, 14, 21, 12)]
    cfg = C.load(None, ["train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=2", "train.lr=1e-2"])
    seen, trained = {}, {}
    forward = FastDropout.forward
    for cast in ("off (shipped)", "on (PEFT's)"):
        if cast == "on (PEFT's)":
            monkeypatch.setattr(train_mod, "disable_input_dtype_casting", lambda model, active: nullcontext())
        monkeypatch.setattr(FastDropout, "forward", lambda self, x: seen.setdefault(cast, set()).add(x.dtype)
                            or forward(self, x))
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
        base.requires_grad_(False)
        torch.manual_seed(0)  # the same LoRA init and dropout masks both times
        model = attach_lora(base, 4, 8, 0.1, ["q_proj", "v_proj"])
        slot = AdapterSlot(model)
        assert {p.dtype for p in slot.params.values()} == {torch.float32}
        train_mod.train_local(model, list(slot.params.values()), data, cfg.train, seed=0, pad_id=0,
                              device=torch.device("cpu"), amp=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        trained[cast] = slot.get()
        layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert layers and all(m.cast_input_dtype_enabled for m in layers)  # PEFT's setting back
    assert seen == {"off (shipped)": {torch.bfloat16}, "on (PEFT's)": {torch.float32}}
    for k, v in trained["on (PEFT's)"].items():
        np.testing.assert_array_equal(trained["off (shipped)"][k], v)
