"""The FedBPT recipe: wire task data, the black box, clients, strategy and engine from a Config.

Each round the simulator records the global prompt's dev metric and loss (metrics.jsonl);
the recipe keeps the best prompt by dev metric (round 0, the zero prompt, included). At the
end it reports the test metric of the zero prompt, the best-by-dev prompt and the
final-round prompt, and saves the selected global prompt (best-by-dev, or the final one
when fedbpt.select_on_dev is off) under <run>/prompt: z, seed, projection settings and
the prompt embeddings, reusable by `fedtune classify`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.config import Config
from fedtune.data import partition as P
from fedtune.engines.simulator import Simulator, SimulatorSettings, has_checkpoint, load_checkpoint
from fedtune.fedbpt import objective as O
from fedtune.fedbpt.blackbox import BlackBoxLM, Encoded, load_blackbox, numpy_blas_single_threaded
from fedtune.fedbpt.client import FedBPTClientApp, LocalSettings, Shard
from fedtune.fedbpt.prompt import Projection, ProjectionSpec, load_prompt, save_prompt
from fedtune.fedbpt.strategy import FedBPTStrategy, Fixes
from fedtune.fedbpt.tasks import ANSWER_SLOT, Example, TaskSpec, few_shot, hub_path, load_examples, task_from_config


# ----------------------------------------------------------------------------- data


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    parts: list[np.ndarray]  # indices into `train`, one array per client
    test_source: str = ""

    def client_ids(self) -> list[str]:
        return [f"client_{i:03d}" for i in range(len(self.parts))]

    def client_rows(self) -> dict[str, list[Example]]:
        return {cid: [self.train[i] for i in p] for cid, p in zip(self.client_ids(), self.parts)}


def prepare_task(cfg: Config) -> TaskData:
    """Read the task's files, draw k-shot train and dev splits, split train across clients."""
    t, pc, seed = cfg.task, cfg.partition, cfg.run.seed
    spec = task_from_config(t)
    train_path = t.train_path or hub_path(spec, "train")
    test_path = t.test_path or hub_path(spec, "test")
    shots = few_shot(load_examples(spec, train_path), spec, t.k_shot, t.dev_shots, seed, source=train_path)
    test = load_examples(spec, test_path)
    if t.test_max_rows:
        test = P.stratified_subset(test, [str(e.label) for e in test], t.test_max_rows)
    parts = P.partition([str(e.label) for e in shots.train], pc.method, pc.num_clients, seed,
                        shards_per_client=pc.shards_per_client, alpha=pc.alpha, min_size=pc.min_client_size)
    return TaskData(spec, shots.train, shots.dev, test, parts, test_path)


def space_before_answer(spec: TaskSpec) -> bool:
    """Whether the label word follows a space in the template (then it is tokenized with one)."""
    head = spec.template.split(ANSWER_SLOT)[0]
    return head == "" or head[-1].isspace()


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


# ----------------------------------------------------------------------------- the run in memory


def build_strategy(cfg: Config, num_clients: int) -> FedBPTStrategy:
    """The FedBPT server step from a config and the number of clients (no data, no model):
    what every engine's server runs, the embedded simulator's and NVIDIA FLARE's."""
    fb, s = cfg.fedbpt, cfg.server
    fixes = Fixes(fb.distinct_seeds, fb.weight_by_size, fb.sigma_decay, fb.sigma_min, fb.prompt_norm_max,
                  fb.select_on_dev)
    return FedBPTStrategy(mode=fb.mode, intrinsic_dim=fb.intrinsic_dim, sigma0=fb.sigma0, seed=cfg.run.seed,
                          rounds=cfg.run.rounds, num_clients=num_clients, popsize=fb.popsize,
                          local_iter=fb.local_iter, fixes=fixes, fraction=s.fraction,
                          clients_per_round=s.clients_per_round, bound=fb.bound, max_update_norm=s.max_update_norm)


