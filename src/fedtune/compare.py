"""`fedtune compare`: FedIT's central question in one command.

Does federated tuning over diverse clients beat each client tuning alone, and how close
does it come to pooling all the data? Four variants, trained with the same budget:

- base: the untuned model (the initial adapter has B = 0, so it is the base model exactly);
- local: each client alone, on its own rows only;
- centralized: one client holding every client's rows;
- federated: the configured federated run.

Equal budget: the federated plan fixes how many optimizer steps (of train.batch_size
examples) are taken in each round, summed over the selected clients. Every single-client
variant takes exactly that many steps in each round (the same number of rounds, the same
batch size, learning rate and schedule), so all trained variants see the same number of
examples and the same number of optimizer steps. Each variant is its own run folder
(metrics.jsonl, summary.json, report.md, adapter/) under the compare folder, which gets
compare.md and compare.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from fedtune import config as C
from fedtune import config_compare
from fedtune.compare_report import build_table, compare_markdown
from fedtune.config import Config
from fedtune.config_resume import changed_keys
from fedtune.core import checkpoint as CK
from fedtune.core.strategy import FitIns, FitRes
from fedtune.engines.simulator import Simulator, SimulatorSettings
from fedtune.errors import FedtuneError
from fedtune.fedit.session import FedITSession as FedIT
from fedtune.fedit.session import build_strategy
from fedtune.fedit.strategy import FedAvgStrategy
from fedtune.fedit.train import local_steps
from fedtune.reporting import write_outputs

def federated_plan(cfg: Config, fed: FedIT) -> list[dict[str, int]]:
    """Per round: {selected client: local optimizer steps}, as the federated run will do it."""
    strategy = fed.strategy()
    ids = list(fed.client_data)
    return [{cid: local_steps(len(fed.client_data[cid]), cfg.train) for cid in strategy.select(rnd, ids)}
            for rnd in range(1, cfg.run.rounds + 1)]


class ScheduledClient:
    """A client app whose local steps follow a per-round schedule (the equal budget)."""

    def __init__(self, fed: FedIT, data: dict, steps_by_round: list[int]):
        self.steps_by_round = steps_by_round
        self.apps = {s: fed.client_app(data, dataclasses.replace(fed.cfg.train, max_steps=s))
                     for s in sorted(set(steps_by_round))}

    def fit(self, client_id: str, ins: FitIns) -> FitRes:
        return self.apps[self.steps_by_round[int(ins.config["round"]) - 1]].fit(client_id, ins)


def _train(fed: FedIT, name: str, strategy, app, sizes: dict[str, int], out: Path, console,
           cfg: Config | None = None, resume: bool = False) -> dict:
    """One trained variant as its own run folder; `sizes` = {client id: training rows}; `cfg`
    the variant's config (default: the comparison's). With `resume`, a finished variant is
    read back from its folder, and one cut short goes on from its last checkpoint."""
    cfg = cfg or fed.cfg
    last = cfg.run.rounds
    state = None
    if resume and (out / "config.toml").is_file():
        _same_config(cfg, out)
        if (out / "summary.json").is_file():
            summary = json.loads((out / "summary.json").read_text())
            if summary.get("rounds") == last:  # finished: its scores are read back, not retrained
                if console:
                    console.print(f"  {name}: finished in an earlier run, read from {out}")
                # the final arrays, for the judge, from the last checkpoint; a folder kept for its
                # results alone (summary.json, metrics.jsonl, config.toml) has none
                summary["arrays"] = CK.read(out)[1] if CK.exists(out) else None
                return summary
        if CK.exists(out):
            state = CK.load(out, strategy)
            if console:
                console.print(f"  {name}: resuming after round {state.round}")
        else:  # stopped before round 1 was checkpointed
            (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    C.save(cfg, out / "config.toml")
    t0 = time.perf_counter()

    def on_round_end(rnd, arrays, record):
        if console:
            losses = [c["train_loss"] for c in record["clients"]]
            ev = record.get("eval", {})
            msg = f"  {name} round {rnd:>3}: train loss {sum(losses) / len(losses):.4f}"
            if "loss" in ev:
                msg += f" · held-out loss {ev['loss']:.4f}"
            console.print(msg + f" · {record['round_seconds']:.1f}s")

    sim = Simulator(strategy, app, list(sizes),
                    SimulatorSettings(rounds=last, min_clients=1, eval_every=cfg.run.eval_every,
                                      progress=cfg.run.progress),
                    evaluate=lambda rnd, arrays: fed.evaluate_adapter(arrays, generate=cfg.eval.generate and rnd == last),
                    on_round_end=on_round_end, run_dir=out)
    resumed_after = state.round if state else 0
    state = sim.run(state)
    fed.save(state.global_arrays, out / "adapter")
    clients = [c for rec in state.history for c in rec["clients"]]
    summary = {"algorithm": "fedit", "variant": name, "rounds": state.round, "final": state.history[-1].get("eval", {}),
               "client_sizes": dict(sizes),
               "budget": {"optimizer_steps": sum(c["steps"] for c in clients),
                          "examples": sum(c["examples_seen"] for c in clients),
                          "tokens": sum(c["tokens"] for c in clients),
                          "train_seconds": round(sum(c["train_seconds"] for c in clients), 1)},
               "seconds": round(time.perf_counter() - t0, 1)}
    if resumed_after:
        summary["resumed_after_round"] = resumed_after  # "seconds" counts the resumed part only
    write_outputs(out, summary)
    summary["arrays"] = state.global_arrays  # kept in memory for the judge, not written
    return summary


def _same_config(cfg: Config, folder: Path) -> None:
    """A variant folder found on resume must hold the run this comparison would start."""
    saved = C.load(folder / "config.toml").to_dict()
    now = cfg.to_dict()
    # what a resumed comparison may change (config_resume.COMPARE_RESUMABLE) does not change a variant
    now["run"]["progress"] = saved["run"]["progress"]
    diff = changed_keys(saved, now, skip=("compare", "judge"))
    if diff:
        raise FedtuneError(f"{folder / 'config.toml'}: this variant was run with other settings "
                           f"({', '.join(diff)}); resume a comparison with the config it started with")


def _base(fed: FedIT, path: Path, console, resume: bool) -> dict:
    """The untuned model's scores (kept in base.json, read back on resume)."""
    if resume and path.is_file():
        if console:
            console.print(f"  base: read from {path}")
        res = json.loads(path.read_text())
    else:
        if console:
            console.print("  base: evaluating the untuned model")
        t = time.perf_counter()
        ev = fed.evaluate_adapter(fed.initial, generate=fed.cfg.eval.generate)
        res = {"variant": "base", "final": ev, "budget": {"optimizer_steps": 0, "examples": 0},
               "seconds": round(time.perf_counter() - t, 1)}
        path.write_text(json.dumps(res, indent=2))
    return {**res, "arrays": fed.initial}


