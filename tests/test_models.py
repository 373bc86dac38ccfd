"""Model loading rules that need no real model: families whose logits are transformed after
the LM head are refused by name; the embedded model's adapter names its hub id."""

import pytest

from fedtune.errors import ModelError
from fedtune.models import check_logit_handling, portable_name


class Cfg:
    def __init__(self, **kw):
        self.model_type = kw.pop("model_type", "x")
        self.__dict__.update(kw)


@pytest.mark.parametrize("cfg,field", [
    (Cfg(model_type="gemma2", final_logit_softcapping=30.0), "final_logit_softcapping"),
    (Cfg(model_type="gemma2", attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (Cfg(model_type="granite", logits_scaling=8.0), "logits_scaling"),
    (Cfg(model_type="cohere", logit_scale=0.0625), "logit_scale"),
    (Cfg(model_type="gemma3", text_config=Cfg(model_type="gemma3_text", final_logit_softcapping=30.0)),
     "final_logit_softcapping"),
])
def test_models_that_transform_their_logits_are_refused_by_name(cfg, field):
    with pytest.raises(ModelError, match=rf"model 'm' \(\w+\) sets {field} = .*not supported"):
        check_logit_handling(cfg, "m")


@pytest.mark.parametrize("cfg", [Cfg(model_type="llama"), Cfg(final_logit_softcapping=None), Cfg(logits_scaling=1.0),
                                 Cfg(model_type="gemma3_text", final_logit_softcapping=None)])
def test_plain_heads_load(cfg):
    check_logit_handling(cfg, "m")


def test_the_embedded_model_is_named_by_its_hub_id_elsewhere():
    assert portable_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("/models/mine") == "/models/mine"


def test_model_dtype_auto_takes_bf16_only_where_it_is_native(monkeypatch):
    import torch

    from fedtune import models

    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.weight_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)  # an AVX2-only CPU emulates bf16
    assert models.weight_dtype("auto", cpu) == torch.float32
    assert models.weight_dtype("bfloat16", cpu) == torch.bfloat16  # an explicit setting is kept
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.weight_dtype("auto", cpu, "off") == torch.float32  # float32 compute asked for: float32 weights
    assert models.weight_dtype("auto", cpu, "fp16") == torch.float32
    assert models.weight_dtype("auto", cpu, "bf16") == torch.bfloat16
    assert models.weight_dtype("float32", cpu, "bf16") == torch.float32


def test_model_dtype_defaults_to_auto():
    """The frozen base weights follow the hardware by default (bf16 where it is native)."""
    from fedtune import config as C

    assert C.load(None, []).model.dtype == "auto"


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_qlora_trains_a_plain_adapter_on_quantized_base_weights(tmp_path, quant):
    """model.quantization: the base model's linear layers are bitsandbytes' 4-bit / 8-bit ones, the
    LoRA adapter has the same keys and shapes as on full-precision weights, restores exactly, and
    a FedIT round trains it. The tiny Llama is 64 wide: bitsandbytes' 4-bit CPU kernel on
    AVX512-BF16 CPUs needs input widths that are multiples of its block size, 64."""
    pytest.importorskip("bitsandbytes", reason="model.quantization needs bitsandbytes (pip install 'fedtune[qlora]')")
    import json

    from conftest import make_tiny_llama

    tiny_llama = make_tiny_llama(tmp_path / "tiny64", hidden=64)

    import numpy as np

    from fedtune import config as C
    from fedtune import runner
    from fedtune.fedit.lora import AdapterSlot, attach_lora
    from fedtune.models import load_causal_lm

    base = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'"])
    quantized = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'",
                              f"model.quantization='{quant}'"])
    lm = load_causal_lm(quantized.model)
    kind = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[quant]
    assert type(lm.model.model.layers[0].self_attn.q_proj).__name__ == kind
    slot = AdapterSlot(attach_lora(lm.model, 4, 8, 0.0, ["q_proj", "v_proj"]))
    ref = AdapterSlot(attach_lora(load_causal_lm(base.model).model, 4, 8, 0.0, ["q_proj", "v_proj"]))
    assert slot.shapes() == ref.shapes()
    want = {k: np.random.default_rng(0).standard_normal(v.shape).astype(np.float32) for k, v in slot.get().items()}
    slot.set(want)
    assert all(np.array_equal(slot.get()[k], want[k]) for k in want)  # exact restore
    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'",
                        f"model.quantization='{quant}'", "data.demo_rows_per_skill=16", "partition.num_clients=2",
                        "partition.test_per_category=1", "train.max_steps=1", "train.batch_size=2",
                        "train.micro_batch_size=2", "eval.generate=false", "eval.compare_base=false", "run.rounds=1",
                        "run.progress=false", "lora.r=4"])
    (tmp_path / "run").mkdir()
    summary = runner.run(cfg, tmp_path / "run")
    assert summary["rounds"] == 1 and np.isfinite(summary["final"]["loss"])


