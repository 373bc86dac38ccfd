"""Loading a model behind the black-box boundary: masked or causal, from the config."""

from __future__ import annotations

from fedtune.errors import ConfigError, ModelError
from fedtune.fedbpt.blackbox import BlackBoxLM


def detect_kind(path) -> str:
    """'masked' or 'causal', from the model's config (architectures, else model_type)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config at {path}: {e}") from None
    archs = cfg.architectures or []
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked"
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal"
    if cfg.model_type in ("bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "distilbert", "albert"):
        return "masked"
    return "causal"


def load_blackbox(model_cfg, fb) -> BlackBoxLM:
    """Load the configured model behind the boundary (`fb` is the [fedbpt] section)."""
    from fedtune.models import (autocast_dtype, load_causal_lm, load_tokenizer, pick_device, resolve_model_path,
                                weight_dtype)

    path = resolve_model_path(model_cfg.name)
    kind = fb.model_kind if fb.model_kind != "auto" else detect_kind(path)
    common = dict(n_prompt_tokens=fb.n_prompt_tokens, prompt_mode=fb.prompt_mode, init_prompt=fb.init_prompt,
                  max_seq_len=fb.max_seq_len, max_forward_rows=fb.max_forward_rows,
                  forward_overhead_tokens=fb.forward_overhead_tokens, share_context=fb.share_context,
                  name=model_cfg.name)
    if kind == "causal":
        lm = load_causal_lm(model_cfg)
        return BlackBoxLM(lm.model, lm.tokenizer, "causal", lm.device, lm.amp_dtype, **common)
    from transformers import AutoModelForMaskedLM

    device = pick_device(model_cfg.device)
    if getattr(model_cfg, "quantization", "none") != "none":
        raise ConfigError(f"model.quantization = '{model_cfg.quantization}' is for causal LMs; '{model_cfg.name}' is "
                          f"a masked LM")
    try:
        model = AutoModelForMaskedLM.from_pretrained(path, dtype=weight_dtype(model_cfg.dtype, device, model_cfg.autocast),
                                                     trust_remote_code=model_cfg.trust_remote_code)
        tok = load_tokenizer(path, model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load masked LM '{model_cfg.name}' (resolved to {path}): {e}") from None
    model.to(device)
    return BlackBoxLM(model, tok, "masked", device, autocast_dtype(model_cfg.autocast, device), **common)