ALGORITHM_SETTINGS = {  # compare.algorithms entries beyond the server.aggregation values
    "fedprox": {"train": {"prox_mu": 0.01}},
    "flexlora_svd": {"server": {"lora_aggregation": "svd"}},
    "flora": {"server": {"lora_aggregation": "stack"}},
    "ffa_lora": {"lora": {"freeze_a": True}},
    "hetlora": {},  # lora.client_ranks = [r/4, r/2, r]: zero-padding (HetLoRA)
    "flexlora_het": {"server": {"lora_aggregation": "svd"}},  # the same ranks, SVD redistribution (FlexLoRA)
}
HETERO = ("hetlora", "flexlora_het")


def with_algorithm(cfg: Config, item) -> Config:
    """The config with one algorithm switched on: a server.aggregation value, or fedprox
    (train.prox_mu, 0.01 unless the config sets one), flexlora_svd, flora, ffa_lora, hetlora and
    flexlora_het (lora.client_ranks = [r/4, r/2, r] unless the config sets them); or an entry
    table {name, algorithm, set = {section = {key = value}}}: that algorithm, then its settings."""
    if not item:
        return cfg
    label, name, sets = config_compare.entry(item)
    raw = cfg.to_dict()
    if name in HETERO and not raw["lora"]["client_ranks"]:
        r = raw["lora"]["r"]
        raw["lora"]["client_ranks"] = sorted({max(1, r // 4), max(1, r // 2), r})
    if name in ALGORITHM_SETTINGS:
        for section, values in ALGORITHM_SETTINGS[name].items():
            for k, v in values.items():
                if not (name == "fedprox" and raw["train"]["prox_mu"] > 0):
                    raw[section][k] = v
    else:
        raw["server"]["aggregation"] = name
    for section, values in sets.items():
        for k, v in values.items():
            raw[section][k] = v
    return C.from_dict(raw, f"compare.algorithms: '{label}'")


def run_compare(cfg: Config, out: Path, console=None, resume: bool = False) -> dict:
    """Run every configured variant at an equal budget; write compare.md / compare.json. With
    `resume`, variants finished in an earlier run of this comparison (same folder, same
    config) are read back, and one cut short goes on from its last checkpoint."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for alg in cfg.compare.algorithms:  # every algorithm's config is valid before anything trains
        with_algorithm(cfg, alg)
    fed = FedIT(cfg)
    ids = list(fed.client_data)
    plan = federated_plan(cfg, fed)
    steps_by_round = [sum(p.values()) for p in plan]
    budget = {"rounds": cfg.run.rounds, "optimizer_steps": sum(steps_by_round), "steps_by_round": steps_by_round,
              "batch_size": cfg.train.batch_size, "examples": sum(steps_by_round) * cfg.train.batch_size}
    variants = cfg.compare.variants
    local_ids = ids[: cfg.compare.local_clients] if cfg.compare.local_clients else ids
    n_train = (("local" in variants) * len(local_ids) + ("centralized" in variants) +
               ("federated" in variants) * max(1, len(cfg.compare.algorithms)))
    if console:
        console.print(f"[bold]fedtune compare[/] · {len(ids)} clients · {len(fed.test)} held-out rows · "
                      f"budget per trained variant: {budget['optimizer_steps']} optimizer steps of "
                      f"{cfg.train.batch_size} examples over {cfg.run.rounds} rounds · {n_train} training run(s)")
    results: dict[str, dict] = {}

    if "base" in variants:
        results["base"] = _base(fed, out / "base.json", console, resume)
    # centralized and federated first (the question's two ends), each client alone after them
    if "centralized" in variants:
        pooled = {"pooled": [t for cid in ids for t in fed.client_data[cid]]}
        app = ScheduledClient(fed, pooled, steps_by_round)
        results["centralized"] = _train(fed, "centralized", FedAvgStrategy(fed.initial, seed=cfg.run.seed), app,
                                        {"pooled": len(pooled["pooled"])}, out / "centralized", console,
                                        resume=resume)
    if "federated" in variants:
        sizes = {cid: len(t) for cid, t in fed.client_data.items()}
        for alg in cfg.compare.algorithms or [""]:  # "" = the config's own [server] and [lora]
            label = config_compare.entry(alg)[0] if alg else ""
            name, folder = (f"federated {label}", out / f"federated_{label}") if alg else ("federated", out / "federated")
            acfg = with_algorithm(cfg, alg)
            results[name] = _train(fed, name, build_strategy(acfg, fed.initial),
                                   fed.client_app(cfg=acfg, state_dir=folder / "client_state"), sizes, folder,
                                   console, cfg=acfg, resume=resume)
    if "local" in variants:
        for cid in local_ids:
            single = FedAvgStrategy(fed.initial, seed=cfg.run.seed)
            app = ScheduledClient(fed, {cid: fed.client_data[cid]}, steps_by_round)
            results[f"local {cid}"] = _train(fed, f"local {cid}", single, app, {cid: len(fed.client_data[cid])},
                                             out / f"local_{cid}", console, resume=resume)
    # the table's order: base, each client alone, centralized, federated
    rank = {"base": 0, "local": 1, "centralized": 2, "federated": 3}
    results = dict(sorted(results.items(), key=lambda kv: rank[kv[0].split(" ")[0]]))

    judged = judge_variants(cfg, fed, results, console) if cfg.judge.endpoint else None
    table = build_table(results, [r.category for r in fed.test])
    doc = {"budget": budget, "clients": {cid: len(t) for cid, t in fed.client_data.items()},
           "held_out_rows": len(fed.test), "variants": {k: {kk: vv for kk, vv in v.items() if kk != "arrays"}
                                                         for k, v in results.items()},
           "table": table, "judge": judged, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "compare.json").write_text(json.dumps(doc, indent=2))
    (out / "compare.md").write_text(compare_markdown(cfg, doc, out), encoding="utf-8")
    return doc


# ----------------------------------------------------------------------------- the judge


def judge_variants(cfg: Config, fed: FedIT, results: dict[str, dict], console) -> dict:
    """Single-answer scores for every variant and federated-vs-each pairwise verdicts."""
    from tqdm.auto import tqdm

    from fedtune.data.instructions import Row
    from fedtune.eval import judge as J
    from fedtune.fedit.evaluate import generate_answers

    judge = J.Judge.from_config(cfg.judge)
    if cfg.judge.questions:
        questions = J.load_questions(cfg.judge.questions, cfg.judge.max_questions)
        rows = [Row(q, "", "", "all") for q in questions]
    else:
        rows = fed.test[: cfg.judge.max_questions] if cfg.judge.max_questions else list(fed.test)
        questions = [f"{r.instruction}\n\n{r.input}" if r.input.strip() else r.instruction for r in rows]
    answers = {}
    missing = [name for name, res in results.items() if res["arrays"] is None]
    if missing:
        raise FedtuneError(f"judge: the variant(s) {', '.join(missing)} were read back without their checkpoint "
                           "(only summary.json was kept), so their answers cannot be generated; rerun them")
    for name, res in results.items():
        fed.slot.set(res["arrays"])
        answers[name] = generate_answers(fed.peft_model, fed.lm.tokenizer, fed.formatter, rows,
                                         batch_size=cfg.eval.batch_size, max_new_tokens=cfg.judge.max_new_tokens,
                                         device=fed.lm.device, amp=fed.lm.autocast)
    n_pairs = (len(answers) - 1) if "federated" in answers else 0
    bar = tqdm(total=len(rows) * (len(answers) + n_pairs), desc="judge", disable=not cfg.run.progress, leave=False)
    scores = {name: J.score_answers(judge, questions, a, progress=bar.update) for name, a in answers.items()}
    pairwise = {}
    if "federated" in answers:
        for name, a in answers.items():
            if name != "federated":
                pairwise[name] = J.compare_answers(judge, questions, answers["federated"], a, progress=bar.update)
    bar.close()
    return {"model": cfg.judge.model, "questions": len(rows), "scores": scores, "pairwise": pairwise,
            "samples": {name: a[:2] for name, a in answers.items()}}
