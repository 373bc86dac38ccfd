"""A FedBPT run on the driver's side: task data, the black box, the projection, dev and test
evaluation, best-by-dev prompt selection (kept in the checkpoint), and the saved prompts.

Each round the driver records the global prompt's dev metric and loss (metrics.jsonl);
the session keeps the best prompt on dev (by metric, or by loss with fedbpt.select_by; round 0,
the zero prompt, included). At the end it reports the test metric of the zero prompt, the
best-by-dev prompt and the final-round prompt, and saves the selected global prompt
(best-by-dev, or the final one when fedbpt.select_on_dev is off) under <run>/prompt,
reusable by `fedtune classify`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.config import Config
from fedtune.core import atomic
from fedtune.core.arrays import Arrays
from fedtune.core.privacy import DPSettings, epsilon_text, privacy_summary
from fedtune.data import partition as P
from fedtune.data.instructions import normalize_text
from fedtune.errors import ConfigError
from fedtune.fedbpt import objective as O
from fedtune.fedbpt.blackbox import BlackBoxLM
from fedtune.fedbpt.encoded import Encoded, numpy_blas_single_threaded
from fedtune.fedbpt.es import initial_sigma
from fedtune.fedbpt.loading import load_blackbox
from fedtune.fedbpt.calibration import calibrate, content_free_texts
from fedtune.fedbpt.client import FedBPTClientApp, LocalSettings, Shard
from fedtune.fedbpt.prompt import Projection, ProjectionSpec, save_prompt
from fedtune.fedbpt.deep import DeepProjection
from fedtune.fedbpt.deep_strategy import DeepGenerationStrategy
from fedtune.fedbpt.generation import GenerationStrategy
from fedtune.fedbpt.search import Choice, resolved, search, space_from_config
from fedtune.fedbpt.strategy import FedBPTStrategy, Fixes
from fedtune.fedbpt.table import TableFormat
from fedtune.fedbpt.tasks import (Example, TaskSpec, few_shot, for_model, hub_path, load_examples, space_before_answer,
                                  task_from_config)


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    parts: list[np.ndarray]  # indices into `train`, one array per client
    test_source: str = ""
    overlap_removed: int = 0  # rows of the training file dropped because they repeat a test row

    def client_ids(self) -> list[str]:
        return [f"client_{i:03d}" for i in range(len(self.parts))]

    def client_rows(self) -> dict[str, list[Example]]:
        return {cid: [self.train[i] for i in p] for cid, p in zip(self.client_ids(), self.parts)}


def prepare_task(cfg: Config) -> TaskData:
    """Read the task's files, draw k-shot train and dev splits, split train across clients."""
    t, pc, seed = cfg.task, cfg.partition, cfg.run.seed
    spec = task_from_config(t)
    train_path = t.train_path or hub_path(spec, "train")  # a local file beside an unset path: refused at config load
    test_path = t.test_path or hub_path(spec, "test")
    fmt = TableFormat.from_task(t)
    test = load_examples(spec, test_path, fmt)
    if t.test_max_rows:
        test = P.stratified_subset(test, [str(e.label) for e in test], t.test_max_rows)
    held = {tuple(normalize_text(x) for x in e.texts) for e in test}
    pool = load_examples(spec, train_path, fmt)
    kept = [e for e in pool if tuple(normalize_text(x) for x in e.texts) not in held]  # never train or select on test
    shots = few_shot(kept, spec, t.k_shot, t.dev_shots, seed, source=train_path)
    parts = P.partition([str(e.label) for e in shots.train], pc.method, pc.num_clients, seed,
                        shards_per_client=pc.shards_per_client, alpha=pc.alpha, min_size=pc.min_client_size)
    return TaskData(spec, shots.train, shots.dev, test, parts, test_path, len(pool) - len(kept))


@dataclass
class EvalSet:
    """Rows for evaluation in length-sorted batches (little padding), with their labels."""

    batches: list[tuple[Encoded, np.ndarray]]

    def __len__(self) -> int:
        return sum(len(y) for _, y in self.batches)


