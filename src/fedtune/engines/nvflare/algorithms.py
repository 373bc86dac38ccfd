"""What the FLARE engine needs from each algorithm, built from the algorithm's own code.

For every algorithm (FedIT, FedBPT) the engine needs four things:
- `initial_arrays(cfg)`: the initial global arrays, computed where the job is built
  (the server then loads no model);
- `strategy(cfg, initial, sites)`: the server step, the same Strategy object the embedded
  simulator drives (no second FedAvg or CMA-ES);
- `site_client(cfg, settings)`: on a site, the algorithm's ClientApp over that site's own
  data (read from the path in its site config), loaded once and kept across rounds;
- `local_run(cfg)`: for `fedtune run --engine nvflare`, what the embedded recipe does
  around the rounds: partition the data as the embedded simulator does (one file per
  simulated site), evaluate the global arrays on the held-out set, save the adapter/prompt.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.strategy import FitIns, FitRes
from fedtune.errors import ConfigError, DataError


class SiteClient:
    """A ClientApp bound to one site; `index` is the site's position among the job's
    sorted site names (the embedded simulator's client order), sent by the server."""

    def fit(self, client_id: str, ins: FitIns, index: int) -> FitRes:  # pragma: no cover - protocol
        raise NotImplementedError


# ----------------------------------------------------------------------------- FedIT


class FedITSite(SiteClient):
    """FedIT on one site: the frozen base model + LoRA, this site's tokenized rows, and
    fedtune's FedITClientApp (the same client code the embedded simulator runs)."""

    def __init__(self, cfg, settings):
        from fedtune.data.instructions import PromptFormatter, load_rows, tokenize_rows
        from fedtune.fedit.client import FedITClientApp
        from fedtune.fedit.lora import AdapterSlot, attach_lora
        from fedtune.models import load_causal_lm

        rows = load_rows(str(settings.data_path), settings.format or cfg.data.format, cfg.data.columns)
        model_cfg = replace(cfg.model, name=settings.model) if settings.model else cfg.model
        lm = load_causal_lm(model_cfg)
        peft_model = attach_lora(lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        formatter = PromptFormatter(cfg.data.template, lm.tokenizer)
        tokenized = tokenize_rows(rows, formatter, cfg.data.cutoff_len, cfg.data.train_on_inputs, cfg.data.too_long)
        if not tokenized:
            raise DataError(f"site '{settings.site}': {settings.data_path}: no rows left after tokenization "
                            f"(all longer than data.cutoff_len = {cfg.data.cutoff_len})")
        self.site = settings.site
        self.num_rows = len(tokenized)
        self.app = FedITClientApp(AdapterSlot(peft_model), {settings.site: tokenized}, cfg.train, seed=cfg.run.seed,
                                  pad_id=lm.tokenizer.pad_token_id, device=lm.device, amp=lm.autocast)

    def fit(self, client_id: str, ins: FitIns, index: int) -> FitRes:
        self.app.client_index = {client_id: index}  # seeds data order and dropout as in the embedded simulator
        return self.app.fit(client_id, ins)


class FedITLocal:
    """`fedtune run --engine nvflare` for FedIT: the embedded recipe's data, evaluation
    and outputs around FLARE's rounds."""

    def __init__(self, cfg):
        from fedtune.fedit.recipe import FedIT, prepare_data

        self.cfg = cfg
        self.data = prepare_data(cfg)
        self.fed = FedIT(cfg, self.data, progress=cfg.run.progress)
        self.initial = self.fed.initial
        self.sites = self.data.client_ids()
        self.sizes = {cid: len(t) for cid, t in self.fed.client_data.items()}
        self.site_format = "alpaca"  # the schema write_jsonl writes

    def describe(self) -> str:
        f, s = self.fed, self.sizes
        return (f"[bold]FedIT on NVIDIA FLARE (simulator)[/] · model {self.cfg.model.name} · {len(s)} sites "
                f"({min(s.values())}-{max(s.values())} rows) · {len(f.test)} held-out rows · "
                f"adapter {sum(v.size for v in self.initial.values()):,} parameters")

    def write_site_data(self, folder: Path) -> dict[str, Path]:
        from fedtune.data.instructions import write_jsonl

        out = {}
        for cid, rows in self.data.client_rows().items():
            out[cid] = Path(folder) / f"{cid}.jsonl"
            write_jsonl(rows, out[cid])
        return out

    def on_round(self, rnd: int, arrays: Arrays, record: dict, run_dir: Path) -> None:
        """What the embedded recipe does at the end of a round: held-out evaluation, round adapter."""
        cfg = self.cfg
        if rnd % cfg.run.eval_every == 0 or rnd == cfg.run.rounds:
            t_eval = time.perf_counter()
            record["eval"] = self.fed.evaluate(arrays, generate=cfg.eval.generate and rnd == cfg.run.rounds)
            record["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
        if cfg.run.save_every_round:
            self.fed.save(arrays, run_dir / "rounds" / f"round_{rnd:03d}")

    def round_line(self, record: dict) -> str:
        losses = [c["train_loss"] for c in record["clients"] if "train_loss" in c]
        msg = f"round {record['round']:>3}: train loss {np.mean(losses):.4f}" if losses else f"round {record['round']:>3}:"
        ev = record.get("eval", {})
        if "loss" in ev:
            msg += f" · held-out loss {ev['loss']:.4f}"
        if "exact_match" in ev:
            msg += f" · exact match {ev['exact_match']:.3f}"
        if record["dropped"]:
            msg += f" · dropped {len(record['dropped'])}"
        return msg

    def finish(self, run_dir: Path, records: list[dict], final: Arrays) -> dict:
        self.fed.save(final, run_dir / "adapter")
        out = {"algorithm": "fedit", "engine": "nvflare", "rounds": len(records),
               "final": records[-1].get("eval", {}), "client_sizes": self.sizes}
        if self.cfg.eval.compare_base:  # B = 0: the initial adapter is the base model exactly
            out["base"] = self.fed.evaluate(self.initial, generate=self.cfg.eval.generate)
        return out


class FedITAlgorithm:
    name = "fedit"
    output = "adapter"

    def initial_arrays(self, cfg) -> Arrays:
        from fedtune.fedit.lora import AdapterSlot, attach_lora, init_adapter
        from fedtune.models import load_causal_lm

        lm = load_causal_lm(cfg.model)
        peft_model = attach_lora(lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        return init_adapter(AdapterSlot(peft_model).shapes(), cfg.run.seed)

    def strategy(self, cfg, initial: Arrays, sites: list[str]):
        from fedtune.fedit.recipe import build_strategy

        return build_strategy(cfg, initial)

    def site_client(self, cfg, settings) -> SiteClient:
        return FedITSite(cfg, settings)

    def local_run(self, cfg) -> FedITLocal:
        return FedITLocal(cfg)

    def write_output(self, cfg, arrays: Arrays, folder: Path, rounds: int) -> Path:
        """The global adapter in PEFT's format (`fedtune nvflare collect`), from the model's LoRA config."""
        from fedtune.fedit.lora import attach_lora, save_adapter
        from fedtune.models import load_causal_lm

        peft_model = attach_lora(load_causal_lm(cfg.model).model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                 cfg.lora.target_modules)
        return save_adapter(arrays, peft_model.peft_config["default"], folder)


# ----------------------------------------------------------------------------- registry


def get_algorithm(name: str):
    if name == "fedit":
        return FedITAlgorithm()
    if name == "fedbpt":
        from fedtune.engines.nvflare.fedbpt_glue import FedBPTAlgorithm

        return FedBPTAlgorithm()
    raise ConfigError(f"run.algorithm = '{name}' is not available on NVIDIA FLARE (fedit, fedbpt)")
