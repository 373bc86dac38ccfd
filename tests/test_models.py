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
