"""FedIT's algorithm contract (see fedtune.core.algorithm): federated LoRA instruction tuning."""

from __future__ import annotations

from pathlib import Path

from fedtune.core.arrays import Arrays
from fedtune.core.strategy import FitIns, FitRes
from fedtune.errors import DataError


class FedITSite:
    """FedIT on one FLARE site: the frozen base model + LoRA, this site's tokenized rows, and
    the same FedITClientApp the embedded simulator runs."""

    def __init__(self, cfg, settings):
        from fedtune.core.client_state import ClientStateStore
        from fedtune.data.instructions import PromptFormatter, load_rows, tokenize_rows
        from fedtune.fedit.client import FedITClientApp
        from fedtune.fedit.lora import AdapterSlot, attach_lora, rank_slots
        from fedtune.fedit.session import wrap_client
        from fedtune.models import load_causal_lm

        rows = load_rows(str(settings.data_path), settings.format or cfg.data.format, cfg.data.columns)
        lm = load_causal_lm(cfg.model)
        peft_model = attach_lora(lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        formatter = PromptFormatter(cfg.data.template, lm.tokenizer)
        tokenized = tokenize_rows(rows, formatter, cfg.data.cutoff_len, cfg.data.train_on_inputs, cfg.data.too_long)
        if not tokenized:
            raise DataError(f"site '{settings.site}': {settings.data_path}: no rows left after tokenization "
                            f"(all longer than data.cutoff_len = {cfg.data.cutoff_len})")
        self.num_rows = len(tokenized)
        keeps_state = cfg.server.aggregation == "scaffold" or cfg.lora.personal_b  # SCAFFOLD's c_i, FedSA-LoRA's B
        store = ClientStateStore(settings.state_dir) if keeps_state else None
        slots = rank_slots(peft_model, AdapterSlot(peft_model), cfg.lora)  # one adapter per rank of lora.client_ranks
        self.inner = FedITClientApp(slots, {settings.site: tokenized}, cfg.train,
                                    seed=cfg.run.seed, pad_id=lm.tokenizer.pad_token_id, device=lm.device,
                                    amp=lm.autocast, state_store=store, freeze_a=cfg.lora.freeze_a,
                                    personal_b=cfg.lora.personal_b, rounds=cfg.run.rounds)
        self.app = wrap_client(self.inner, cfg)

    def fit(self, client_id: str, ins: FitIns, index: int) -> FitRes:
        self.inner.client_index = {client_id: index}  # seeds data order and dropout as in the embedded simulator
        return self.app.fit(client_id, ins)


class FedITAlgorithm:
    name = "fedit"
    output = "adapter"

    def check_config(self, cfg) -> None:
        pass  # [data], [lora] and [train] are checked by fedtune.config

    def session(self, cfg):
        from fedtune.fedit.session import FedITSession

        return FedITSession(cfg)

    def initial_arrays(self, cfg) -> Arrays:
        from fedtune.fedit.lora import AdapterSlot, attach_lora, init_adapter
        from fedtune.models import load_causal_lm

        lm = load_causal_lm(cfg.model)
        peft_model = attach_lora(lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        return init_adapter(AdapterSlot(peft_model).shapes(), cfg.run.seed)

    def strategy(self, cfg, initial: Arrays, sites: list[str]):
        from fedtune.fedit.session import build_strategy

        return build_strategy(cfg, initial)

    def site_client(self, cfg, settings) -> FedITSite:
        return FedITSite(cfg, settings)

    def needs_data_to_collect(self, cfg) -> bool:
        return False  # the global adapter is the result; held-out evaluation is `fedtune run`'s

    def write_output(self, cfg, arrays: Arrays, folder: Path, rounds: int) -> Path:
        """The global adapter in PEFT's format, from the model's LoRA config."""
        from fedtune.fedit.lora import attach_lora, save_adapter
        from fedtune.models import load_causal_lm, portable_name

        peft_model = attach_lora(load_causal_lm(cfg.model).model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                 cfg.lora.target_modules)
        return save_adapter(arrays, peft_model.peft_config["default"], folder, portable_name(cfg.model.name))


ALGORITHM = FedITAlgorithm()
