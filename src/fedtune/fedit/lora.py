"""LoRA adapters as named arrays: attach, read (copied), write (strictly), initialise
from a seed, and save in PEFT's own format.

Wire keys are exactly PEFT's portable keys (`get_peft_model_state_dict`: the adapter
name stripped), so a saved global adapter opens with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from fedtune.core import atomic
from fedtune.core.arrays import Arrays
from fedtune.core.lora_math import lora_pairs, split_stack
from fedtune.errors import ConfigError, UpdateRejected

ADAPTER = "default"


def base_lm(model):
    """The Hugging Face model inside a PEFT wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attach_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Wrap a frozen causal LM with a trainable LoRA adapter (PEFT)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [t for t in target_modules if t not in names]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules: {unknown} not found in the model; its linear layers are {linear}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


class AdapterSlot:
    """The live LoRA parameters of one adapter of a PEFT model, addressed by PEFT's portable keys."""

    def __init__(self, peft_model, adapter: str = ADAPTER):
        self.model = peft_model
        self.adapter = adapter
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, p in peft_model.named_parameters():
            if "lora_" not in name:
                continue
            if f".{adapter}." in name:
                self.params[name.replace(f".{adapter}.", ".")] = p
            elif name.endswith(f".{adapter}"):  # embedding LoRA: a ParameterDict entry (PEFT's key keeps it)
                self.params[name[:-len(adapter)] + ADAPTER] = p

    @property
    def rank(self) -> int:
        return min(p.shape[0] for k, p in self.params.items() if ".lora_A." in k)

    def keys(self) -> list[str]:
        return sorted(self.params)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(p.shape) for k, p in self.params.items()}

    def get(self) -> Arrays:
        """A copy of the adapter (never a view of the live parameters)."""
        return {k: p.detach().to("cpu", torch.float32).numpy().copy() for k, p in sorted(self.params.items())}

    def set(self, arrays: Arrays) -> None:
        """Load an adapter; raises on any missing or unexpected key or a shape mismatch."""
        missing = sorted(set(self.params) - set(arrays))
        unexpected = sorted(set(arrays) - set(self.params))
        if missing or unexpected:
            raise UpdateRejected(f"adapter keys do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
                                 f" ({len(missing)} missing, {len(unexpected)} unexpected)")
        for k, p in self.params.items():  # every shape first: a mismatch leaves the model untouched
            if tuple(arrays[k].shape) != tuple(p.shape):
                raise UpdateRejected(f"adapter '{k}': shape {tuple(arrays[k].shape)}, model expects {tuple(p.shape)}")
        if self.model.active_adapter != self.adapter:  # the model computes with the adapter just loaded
            self.model.set_adapter(self.adapter)
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.from_numpy(np.ascontiguousarray(arrays[k])))


def is_b(key: str) -> bool:
    """A LoRA B factor (what FedSA-LoRA keeps on each client)."""
    return ".lora_B." in key or ".lora_embedding_B" in key


def rank_slots(peft_model, slot: AdapterSlot, lora_cfg) -> dict[int, AdapterSlot]:
    """One adapter per rank of lora.client_ranks besides the global one (rank lora.r), each with
    lora_alpha scaled by r_i / r so that every rank applies the same scale alpha / r to B A: a
    rank-r_i client's B A is then directly a part of the global one."""
    from peft import LoraConfig

    out = {slot.rank: slot}
    for r in sorted(set(lora_cfg.client_ranks or [])):
        if r not in out and f"rank{r}" not in peft_model.peft_config:
            peft_model.add_adapter(f"rank{r}", LoraConfig(r=r, lora_alpha=lora_cfg.alpha * r / lora_cfg.r,
                                                          lora_dropout=lora_cfg.dropout,
                                                          target_modules=list(lora_cfg.target_modules), bias="none",
                                                          task_type="CAUSAL_LM"))
        if r not in out:
            out[r] = AdapterSlot(peft_model, f"rank{r}")
    peft_model.set_adapter(slot.adapter)
    return out


def init_adapter(shapes: dict[str, tuple[int, ...]], seed: int) -> Arrays:
    """PEFT's default LoRA init, drawn with numpy from the run seed so that every engine
    (and a server that never loads the model) builds the same initial adapter:
    A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)), B = 0; on
    embedding layers, as PEFT does there, A = 0 and B ~ N(0, 1) (both zero would never train)."""
    out = {}
    for i, k in enumerate(sorted(shapes)):
        shape = shapes[k]
        if ".lora_embedding_B" in k:
            out[k] = np.random.default_rng([seed, i]).standard_normal(shape).astype(np.float32)
        elif ".lora_A." in k:
            bound = 1.0 / math.sqrt(shape[1])
            rng = np.random.default_rng([seed, i])
            out[k] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[k] = np.zeros(shape, dtype=np.float32)
    return out


def portable(arrays: Arrays, peft_config) -> tuple[Arrays, object]:
    """The adapter and its PEFT config as saved. A FLoRA global (stacked factors of rank R beside
    the round's fresh adapter, whose B is 0) is saved as the rank-R adapter B_stack A_stack, with
    lora_alpha = alpha R / r so that PEFT's scale alpha / r is the one the clients trained with."""
    adapter, stack = split_stack(arrays)
    if not stack or not all(v.size for v in stack.values()):
        return adapter, peft_config
    ranks = {stack[a].shape[0] for a, _ in lora_pairs(stack).values()}
    if len(ranks) != 1:
        raise ValueError(f"stacked factors of different ranks {sorted(ranks)}")
    rank = ranks.pop()
    out = copy.deepcopy(peft_config)
    out.lora_alpha, out.r = peft_config.lora_alpha * rank / peft_config.r, rank
    return stack, out


def save_adapter(arrays: Arrays, peft_config, path: str | Path, base_model: str | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json (PEFT format), atomically (a new
    folder swapped in: see core.atomic). `base_model` is written as base_model_name_or_path
    (the model's name, not this machine's cache path); target_modules are written sorted, so
    two identical runs write identical files. A FLoRA global is saved as its stack (`portable`)."""
    arrays, peft_config = portable(arrays, peft_config)

    def fill(tmp: Path) -> None:
        save_file({k: np.ascontiguousarray(v) for k, v in sorted(arrays.items())},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_config.save_pretrained(str(tmp))  # adapter_config.json, as PEFT writes it
        cfg_path = tmp / "adapter_config.json"
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
        if isinstance(doc.get("target_modules"), list):
            doc["target_modules"] = sorted(doc["target_modules"])
        if base_model is not None:
            doc["base_model_name_or_path"] = base_model
        cfg_path.write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")

    return atomic.publish_dir(path, fill)