class FedBPT:
    """Everything a FedBPT run holds: the black box, the projection, the encoded client shards,
    dev and test sets."""

    def __init__(self, cfg: Config, data: TaskData):
        fb = cfg.fedbpt
        self.cfg = cfg
        self.data = data
        self.spec = data.spec
        self.box = load_blackbox(cfg.model, fb)
        self.label_ids = self.box.label_token_ids(self.spec.words, space_before_answer(self.spec))
        self.proj_spec = ProjectionSpec(cfg.run.seed, fb.intrinsic_dim, fb.n_prompt_tokens, self.box.hidden_size,
                                        self.box.embedding_std, fb.proj_alpha, fb.proj_sigma)
        self.projection = Projection(self.proj_spec)
        self.shards = {cid: Shard(self.box.encode_texts(self.spec, [e.texts for e in rows]),
                                  np.array([e.label for e in rows], dtype=np.int64))
                       for cid, rows in data.client_rows().items()}
        bs = cfg.eval.batch_size
        self.dev = encode_eval(self.box, self.spec, data.dev, bs)
        self.test = encode_eval(self.box, self.spec, data.test, bs)

    def evaluate(self, z: np.ndarray | None, rows: EvalSet) -> dict:
        """Metric, accuracy and ce loss of one prompt (z None = the zero prompt) on a row set."""
        with numpy_blas_single_threaded():
            prompt = None if z is None else self.projection(z)
        logits, labels = [], []
        for enc, y in rows.batches:
            logits.append(self.box.logits(prompt, enc, self.label_ids)[0])
            labels.append(y)
        lg, y = np.concatenate(logits)[None], np.concatenate(labels)
        out = {"metric": self.spec.metric, "accuracy": float(O.accuracy(lg, y)[0]), "loss": float(O.ce_loss(lg, y)[0]),
               "rows": int(len(y))}
        if self.spec.metric == "f1":
            out["f1"] = float(O.f1(lg, y)[0])
        out["score"] = out[self.spec.metric]
        return out

    def client_app(self) -> FedBPTClientApp:
        fb = self.cfg.fedbpt
        return FedBPTClientApp(self.box, self.projection, self.shards, self.label_ids,
                               LocalSettings(fb.popsize, fb.local_iter, fb.loss, fb.perturb, fb.perturb_rate,
                                             fb.batch_population, fb.bound), seed=self.cfg.run.seed)

    def strategy(self) -> FedBPTStrategy:
        return build_strategy(self.cfg, len(self.shards))

    def prompt_meta(self, rnd: int, dev: dict | None) -> dict:
        return {"model": self.cfg.model.name, "blackbox": self.box.info(), "task": self.spec.to_json(),
                "label_token_ids": self.label_ids, "round": rnd, "dev": dev, "mode": self.cfg.fedbpt.mode,
                "max_seq_len": self.box.max_seq_len}

    def save(self, z: np.ndarray, folder: Path, rnd: int, dev: dict | None) -> Path:
        return save_prompt(folder, z, self.projection, self.prompt_meta(rnd, dev))


def _better(a: dict, b: dict | None) -> bool:
    """Dev result a beats b: higher metric, then lower loss (ties keep the earlier round)."""
    return b is None or (a["score"], -a["loss"]) > (b["score"], -b["loss"])


# ----------------------------------------------------------------------------- the recipe