def test_4bit_layer_too_narrow_for_the_cpu_kernel_is_a_clear_error():
    from types import SimpleNamespace

    import torch

    from fedtune.errors import ModelError
    from fedtune.models import check_4bit_cpu_shapes

    def layer(width, fast):
        m = torch.nn.Module()
        m.weight = SimpleNamespace(quant_state=SimpleNamespace(shape=(32, width), blocksize=64))
        m.support_avx512bf16_for_cpu = fast
        return m

    ok = torch.nn.Sequential(layer(128, True), layer(32, False))  # a narrow layer off the fast path is fine
    check_4bit_cpu_shapes(ok, "m")
    with pytest.raises(ModelError, match=r"block size 64; 1 has 32"):
        check_4bit_cpu_shapes(torch.nn.Sequential(layer(128, True), layer(32, True)), "m")


def test_quantization_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import builtins

    import torch

    from fedtune.errors import ModelError
    from fedtune.models import bnb_config

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError("no module"))
                        if name == "bitsandbytes" else real(name, *a, **k))
    with pytest.raises(ModelError, match=r"model.quantization = 'nf4' needs bitsandbytes: pip install 'fedtune\[qlora\]'"):
        bnb_config("nf4", torch.device("cpu"))


def test_a_chunked_embedded_model_is_assembled_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    from fedtune import models

    for pkg, files in {"fk_main": {"SHA256SUMS": None}, "fk_part1": {"m.gguf.part00": b"GGUF-a"},
                       "fk_part2": {"m.gguf.part01": b"-b"}}.items():
        (tmp_path / pkg / "data").mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("raise ImportError('never imported')")
        for name, data in files.items():
            if data is not None:
                (tmp_path / pkg / "data" / name).write_bytes(data)
    good = hashlib.sha256(b"GGUF-a-b").hexdigest()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.CHUNKED, "fake", ("fk_main", "m.gguf", [("fk_part1", "m.gguf.part00"),
                                                                        ("fk_part2", "m.gguf.part01")]))
    (tmp_path / "fk_main" / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  m.gguf\n")
    with pytest.raises(ModelError, match=f"has SHA-256 {good}, expected {'0' * 64}"):
        models._assemble_chunked("fake")
    assert not (tmp_path / "cache" / "gguf" / "m.gguf").exists()  # nothing half-checked is kept
    (tmp_path / "fk_main" / "data" / "SHA256SUMS").write_text(f"{good}  m.gguf\n")
    assert models._assemble_chunked("fake").read_bytes() == b"GGUF-a-b"
    monkeypatch.setitem(models.CHUNKED, "gone", ("fk_absent", "m.gguf", []))
    with pytest.raises(ModelError, match=r"package 'fk-absent' is not installed; run: pip install 'fedtune\[gemma3\]'"):
        models._assemble_chunked("gone")