def encode_eval(box: BlackBoxLM, spec: TaskSpec, examples: list[Example], batch_size: int) -> EvalSet:
    if not examples:
        return EvalSet([])
    enc = box.encode_texts(spec, [e.texts for e in examples])
    labels = np.array([e.label for e in examples], dtype=np.int64)
    order = np.argsort(enc.attention_mask.sum(1), kind="stable")
    batches = []
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        t = int(enc.attention_mask[idx].sum(1).max())
        batches.append((Encoded(enc.input_ids[idx, :t], enc.attention_mask[idx, :t], enc.slot_start[idx],
                                enc.answer_pos[idx], enc.free[idx, :t]), labels[idx]))
    return EvalSet(batches)


def build_strategy(cfg: Config, num_clients: int) -> FedBPTStrategy | GenerationStrategy:
    """The FedBPT server step from a config and the number of clients (no data, no model)."""
    fb, s = cfg.fedbpt, cfg.server
    dp = DPSettings.from_config(cfg.privacy, cfg.run.rounds)
    if fb.mode == "generation" and fb.deep:
        n_layers = model_layers(cfg.model)
        if fb.deep_layers > n_layers:
            raise ConfigError(f"fedbpt.deep_layers = {fb.deep_layers}, but {cfg.model.name} has {n_layers} layers")
        return DeepGenerationStrategy(n_layers=n_layers, rounds_per_layer=fb.deep_rounds_per_layer,
                                      accept=fb.deep_accept, tuned_layers=fb.deep_layers,
                                      intrinsic_dim=fb.intrinsic_dim, sigma0=initial_sigma(fb), seed=cfg.run.seed,
                                      popsize=fb.popsize, perturb=fb.perturb, fraction=s.fraction,
                                      clients_per_round=s.clients_per_round, dp=dp, mean_lr=fb.mean_lr)
    if fb.mode == "generation":
        return GenerationStrategy(intrinsic_dim=fb.intrinsic_dim, sigma0=initial_sigma(fb), seed=cfg.run.seed,
                                  popsize=fb.popsize, perturb=fb.perturb, fraction=s.fraction,
                                  clients_per_round=s.clients_per_round, dp=dp, mean_lr=fb.mean_lr)
    fixes = Fixes(fb.distinct_seeds, fb.weight_by_size, fb.sigma_decay, fb.sigma_min, fb.prompt_norm_max,
                  fb.select_on_dev, fb.mean_lr)
    return FedBPTStrategy(mode=fb.mode, intrinsic_dim=fb.intrinsic_dim, sigma0=initial_sigma(fb), seed=cfg.run.seed,
                          rounds=cfg.run.rounds, num_clients=num_clients, popsize=fb.popsize,
                          local_iter=fb.local_iter, fixes=fixes, fraction=s.fraction,
                          clients_per_round=s.clients_per_round, bound=fb.bound, max_update_norm=s.max_update_norm,
                          dp=dp)


def model_layers(model_cfg) -> int:
    """The number of transformer layers, from the model's config (no weights loaded)."""
    from transformers import AutoConfig

    from fedtune.models import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(model_cfg.name), trust_remote_code=model_cfg.trust_remote_code)
    return int(c.get_text_config().num_hidden_layers)


def prompt_z(arrays: Arrays) -> np.ndarray:
    """The global prompt in a round's arrays: z (d,), or the deep prompt (L, d)."""
    return np.asarray(arrays["layers"] if "layers" in arrays else arrays["mean"], dtype=np.float32)


def better(a: dict, b: dict | None, by: str = "metric") -> bool:
    """Dev result a beats b: by = metric: higher metric, then lower loss; by = loss: lower loss, then higher
    metric (ties keep the earlier round)."""
    if b is None:
        return True
    if by == "loss":
        return (-a["loss"], a["score"]) > (-b["loss"], b["score"])
    return (a["score"], -a["loss"]) > (b["score"], -b["loss"])