def run(cfg: Config, run_dir: Path, resume: bool = False, console=None) -> dict:
    """Run FedBPT in the embedded simulator; returns the summary written to summary.json."""
    t0 = time.perf_counter()
    data = prepare_task(cfg)
    fed = FedBPT(cfg, data)
    strategy = fed.strategy()
    sizes = {cid: len(s) for cid, s in fed.shards.items()}
    fb = cfg.fedbpt
    if console:
        console.print(f"[bold]FedBPT[/] ({fb.mode}) · {fed.box.kind} LM {cfg.model.name} · task {fed.spec.name} · "
                      f"{len(sizes)} clients ({min(sizes.values())}-{max(sizes.values())} rows) · dev {len(fed.dev)} · "
                      f"test {len(fed.test)} · d = {fb.intrinsic_dim}, {fb.n_prompt_tokens} prompt tokens ({fb.prompt_mode})")

    # --- round 0: the zero prompt is the first candidate for best-by-dev
    zero_dev = fed.evaluate(None, fed.dev)
    best = {"round": 0, "dev": zero_dev, "z": np.zeros(fb.intrinsic_dim, dtype=np.float32)}
    if resume and (run_dir / "best_prompt" / "prompt.json").is_file():
        z, _, meta = load_prompt(run_dir / "best_prompt")
        best = {"round": int(meta["round"]), "dev": meta["dev"], "z": z}
    if console:
        console.print(f"round   0: zero prompt · dev {fed.spec.metric} {zero_dev['score']:.4f} · dev loss {zero_dev['loss']:.4f}")

    def evaluate(rnd, arrays):
        ev = fed.evaluate(arrays["mean"], fed.dev)
        return {"dev_" + k: v for k, v in ev.items()}

    def on_round_end(rnd, arrays, record):
        z = np.asarray(arrays["mean"], dtype=np.float32)
        dev = {k[4:]: v for k, v in record.get("eval", {}).items()}
        if cfg.run.save_every_round:
            fed.save(z, run_dir / "rounds" / f"round_{rnd:03d}", rnd, dev or None)
        if dev and _better(dev, best["dev"]):
            best.update(round=rnd, dev=dev, z=z.copy())
            fed.save(z, run_dir / "best_prompt", rnd, dev)
        if console:
            fits = [c["train_loss"] for c in record["clients"]]
            msg = f"round {rnd:>3}: fitness {np.mean(fits):.4f}"
            if dev:
                msg += f" · dev {fed.spec.metric} {dev['score']:.4f} · dev loss {dev['loss']:.4f}"
            agg = record.get("aggregate", {})
            msg += f" · sigma {agg.get('sigma', float('nan')):.3f} · |z| {agg.get('mean_norm', float('nan')):.2f}"
            if record["dropped"]:
                msg += f" · dropped {len(record['dropped'])}"
            console.print(msg + f" · {record['round_seconds']:.1f}s")

    s = cfg.server
    sim = Simulator(strategy, fed.client_app(), list(fed.shards),
                    SimulatorSettings(rounds=cfg.run.rounds, min_clients=s.min_clients, client_timeout=s.client_timeout,
                                      round_retries=s.round_retries, eval_every=cfg.run.eval_every,
                                      progress=cfg.run.progress),
                    evaluate=evaluate, on_round_end=on_round_end, run_dir=run_dir)
    state = load_checkpoint(run_dir, strategy) if resume and has_checkpoint(run_dir) else None
    if resume and state is None:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if state and console:
        console.print(f"resuming after round {state.round}")
    state = sim.run(state)

    # --- the end: test metric of the zero, best-by-dev and final prompts
    final_z = np.asarray(state.global_arrays["mean"], dtype=np.float32)
    final_dev = {k[4:]: v for k, v in state.history[-1].get("eval", {}).items()} or fed.evaluate(final_z, fed.dev)
    selected = "best" if strategy.fixes.select_on_dev else "final"
    chosen_z, chosen_round, chosen_dev = ((best["z"], best["round"], best["dev"]) if selected == "best"
                                         else (final_z, state.round, final_dev))
    fed.save(chosen_z, run_dir / "prompt", chosen_round, chosen_dev)
    summary = {
        "algorithm": "fedbpt", "mode": fb.mode, "task": fed.spec.name, "metric": fed.spec.metric,
        "model": cfg.model.name, "rounds": state.round, "selected": selected,
        "zero_prompt": {"dev": zero_dev, "test": fed.evaluate(None, fed.test) if len(fed.test) else None},
        "best": {"round": best["round"], "dev": best["dev"],
                 "test": fed.evaluate(best["z"], fed.test) if len(fed.test) else None},
        "final": {"round": state.round, "dev": final_dev,
                  "test": fed.evaluate(final_z, fed.test) if len(fed.test) else None},
        "client_sizes": sizes, "dev_rows": len(fed.dev), "test_rows": len(fed.test), "test_source": data.test_source,
        "communication": communication(state.history),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (run_dir / "prompt" / "summary.json").write_text(json.dumps({k: summary[k] for k in ("best", "final", "selected")}))
    write_report(run_dir, summary, state.history)
    return summary


def write_report(run_dir: Path, summary: dict, history: list[dict]) -> Path:
    """report.md: the zero / best-by-dev / final table, bytes on the wire, and a plot of the
    dev metric, sigma and |z| per round (plots/fedbpt_rounds.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = summary["metric"]
    rounds = [0] + [r["round"] for r in history if "eval" in r]
    dev = [summary["zero_prompt"]["dev"]["score"]] + [r["eval"]["dev_score"] for r in history if "eval" in r]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(rounds, dev, marker=".")
    ax[0].set(title=f"global prompt: dev {m}", xlabel="round")
    ax[1].plot([r["round"] for r in history], [r["aggregate"]["sigma"] for r in history], marker=".")
    ax[1].set(title="sigma sent to clients", xlabel="round")
    ax[2].plot([r["round"] for r in history], [r["aggregate"]["mean_norm"] for r in history], marker=".")
    ax[2].set(title="|z| of the global mean", xlabel="round")
    fig.tight_layout()
    (run_dir / "plots").mkdir(exist_ok=True)
    fig.savefig(run_dir / "plots" / "fedbpt_rounds.png", dpi=110)
    plt.close(fig)

    def pct(d, k="score"):
        return "-" if not d else f"{100 * d[k]:.1f}%"

    lines = [f"# FedBPT run: {run_dir.name}", "",
             f"{summary['mode']} mode · task {summary['task']} · model {summary['model']} · {summary['rounds']} rounds · "
             f"{summary['seconds']:.0f} s", "",
             f"| prompt | round | dev {m} | test {m} | test loss |", "|---|---:|---:|---:|---:|"]
    for name, key in (("zero prompt", "zero_prompt"), ("best by dev", "best"), ("final round", "final")):
        r = summary[key]
        lines.append(f"| {name} | {r.get('round', 0)} | {pct(r['dev'])} | {pct(r['test'])} | "
                     f"{r['test']['loss']:.4f} |" if r["test"] else f"| {name} | {r.get('round', 0)} | {pct(r['dev'])} | - | - |")
    c = summary["communication"]
    lines += ["", f"Saved prompt ({summary['selected']}): `prompt/`. Dev rows {summary['dev_rows']}, test rows "
              f"{summary['test_rows']} ({summary['test_source']}).", "",
              f"Bytes per client per round (max): {c.get('bytes_down_per_client_round_max', 0):,} down, "
              f"{c.get('bytes_up_per_client_round_max', 0):,} up.", "", "![per round](plots/fedbpt_rounds.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def communication(history: list[dict]) -> dict:
    """Bytes per client per round, each way, over the whole run (from the simulator's records)."""
    down = [c["bytes_down"] for r in history for c in r["clients"]]
    up = [c["bytes_up"] for r in history for c in r["clients"]]
    if not down:
        return {}
    return {"bytes_down_per_client_round_max": int(max(down)), "bytes_up_per_client_round_max": int(max(up)),
            "bytes_down_per_client_round_mean": float(np.mean(down)), "bytes_up_per_client_round_mean": float(np.mean(up))}
