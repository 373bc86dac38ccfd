"""The FedIT recipe: wire data, model, clients, strategy and engine from a Config."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.config import Config
from fedtune.core.strategy import FitIns
from fedtune.data import partition as P
from fedtune.data import skills
from fedtune.data.instructions import PromptFormatter, Row, load_rows, tokenize_rows
from fedtune.engines.faults import FaultInjector
from fedtune.engines.simulator import RunState, Simulator, SimulatorSettings, has_checkpoint, load_checkpoint
from fedtune.errors import DataError
from fedtune.fedit.client import FedITClientApp
from fedtune.eval.metrics import generation_scores
from fedtune.fedit.evaluate import generate_answers, heldout_loss
from fedtune.fedit.lora import AdapterSlot, attach_lora, init_adapter, save_adapter
from fedtune.fedit.strategy import FedAvgStrategy
from fedtune.models import load_causal_lm
from fedtune.reporting import write_report


@dataclass
class FederatedData:
    rows: list[Row]  # training rows (the test rows removed)
    test: list[Row]
    parts: list[np.ndarray]  # row indices into `rows`, one array per client

    def client_ids(self) -> list[str]:
        return [f"client_{i:03d}" for i in range(len(self.parts))]

    def client_rows(self) -> dict[str, list[Row]]:
        return {cid: [self.rows[i] for i in p] for cid, p in zip(self.client_ids(), self.parts)}


def prepare_data(cfg: Config) -> FederatedData:
    """Read (or generate) rows, hold out the global test set, and partition the rest."""
    d, pc, seed = cfg.data, cfg.partition, cfg.run.seed
    if d.path == "demo:skills":
        rows = skills.generate(d.demo_rows_per_skill, seed)
    elif d.path.startswith("demo:"):
        raise DataError(f"data.path = '{d.path}': the only generated data set is 'demo:skills'")
    else:
        rows = load_rows(d.path, d.format, d.columns)
    if d.max_rows and len(rows) > d.max_rows:
        keep = np.sort(np.random.default_rng([seed, 7]).choice(len(rows), d.max_rows, replace=False))
        rows = [rows[i] for i in keep]
    if d.test_path:
        test = load_rows(d.test_path, d.format, d.columns)
        held = {r.key() for r in test}
        rows = [r for r in rows if r.key() not in held]
    else:
        train_idx, test_idx = P.holdout_stratified([r.category for r in rows], pc.test_per_category, seed)
        test = [rows[i] for i in test_idx]
        rows = [rows[i] for i in train_idx]
    parts = P.partition([r.category for r in rows], pc.method, pc.num_clients, seed,
                        shards_per_client=pc.shards_per_client, alpha=pc.alpha, min_size=pc.min_client_size)
    return FederatedData(rows, test, parts)


def build_strategy(cfg: Config, initial) -> FedAvgStrategy:
    """The FedIT server step from a config and the initial adapter (no data, no model):
    what every engine's server runs, the embedded simulator's and NVIDIA FLARE's."""
    s = cfg.server
    return FedAvgStrategy(initial, seed=cfg.run.seed, fraction=s.fraction,
                          clients_per_round=s.clients_per_round, aggregation=s.aggregation,
                          server_lr=s.server_lr, momentum=s.momentum, beta2=s.beta2, tau=s.tau,
                          max_update_norm=s.max_update_norm, clip_norm=s.clip_norm, trim_fraction=s.trim_fraction)


