"""train.attention and train.compile: the local round trains the same adapter with either
kernel, compiled or not, and the model runs as before afterwards (evaluation and generation)."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from fedtune.fedit.lora import AdapterSlot, attach_lora


def _peft(path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path)
    base.requires_grad_(False)
    return attach_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"])


def _rows():
    from fedtune.data.instructions import Tokenized

    rng = np.random.default_rng(0)
    out = []
    for n in [9, 40, 12, 15, 33, 10, 8, 27]:  # varying widths: dynamic shapes, no recompile per width
        ids = rng.integers(5, 200, n).tolist()
        out.append(Tokenized(ids, [-100] * (n // 2) + ids[n // 2:]))
    return out


def test_compiled_layers_train_the_same_adapter_and_restore_eager_forward(tiny_llama):
    from fedtune import config as C
    from fedtune.fedit.train_speed import decoder_layers
    from torch._dynamo.utils import counters

    from fedtune.fedit.train import train_local

    data = _rows()
    after, stats = {}, {}
    for setting in ("off", "layers"):
        cfg = C.load(None, ["train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=3", "train.lr=1e-2",
                            f"train.compile='{setting}'"])
        torch.manual_seed(0)  # the same initial adapter for both
        model = _peft(tiny_llama)
        slot = AdapterSlot(model)
        start = slot.get()
        counters.clear()
        stats[setting] = train_local(model, list(slot.params.values()), data, cfg.train, seed=3, pad_id=0,
                                     device=torch.device("cpu"), amp=nullcontext)
        after[setting] = slot.get()
        assert (counters["stats"]["unique_graphs"] > 0) == (setting == "layers")  # compiled only when asked
        for layer in decoder_layers(model):  # eager again after the round: no instance-level forward left
            assert "forward" not in layer.__dict__
    assert any(not np.allclose(after["off"][k], start[k]) for k in start)  # training moved the adapter
    for k in after["off"]:
        np.testing.assert_allclose(after["layers"][k], after["off"][k], rtol=1e-4, atol=1e-5)
    assert stats["layers"].loss == pytest.approx(stats["off"].loss, rel=1e-5)


def test_compile_is_refused_with_dpsgd_and_unknown_settings():
    from fedtune import config as C
    from fedtune.errors import ConfigError
    from fedtune.fedit.train_speed import check_supported

    with pytest.raises(ConfigError, match="train.compile"):
        C.load(None, ["train.compile='layers'", "train.dpsgd_noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="train.compile"):
        C.load(None, ["train.compile='model'"])
    with pytest.raises(ValueError, match="DP-SGD"):
        check_supported("layers", torch.device("cpu"), dpsgd=True)


def test_training_attention_is_eager_on_cpu_same_adapter_and_restored(tiny_llama, monkeypatch):
    """train.attention: eager and SDPA train the same adapter (independent kernels, one oracle
    for the other), the kernel is switched only inside the round, and `auto` means eager on CPU
    for micro-batches whose attention scores fit EAGER_MAX_BYTES, SDPA for wider ones."""
    from fedtune import config as C
    from fedtune.fedit import train_speed
    from fedtune.fedit.train import train_local

    assert train_speed.attention_for("auto", torch.device("cpu"), 1000) == "eager"
    assert train_speed.attention_for("auto", torch.device("cpu"), 10**12) is None  # too wide: the model's own
    assert train_speed.attention_for("auto", torch.device("cuda"), 1000) is None
    # tiny Llama: 4 heads x 2 layers; one row per micro-batch: widths <= 24 fit, wider ones do not
    monkeypatch.setattr(train_speed, "EAGER_MAX_BYTES", 1 * 8 * 24 * 24 * train_speed.BYTES_PER_SCORE)
    seen, after = {}, {}
    for setting in ("sdpa", "eager", "auto"):
        cfg = C.load(None, ["train.batch_size=8", "train.micro_batch_size=1", "train.max_steps=3", "train.lr=1e-2",
                            f"train.attention='{setting}'", "train.packing='off'"])  # the kernel of unpacked rows
        torch.manual_seed(0)
        model = _peft(tiny_llama)
        lm = model.get_base_model()
        lm.set_attn_implementation("sdpa")
        slot = AdapterSlot(model)
        attn = lm.model.layers[0].self_attn
        original = attn.forward

        def spy(hidden_states, *a, _orig=original, _setting=setting, **kw):
            seen.setdefault(_setting, set()).add((hidden_states.shape[1] <= 24, lm.config._attn_implementation))
            return _orig(hidden_states, *a, **kw)

        attn.forward = spy
        train_local(model, list(slot.params.values()), _rows(), cfg.train, seed=3, pad_id=0,
                    device=torch.device("cpu"), amp=nullcontext)
        assert lm.config._attn_implementation == "sdpa"  # the model's own again after the round
        after[setting] = slot.get()
    assert {impl for _, impl in seen["sdpa"]} == {"sdpa"} and {impl for _, impl in seen["eager"]} == {"eager"}
    assert seen["auto"] == {(True, "eager"), (False, "sdpa")}  # the rows' widths: both sides of the budget
    for setting in ("eager", "auto"):
        for k in after["sdpa"]:
            np.testing.assert_allclose(after[setting][k], after["sdpa"][k], rtol=1e-4, atol=1e-6)