class FedBPTModel:
    """The black box, the projection and the label words of one task: what evaluates a prompt,
    saves it, and (with shards) builds the client app."""

    def __init__(self, cfg: Config, spec: TaskSpec, box: BlackBoxLM | None = None):
        fb = cfg.fedbpt
        self.cfg = cfg
        self.box = box or load_blackbox(cfg.model, fb)
        self.spec = spec = for_model(spec, self.box.kind)  # a causal LM reads the task's causal template
        self.label_ids = self.box.label_token_ids(spec.words, space_before_answer(spec))
        self.proj_spec = ProjectionSpec(cfg.run.seed, fb.intrinsic_dim, fb.n_prompt_tokens, self.box.hidden_size,
                                        self.box.embedding_std, fb.proj_alpha, fb.proj_sigma)
        self.projection = Projection(self.proj_spec)
        self.deep = DeepProjection(self.proj_spec, self.box.layer_stds(), self.projection) if fb.deep else None
        self.calibration = fb.calibration
        self.content_free = self.box.encode_texts(spec, content_free_texts(len(spec.text_columns))) \
            if fb.calibration == "content_free" else None

    def shard(self, rows: list[Example]) -> Shard:
        return Shard(self.box.encode_texts(self.spec, [e.texts for e in rows]),
                     np.array([e.label for e in rows], dtype=np.int64))

    def client_app(self, shards: dict[str, Shard]) -> FedBPTClientApp:
        fb = self.cfg.fedbpt
        return FedBPTClientApp(self.box, self.deep or self.projection, shards, self.label_ids,
                               LocalSettings(fb.popsize, fb.local_iter, fb.loss, fb.perturb, fb.perturb_rate,
                                             fb.batch_population, fb.bound, separable=fb.separable,
                                             minibatch=fb.minibatch,
                                             calibration=fb.calibration if fb.calibrate_fitness else "none"),
                               seed=self.cfg.run.seed, content_free=self.content_free)

    def evaluate(self, z: np.ndarray | None, rows: EvalSet) -> dict:
        """Metric, accuracy, ce loss (and F1 for a pair task) of one prompt (z None = the zero prompt; (L, d) = a deep
        prompt) on a row set."""
        with numpy_blas_single_threaded():
            prompt, deep = (None, None) if z is None else self.prompt_of(z)
        return self.evaluate_prompt(prompt, rows, deep)

    def evaluate_prompt(self, prompt: np.ndarray | None, rows: EvalSet, deep: np.ndarray | None = None) -> dict:
        """`evaluate` of prompt embeddings (1, n, H) themselves (None = the zero prompt), however they were made."""
        logits, labels = [], []
        for enc, y in rows.batches:
            logits.append(self.box.logits(prompt, enc, self.label_ids, deep)[0])
            labels.append(y)
        lg, y = np.concatenate(logits)[None], np.concatenate(labels)
        if self.calibration != "none":  # batch: over the whole row set; content_free: the prompt's own
            cf = self.box.logits(prompt, self.content_free, self.label_ids, deep) \
                if self.content_free is not None else None
            lg = calibrate(self.calibration, lg, cf)
        return O.scores(self.spec.metric, len(self.spec.text_columns) > 1, lg, y)

    def prompt_of(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(input prompt (1, n, H), deep offsets (1, L-1, n, H) or None) of one prompt z."""
        z = np.asarray(z, dtype=np.float32)
        if z.ndim == 2:
            if self.deep is None:
                raise ValueError(f"a deep prompt {z.shape} needs fedbpt.deep = true")
            return self.deep(z)
        return self.projection(z), None

    def save(self, z: np.ndarray, folder: Path, rnd: int, dev: dict | None) -> Path:
        meta = {"model": self.cfg.model.name, "blackbox": self.box.info(), "task": self.spec.to_json(),
                "label_token_ids": self.label_ids, "round": rnd, "dev": dev, "mode": self.cfg.fedbpt.mode,
                "calibration": self.calibration,
                "max_seq_len": self.box.max_seq_len}
        if self.deep is not None:
            meta["deep"] = {"layers": self.deep.layers, "layer_stds": self.deep.layer_stds}
        return save_prompt(folder, z, self.deep or self.projection, meta)


class FedBPTSession:
    """Everything a FedBPT run holds: the model, the encoded client shards, dev and test sets,
    and the best prompt by dev metric so far."""

    site_format = None  # site files use the task's own columns

    def __init__(self, cfg: Config, data: TaskData | None = None):
        self.cfg = cfg
        self.data = data or prepare_task(cfg)
        self.model = FedBPTModel(cfg, self.data.spec)
        self.search: Choice | None = None
        if cfg.fedbpt.search:  # the starting point, on the training and dev rows (never test)
            m = self.model
            self.search = search(m.box, m.spec, self.data.train + self.data.dev,
                                 space_from_config(m.spec, cfg.task, cfg.fedbpt))
            cfg = self.cfg = resolved(cfg, self.search)
            self.model = FedBPTModel(cfg, task_from_config(cfg.task), box=m.box)
        self.spec = self.model.spec
        self.shards = {cid: self.model.shard(rows) for cid, rows in self.data.client_rows().items()}
        self.client_ids = list(self.shards)
        self.client_sizes = {cid: len(s) for cid, s in self.shards.items()}
        bs = cfg.eval.batch_size
        self.dev = encode_eval(self.model.box, self.spec, self.data.dev, bs)
        self.test = encode_eval(self.model.box, self.spec, self.data.test, bs)
        self.zero_dev = self.model.evaluate(None, self.dev)
        self.best = {"round": 0, "dev": self.zero_dev, "z": np.zeros_like(prompt_z(self.strategy().initial_arrays()))}
        self.run_dir: Path | None = None

    # ------------------------------------------------------------------ what the driver asks for

    def strategy(self) -> FedBPTStrategy:
        return build_strategy(self.cfg, len(self.shards))

    def client_app(self) -> FedBPTClientApp:
        return self.model.client_app(self.shards)

    def describe(self, engine: str) -> str:
        fb, s = self.cfg.fedbpt, self.client_sizes
        where = "" if engine == "simulator" else " on NVIDIA FLARE (simulator)"
        return (f"[bold]FedBPT[/]{where} ({fb.mode}) · {self.model.box.kind} LM {self.cfg.model.name} · task "
                f"{self.spec.name} · {len(s)} clients ({min(s.values())}-{max(s.values())} rows) · dev {len(self.dev)} · "
                f"test {len(self.test)} · d = {fb.intrinsic_dim}, {fb.n_prompt_tokens} prompt tokens ({fb.prompt_mode})"
                + (self._search_line() if self.search else "") +
                f"\nround   0: zero prompt · dev {self.spec.metric} {self.zero_dev['score']:.4f} · "
                f"dev loss {self.zero_dev['loss']:.4f}")

    def _search_line(self) -> str:
        from rich.markup import escape

        c = self.search
        return (f"\nsearch ({c.rows} training and dev rows, zero prompt): template {escape(repr(c.template))} · words "
                f"{' / '.join(c.verbalizer.values())} · calibration {c.calibration} · {self.spec.metric} {c.score:.4f}")

    def evaluate(self, rnd: int, arrays: Arrays) -> dict:
        return {"dev_" + k: v for k, v in self.model.evaluate(prompt_z(arrays), self.dev).items()}

    def on_round_end(self, rnd: int, arrays: Arrays, record: dict) -> None:
        z = prompt_z(arrays)
        dev = {k[4:]: v for k, v in record.get("eval", {}).items()}
        if self.cfg.run.save_every_round:
            self.model.save(z, self.run_dir / "rounds" / f"round_{rnd:03d}", rnd, dev or None)
        if dev and better(dev, self.best["dev"], self.cfg.fedbpt.select_by):
            self.best = {"round": rnd, "dev": dev, "z": z.copy()}

    def round_line(self, record: dict) -> str:
        fits = [c["train_loss"] for c in record["clients"] if "train_loss" in c]
        msg = f"round {record['round']:>3}: fitness {np.mean(fits):.4f}" if fits else f"round {record['round']:>3}:"
        ev = record.get("eval", {})
        if "dev_score" in ev:
            msg += f" · dev {self.spec.metric} {ev['dev_score']:.4f} · dev loss {ev['dev_loss']:.4f}"
        agg = record.get("aggregate", {})
        msg += f" · sigma {agg.get('sigma', float('nan')):.3f} · |z| {agg.get('mean_norm', float('nan')):.2f}"
        msg += epsilon_text(record)
        if record["dropped"]:
            msg += f" · dropped {len(record['dropped'])}"
        return msg

    def state(self) -> tuple[Arrays, dict]:
        """The best prompt so far travels in the checkpoint (never in a file written beside it)."""
        return {"best_z": self.best["z"]}, {"best_round": self.best["round"], "best_dev": self.best["dev"]}

    def load_state(self, arrays: Arrays, meta: dict) -> None:
        if "best_z" not in arrays:
            raise KeyError("best_z (the best-by-dev prompt) is missing from the checkpoint")
        self.best = {"round": int(meta["best_round"]), "dev": meta["best_dev"],
                     "z": np.asarray(arrays["best_z"], dtype=np.float32)}

    # ------------------------------------------------------------------ outputs

    def write_site_data(self, folder: Path) -> dict[str, Path]:
        spec, out = self.spec, {}
        Path(folder).mkdir(parents=True, exist_ok=True)
        for cid, rows in self.data.client_rows().items():
            out[cid] = Path(folder) / f"{cid}.jsonl"
            lines = []
            for e in rows:
                rec = dict(zip(spec.text_columns, e.texts))
                rec[spec.label_column] = spec.labels[e.label]
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            atomic.write_text(out[cid], "".join(lines))
        return out

    def finish(self, run_dir: Path, history: list[dict], final: Arrays) -> dict:
        m, fb = self.model, self.cfg.fedbpt
        final_z = prompt_z(final)
        final_dev = {k[4:]: v for k, v in history[-1].get("eval", {}).items()} or m.evaluate(final_z, self.dev)
        selected = "best" if (fb.mode != "reference" and fb.select_on_dev) else "final"
        best = self.best
        chosen = (best["z"], best["round"], best["dev"]) if selected == "best" else (final_z, len(history), final_dev)
        m.save(chosen[0], run_dir / "prompt", chosen[1], chosen[2])
        if selected == "best":
            m.save(best["z"], run_dir / "best_prompt", best["round"], best["dev"])
        test = (lambda z: m.evaluate(z, self.test) if len(self.test) else None)
        summary = {
            "algorithm": "fedbpt", "mode": fb.mode, "task": self.spec.name, "metric": self.spec.metric,
            "model": self.cfg.model.name, "rounds": len(history), "selected": selected,
            "zero_prompt": {"dev": self.zero_dev, "test": test(None)},
            "best": {"round": best["round"], "dev": best["dev"], "test": test(best["z"])},
            "final": {"round": len(history), "dev": final_dev, "test": test(final_z)},
            "client_sizes": self.client_sizes, "dev_rows": len(self.dev), "test_rows": len(self.test),
            "test_source": self.data.test_source, "test_overlap_removed": self.data.overlap_removed,
            "communication": communication(history),
        }
        if self.search:
            summary["search"] = self.search.to_json()
            atomic.write_text(run_dir / "search.json", json.dumps(summary["search"], indent=1))
        if (pv := privacy_summary(history)):
            summary["privacy"] = pv
        atomic.write_text(run_dir / "prompt" / "summary.json",
                          json.dumps({k: summary[k] for k in ("best", "final", "selected")}))
        return summary


def communication(history: list[dict]) -> dict:
    """Bytes per client per round, each way, over the whole run."""
    down = [c["bytes_down"] for r in history for c in r["clients"]]
    up = [c["bytes_up"] for r in history for c in r["clients"]]
    if not down:
        return {}
    return {"bytes_down_per_client_round_max": int(max(down)), "bytes_up_per_client_round_max": int(max(up)),
            "bytes_down_per_client_round_mean": float(np.mean(down)), "bytes_up_per_client_round_mean": float(np.mean(up)),
            "bytes_down_per_client_total": _per_client_total(history, "bytes_down"),
            "bytes_up_per_client_total": _per_client_total(history, "bytes_up")}


def _per_client_total(history: list[dict], key: str) -> int:
    totals: dict[str, int] = {}
    for r in history:
        for c in r["clients"]:
            totals[c["id"]] = totals.get(c["id"], 0) + c[key]
    return int(max(totals.values()))