class FedIT:
    """Everything a FedIT run holds in memory: one base model, one adapter slot, the
    tokenized client shards and the held-out set."""

    def __init__(self, cfg: Config, data: FederatedData, progress: bool = True):
        self.cfg = cfg
        self.data = data
        self.progress = progress
        self.lm = load_causal_lm(cfg.model)
        self.peft_model = attach_lora(self.lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                      cfg.lora.target_modules)
        self.slot = AdapterSlot(self.peft_model)
        self.initial = init_adapter(self.slot.shapes(), cfg.run.seed)
        self.formatter = PromptFormatter(cfg.data.template, self.lm.tokenizer)
        tok = lambda rows: tokenize_rows(rows, self.formatter, cfg.data.cutoff_len, cfg.data.train_on_inputs,
                                         cfg.data.too_long)
        self.client_data = {cid: tok(rows) for cid, rows in data.client_rows().items()}
        for cid, t in self.client_data.items():
            if not t:
                raise DataError(f"{cid} has no rows left after tokenization (all longer than data.cutoff_len)")
        self.test = P.stratified_subset(data.test, [r.category for r in data.test], cfg.eval.max_examples)
        # Row by row, so that a held-out row whose prompt alone exceeds cutoff_len (too_long = 'drop') leaves
        # the loss without losing the categories of the others; generation still answers every held-out row.
        kept = [(t[0], r.category) for r in self.test for t in [tok([r])] if t]
        self.test_tok = [t for t, _ in kept]
        self.test_cats = [c for _, c in kept]

    def amp(self):
        return self.lm.autocast()

    def evaluate(self, arrays, generate: bool | None = None) -> dict:
        """Held-out loss (and exact match when generating) of an adapter."""
        e = self.cfg.eval
        self.slot.set(arrays)
        pad = self.lm.tokenizer.pad_token_id
        cats = self.test_cats or ["all"] * len(self.test_tok)
        out = heldout_loss(self.peft_model, self.test_tok, cats, batch_size=e.batch_size, pad_id=pad,
                           device=self.lm.device, amp=self.amp)
        if e.generate if generate is None else generate:
            answers = generate_answers(self.peft_model, self.lm.tokenizer, self.formatter, self.test,
                                       batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                       device=self.lm.device, amp=self.amp)
            out.update(generation_scores(answers, [r.output for r in self.test], [r.category for r in self.test]))
            out["samples"] = [{"instruction": r.instruction, "expected": r.output, "answer": a}
                              for r, a in list(zip(self.test, answers))[:3]]
        return out

    def client_app(self, data: dict | None = None, train_cfg=None) -> FedITClientApp:
        """The client app over this run's client shards, or over `data` ({client id:
        tokenized rows}) with `train_cfg` in place of cfg.train (fedtune compare)."""
        def bar_factory(cid: str, total: int):
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"  {cid}", leave=False, dynamic_ncols=True, disable=not self.progress)

            class _Cb:
                def __call__(self, step, loss):
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")

                def close(self):
                    bar.close()

            return _Cb()

        return FedITClientApp(self.slot, self.client_data if data is None else data,
                              self.cfg.train if train_cfg is None else train_cfg, seed=self.cfg.run.seed,
                              pad_id=self.lm.tokenizer.pad_token_id, device=self.lm.device, amp=self.amp,
                              progress_factory=bar_factory)

    def strategy(self) -> FedAvgStrategy:
        return build_strategy(self.cfg, self.initial)

    def save(self, arrays, path: Path) -> Path:
        return save_adapter(arrays, self.peft_model.peft_config["default"], path)


def run(cfg: Config, run_dir: Path, resume: bool = False, console=None) -> dict:
    """Run FedIT in the embedded simulator; returns the summary written to summary.json."""
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    fed = FedIT(cfg, data, progress=cfg.run.progress)
    strategy = fed.strategy()
    sizes = {cid: len(t) for cid, t in fed.client_data.items()}
    if console:
        console.print(f"[bold]FedIT[/] · model {cfg.model.name} on {fed.lm.device} "
                      f"(autocast {fed.lm.amp_dtype or 'off'}) · {len(sizes)} clients "
                      f"({min(sizes.values())}-{max(sizes.values())} rows) · {len(fed.test)} held-out rows · "
                      f"adapter {sum(v.size for v in fed.initial.values()):,} parameters")

    def on_round_end(rnd, arrays, record):
        if cfg.run.save_every_round:
            fed.save(arrays, run_dir / "rounds" / f"round_{rnd:03d}")
        if console:
            ev = record.get("eval", {})
            losses = [c["train_loss"] for c in record["clients"]]
            msg = f"round {rnd:>3}: train loss {np.mean(losses):.4f}"
            if "loss" in ev:
                msg += f" · held-out loss {ev['loss']:.4f}"
            if "exact_match" in ev:
                msg += f" · exact match {ev['exact_match']:.3f}"
            if record["dropped"]:
                msg += f" · dropped {len(record['dropped'])}"
            console.print(msg + f" · {record['round_seconds']:.1f}s")

    sim = Simulator(strategy, fed.client_app(), list(fed.client_data),
                    SimulatorSettings(rounds=cfg.run.rounds, min_clients=cfg.server.min_clients,
                                      client_timeout=cfg.server.client_timeout, round_retries=cfg.server.round_retries,
                                      eval_every=cfg.run.eval_every, progress=cfg.run.progress),
                    evaluate=lambda rnd, arrays: fed.evaluate(arrays, generate=cfg.eval.generate and rnd == cfg.run.rounds),
                    on_round_end=on_round_end, run_dir=run_dir,
                    faults=FaultInjector(cfg.faults.probability, cfg.faults.seed, tuple(cfg.faults.kinds))
                    if cfg.faults.probability > 0 else None)
    state = load_checkpoint(run_dir, strategy) if resume and has_checkpoint(run_dir) else None
    if resume and state is None:  # stopped before round 1 was checkpointed: start over
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        if console:
            console.print("no checkpoint yet (stopped during round 1): starting from round 1")
    if state and console:
        console.print(f"resuming after round {state.round}")
    state = sim.run(state)
    fed.save(state.global_arrays, run_dir / "adapter")

    summary = {"algorithm": "fedit", "rounds": state.round, "final": state.history[-1].get("eval", {}),
               "client_sizes": sizes}
    if cfg.eval.compare_base:
        summary["base"] = fed.evaluate(fed.initial, generate=cfg.eval.generate)  # B = 0: the initial adapter is the base model exactly
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(run_dir, summary)  # report.md + plots/ (cli.cmd_run then writes summary.json beside it)
    return summary
