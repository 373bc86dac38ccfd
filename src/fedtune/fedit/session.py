"""A FedIT run on the driver's side: data, the frozen model with its adapter slot, the
held-out evaluation, and the outputs (per-round and final adapters in PEFT's format).

The same session serves every engine: the embedded simulator uses its client app and
evaluates each round as it ends; `fedtune run --engine nvflare` writes each site's data
file and evaluates the rounds FLARE's server produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.config import Config
from fedtune.core.arrays import Arrays
from fedtune.core.lora_math import split_stack
from fedtune.data import partition as P
from fedtune.data import skills
from fedtune.data.instructions import PromptFormatter, Row, load_rows, tokenize_rows, write_jsonl
from fedtune.core.client_state import ClientStateStore
from fedtune.core.dp_client import DistributedDPClient
from fedtune.core.privacy import DPSettings, epsilon_text, privacy_summary
from fedtune.core.secagg import SecAggSettings
from fedtune.core.secagg_client import SecAggClient
from fedtune.errors import ConfigError, DataError
from fedtune.eval.metrics import generation_scores
from fedtune.fedit.client import FedITClientApp
from fedtune.fedit.dpsgd import SampleLedger
from fedtune.fedit.evaluate import generate_answers, heldout_loss
from fedtune.fedit.flora import applied
from fedtune.fedit.lora import AdapterSlot, attach_lora, init_adapter, rank_slots, save_adapter
from fedtune.fedit.strategy import FedAvgStrategy
from fedtune.models import load_causal_lm, portable_name


@dataclass
class FederatedData:
    rows: list[Row]  # training rows (the test rows removed)
    test: list[Row]
    parts: list[np.ndarray]  # row indices into `rows`, one array per client
    overlap_removed: int = 0  # training rows dropped because they repeat a test row

    def client_ids(self) -> list[str]:
        return [f"client_{i:03d}" for i in range(len(self.parts))]

    def client_rows(self) -> dict[str, list[Row]]:
        return {cid: [self.rows[i] for i in p] for cid, p in zip(self.client_ids(), self.parts)}


def prepare_data(cfg: Config) -> FederatedData:
    """Read (or generate) rows, hold out the global test set, drop training rows that repeat a
    test row (normalized text), and partition the rest."""
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
    else:
        train_idx, test_idx = P.holdout_stratified([r.category for r in rows], pc.test_per_category, seed)
        test = [rows[i] for i in test_idx]
        rows = [rows[i] for i in train_idx]
    held = {r.norm_key() for r in test}
    kept = [r for r in rows if r.norm_key() not in held]
    removed = len(rows) - len(kept)
    if not kept:
        raise DataError(f"data.path = '{d.path}': no training rows left after removing those that repeat a test row")
    parts = P.partition([r.category for r in kept], pc.method, pc.num_clients, seed,
                        shards_per_client=pc.shards_per_client, alpha=pc.alpha, min_size=pc.min_client_size)
    return FederatedData(kept, test, parts, removed)


def trainable(cfg: Config):
    """Which adapter arrays are updates (None: all; FFA-LoRA: only the B factors train)."""
    return (lambda k: ".lora_A." not in k) if cfg.lora.freeze_a else None


def wrap_client(app, cfg: Config):
    """The client app as the config's privacy needs it: distributed DP (clip and noise on the
    client) inside secure aggregation (the client's update never leaves it unmasked)."""
    if cfg.privacy.mode == "distributed":
        app = DistributedDPClient(app, cfg.privacy.noise_multiplier, trainable(cfg))
    if cfg.secagg.enabled:
        app = SecAggClient(app, cfg.server.max_examples, unit_weight=cfg.privacy.mode == "distributed")
    return app


def build_strategy(cfg: Config, initial: Arrays) -> FedAvgStrategy:
    """The FedIT server step from a config and the initial adapter (no data, no model)."""
    s = cfg.server
    return FedAvgStrategy(initial, seed=cfg.run.seed, fraction=s.fraction,
                          clients_per_round=s.clients_per_round, aggregation=s.aggregation,
                          server_lr=s.server_lr, momentum=s.momentum, beta2=s.beta2, tau=s.tau,
                          max_update_norm=s.max_update_norm, clip_norm=s.clip_norm, trim_fraction=s.trim_fraction,
                          byzantine=s.byzantine, krum_select=s.krum_select,
                          lora_aggregation=s.lora_aggregation, lora_rank=cfg.lora.r, dp=DPSettings.from_config(cfg.privacy, cfg.run.rounds),
                          trainable=trainable(cfg), client_ranks=cfg.lora.client_ranks,
                          fedexp_epsilon=s.fedexp_epsilon,
                          secagg=SecAggSettings(cfg.secagg.neighbours, cfg.secagg.threshold) if cfg.secagg.enabled else None)


def _bar_factory(progress: bool):
    def make(cid: str, total: int):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"  {cid}", leave=False, dynamic_ncols=True, disable=not progress)

        class _Cb:
            def __call__(self, step, loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            def close(self):
                bar.close()

        return _Cb()
    return make


class FedITSession:
    """Everything a FedIT run holds in memory: one base model, one adapter slot, the
    tokenized client shards and the held-out set."""

    site_format = "alpaca"  # the schema write_jsonl writes

    def __init__(self, cfg: Config, data: FederatedData | None = None):
        self.cfg = cfg
        self.data = data or prepare_data(cfg)
        self.progress = cfg.run.progress
        self.lm = load_causal_lm(cfg.model)
        self.peft_model = attach_lora(self.lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout,
                                      cfg.lora.target_modules)
        self.slot = AdapterSlot(self.peft_model)
        self.rank_slots = rank_slots(self.peft_model, self.slot, cfg.lora)  # heterogeneous ranks: one adapter each
        self.initial = init_adapter(self.slot.shapes(), cfg.run.seed)
        self.formatter = PromptFormatter(cfg.data.template, self.lm.tokenizer)
        self.client_data = {cid: self.tokenize(rows) for cid, rows in self.data.client_rows().items()}
        for cid, t in self.client_data.items():
            if not t:
                raise DataError(f"{cid} has no rows left after tokenization (all longer than data.cutoff_len)")
        self.client_ids = list(self.client_data)
        self.client_sizes = {cid: len(t) for cid, t in self.client_data.items()}
        self.test = P.stratified_subset(self.data.test, [r.category for r in self.data.test], cfg.eval.max_examples)
        # Row by row, so that a held-out row whose prompt alone exceeds cutoff_len (too_long = 'drop') leaves
        # the loss without losing the categories of the others; generation still answers every held-out row.
        kept = [(t[0], r.category) for r in self.test for t in [self.tokenize([r])] if t]
        self.test_tok = [t for t, _ in kept]
        self.test_cats = [c for _, c in kept]
        self.run_dir: Path | None = None
        t = cfg.train
        self.dpsgd = SampleLedger(t.dpsgd_noise_multiplier, t.batch_size, t.dpsgd_delta) \
            if t.dpsgd_noise_multiplier > 0 else None

    def tokenize(self, rows: list[Row]):
        d = self.cfg.data
        return tokenize_rows(rows, self.formatter, d.cutoff_len, d.train_on_inputs, d.too_long)

    # ------------------------------------------------------------------ what the driver asks for

    def strategy(self) -> FedAvgStrategy:
        return build_strategy(self.cfg, self.initial)

    def client_app(self, data: dict | None = None, train_cfg=None, cfg: Config | None = None,
                   state_dir: Path | None = None) -> FedITClientApp:
        """The client app over this run's client shards, or over `data` ({client id: tokenized
        rows}) with `train_cfg` in place of cfg.train, and `cfg`'s [server]/[lora] choices in
        place of the run's (fedtune compare); SCAFFOLD's client state goes to `state_dir`."""
        cfg = cfg or self.cfg
        store = None
        if cfg.server.aggregation == "scaffold" or cfg.lora.personal_b:  # client state, on disk in the run folder
            folder = state_dir or (self.run_dir / "client_state" if self.run_dir else None)
            if folder is None:
                raise ConfigError("SCAFFOLD's control variates and FedSA-LoRA's B factors are kept per client in the "
                                  "run folder; none is set")
            store = ClientStateStore(folder)
        slots = self.rank_slots if cfg is self.cfg else rank_slots(self.peft_model, self.slot, cfg.lora)
        app = FedITClientApp(slots, self.client_data if data is None else data,
                             cfg.train if train_cfg is None else train_cfg, seed=cfg.run.seed,
                             pad_id=self.lm.tokenizer.pad_token_id, device=self.lm.device, amp=self.lm.autocast,
                             progress_factory=_bar_factory(self.progress), state_store=store,
                             freeze_a=cfg.lora.freeze_a, personal_b=cfg.lora.personal_b, rounds=cfg.run.rounds)
        return wrap_client(app, cfg)

    def describe(self, engine: str) -> str:
        s = self.client_sizes
        where = "" if engine == "simulator" else " on NVIDIA FLARE (simulator)"
        overlap = f" · {self.data.overlap_removed} training row(s) repeating a test row removed" \
            if self.data.overlap_removed else ""
        return (f"[bold]FedIT[/]{where} · model {self.cfg.model.name} on {self.lm.device} "
                f"(autocast {self.lm.amp_dtype or 'off'}) · {len(s)} clients ({min(s.values())}-{max(s.values())} rows)"
                f" · {len(self.test)} held-out rows · adapter {sum(v.size for v in self.initial.values()):,} "
                f"parameters{overlap}")

    def evaluate(self, rnd: int, arrays: Arrays) -> dict:
        return self.evaluate_adapter(arrays, generate=self.cfg.eval.generate and rnd == self.cfg.run.rounds)

    def evaluate_adapter(self, arrays: Arrays, generate: bool | None = None, categories: set | None = None) -> dict:
        """Held-out loss (and exact match when generating) of an adapter, on every held-out row
        or on those of `categories`."""
        keep = [i for i, r in enumerate(self.test) if categories is None or r.category in categories]
        test = [self.test[i] for i in keep]
        tok_keep = [i for i, c in enumerate(self.test_cats) if categories is None or c in categories]
        if not test:
            return {"rows": 0}  # no held-out rows (partition.test_per_category = 0): no metric, not a zero
        cats = [self.test_cats[i] for i in tok_keep] or ["all"] * len(self.test_tok)
        toks = [self.test_tok[i] for i in tok_keep] if self.test_cats else self.test_tok
        adapter, stack = split_stack(arrays)  # FLoRA: the stacked factors act through hooks
        self.slot.set(adapter)
        with applied(self.peft_model, stack, self.slot.adapter, self.lm.device):
            return self._scores(test, toks, cats, generate)

    def _scores(self, test, toks, cats, generate) -> dict:
        e = self.cfg.eval
        pad = self.lm.tokenizer.pad_token_id
        out = heldout_loss(self.peft_model, toks, cats, batch_size=e.batch_size, pad_id=pad,
                           device=self.lm.device, amp=self.lm.autocast)
        if e.generate if generate is None else generate:
            answers = generate_answers(self.peft_model, self.lm.tokenizer, self.formatter, test,
                                       batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                       device=self.lm.device, amp=self.lm.autocast)
            out.update(generation_scores(answers, [r.output for r in test], [r.category for r in test]))
            out["samples"] = [{"instruction": r.instruction, "expected": r.output, "answer": a}
                              for r, a in list(zip(test, answers))[:3]]
        return out

    def personalized(self, final: Arrays, folder: Path) -> dict:
        """FedSA-LoRA: each client's model (the global A with its own B) on the held-out rows of the
        categories it holds; the mean over clients."""
        store, per = ClientStateStore(folder), {}
        for cid, rows in self.data.client_rows().items():
            own = store.load(cid, 10**9)
            if own is None:
                continue  # never selected
            per[cid] = self.evaluate_adapter({**final, **own}, generate=self.cfg.eval.generate,
                                             categories={r.category for r in rows})
        scored = [m for m in per.values() if m.get("rows", 1)]
        out = {"clients": per}
        for k in ("loss", "exact_match", "rouge_l"):
            vals = [m[k] for m in scored if k in m]
            if vals:
                out[f"mean_{k}"] = float(np.mean(vals))
        return out

    def on_round_end(self, rnd: int, arrays: Arrays, record: dict) -> None:
        if self.dpsgd is not None:  # sample-level DP: each client's rows over every step it took so far
            record["dpsgd"] = self.dpsgd.add(record)
        if self.cfg.run.save_every_round:
            self.save(arrays, self.run_dir / "rounds" / f"round_{rnd:03d}")

    def round_line(self, record: dict) -> str:
        losses = [c["train_loss"] for c in record["clients"] if "train_loss" in c]
        msg = f"round {record['round']:>3}: train loss {np.mean(losses):.4f}" if losses else f"round {record['round']:>3}:"
        ev = record.get("eval", {})
        if "loss" in ev:
            msg += f" · held-out loss {ev['loss']:.4f}"
        if "exact_match" in ev:
            msg += f" · exact match {ev['exact_match']:.3f}"
        msg += epsilon_text(record)
        if "dpsgd" in record:
            msg += f" · sample-level ε ≤ {record['dpsgd']['epsilon_max']:.3g}"
        if record["dropped"]:
            msg += f" · dropped {len(record['dropped'])}"
        return msg

    def state(self) -> tuple[Arrays, dict]:
        return {}, (self.dpsgd.state() if self.dpsgd is not None else {})

    def load_state(self, arrays: Arrays, meta: dict) -> None:
        if self.dpsgd is not None:
            self.dpsgd.load_state(meta)

    # ------------------------------------------------------------------ outputs

    def write_site_data(self, folder: Path) -> dict[str, Path]:
        out = {}
        for cid, rows in self.data.client_rows().items():
            out[cid] = Path(folder) / f"{cid}.jsonl"
            write_jsonl(rows, out[cid])
        return out

    def save(self, arrays: Arrays, path: Path) -> Path:
        return save_adapter(arrays, self.peft_model.peft_config["default"], path, portable_name(self.cfg.model.name))

    def finish(self, run_dir: Path, history: list[dict], final: Arrays) -> dict:
        self.save(final, run_dir / "adapter")
        summary = {"algorithm": "fedit", "rounds": len(history), "final": history[-1].get("eval", {}),
                   "client_sizes": self.client_sizes, "test_overlap_removed": self.data.overlap_removed}
        if (pv := privacy_summary(history)):
            summary["privacy"] = pv
        if "dpsgd" in history[-1]:
            summary["privacy_sample_level"] = history[-1]["dpsgd"]
        if self.cfg.eval.compare_base:  # B = 0: the initial adapter is the base model exactly
            summary["base"] = self.evaluate_adapter(self.initial, generate=self.cfg.eval.generate)
        if self.cfg.lora.personal_b and (run_dir / "client_state").is_dir():  # on FLARE each site keeps its B
            summary["personalized"] = self.personalized(final, run_dir / "client_state")
        return summary
