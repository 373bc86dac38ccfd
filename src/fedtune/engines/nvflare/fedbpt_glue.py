"""FedBPT on NVIDIA FLARE, built from fedtune.fedbpt's own code (the same FedBPTStrategy on
the server, the same FedBPTClientApp on each site). Only plain arrays cross the wire:
the global mean and sigma (and, in reference mode, the covariance) down; the local mean,
its fitness and the sigmas used up."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.strategy import FitIns, FitRes
from fedtune.engines.nvflare.algorithms import SiteClient
from fedtune.errors import ConfigError


class FedBPTSite(SiteClient):
    """FedBPT on one site: the black box, the projection and this site's encoded rows, with
    fedbpt's FedBPTClientApp; the site's file holds its own (few-shot) training rows."""

    def __init__(self, cfg, settings):
        from fedtune.fedbpt.recipe import FedBPT, TaskData
        from fedtune.fedbpt.tasks import load_examples, task_from_config

        if settings.format:
            raise ConfigError(f"site '{settings.site}': {settings.source}: 'format' is for FedIT instruction data; "
                              f"FedBPT reads the columns named by task.text_columns and task.label_column")
        spec = task_from_config(cfg.task)
        examples = load_examples(spec, str(settings.data_path))
        if settings.model:
            cfg = replace(cfg, model=replace(cfg.model, name=settings.model))
        data = TaskData(spec, examples, [], [], [np.arange(len(examples))])
        self.key = data.client_ids()[0]  # the one shard this process holds
        self.app = FedBPT(cfg, data).client_app()

    def fit(self, client_id: str, ins: FitIns, index: int) -> FitRes:
        self.app.client_index = {self.key: index}  # seeds the perturbed copy as in the embedded simulator
        res = self.app.fit(self.key, ins)
        return FitRes(client_id, res.arrays, res.num_examples, res.metrics)


class FedBPTLocal:
    """`fedtune run --engine nvflare` for FedBPT: the embedded recipe's task data, dev
    evaluation each round, best-by-dev selection, saved prompts and report, around FLARE's rounds."""

    site_format = None  # site files use the task's own columns

    def __init__(self, cfg):
        from fedtune.fedbpt.recipe import FedBPT, build_strategy, prepare_task

        self.cfg = cfg
        self.data = prepare_task(cfg)
        self.fed = FedBPT(cfg, self.data)
        self.sites = self.data.client_ids()
        self.sizes = {cid: len(s) for cid, s in self.fed.shards.items()}
        self.strategy = build_strategy(cfg, len(self.sites))
        self.initial = self.strategy.initial_arrays()
        self.zero_dev = None
        self.best = None
        self.t0 = time.perf_counter()

    def describe(self) -> str:
        fb, s, fed = self.cfg.fedbpt, self.sizes, self.fed
        return (f"[bold]FedBPT on NVIDIA FLARE (simulator)[/] ({fb.mode}) · {fed.box.kind} LM {self.cfg.model.name} · "
                f"task {fed.spec.name} · {len(s)} sites ({min(s.values())}-{max(s.values())} rows) · "
                f"dev {len(fed.dev)} · test {len(fed.test)} · d = {fb.intrinsic_dim}")

    def write_site_data(self, folder: Path) -> dict[str, Path]:
        spec = self.data.spec
        out = {}
        Path(folder).mkdir(parents=True, exist_ok=True)
        for cid, rows in self.data.client_rows().items():
            out[cid] = Path(folder) / f"{cid}.jsonl"
            with open(out[cid], "w", encoding="utf-8") as f:
                for e in rows:
                    rec = dict(zip(spec.text_columns, e.texts))
                    rec[spec.label_column] = spec.labels[e.label]
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return out

    def _zero(self):
        if self.zero_dev is None:
            self.zero_dev = self.fed.evaluate(None, self.fed.dev)
            self.best = {"round": 0, "dev": self.zero_dev, "z": np.zeros(self.cfg.fedbpt.intrinsic_dim, np.float32)}

    def on_round(self, rnd: int, arrays: Arrays, record: dict, run_dir: Path) -> None:
        from fedtune.fedbpt.recipe import _better

        cfg, fed = self.cfg, self.fed
        self._zero()
        z = np.asarray(arrays["mean"], dtype=np.float32)
        dev = None
        if rnd % cfg.run.eval_every == 0 or rnd == cfg.run.rounds:
            t_eval = time.perf_counter()
            dev = fed.evaluate(arrays["mean"], fed.dev)
            record["eval"] = {"dev_" + k: v for k, v in dev.items()}
            record["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
        if cfg.run.save_every_round:
            fed.save(z, run_dir / "rounds" / f"round_{rnd:03d}", rnd, dev)
        if dev and _better(dev, self.best["dev"]):
            self.best.update(round=rnd, dev=dev, z=z.copy())
            fed.save(z, run_dir / "best_prompt", rnd, dev)

    def round_line(self, record: dict) -> str:
        fits = [c["train_loss"] for c in record["clients"] if "train_loss" in c]
        msg = f"round {record['round']:>3}: fitness {np.mean(fits):.4f}" if fits else f"round {record['round']:>3}:"
        ev = record.get("eval", {})
        if "dev_score" in ev:
            msg += f" · dev {self.fed.spec.metric} {ev['dev_score']:.4f} · dev loss {ev['dev_loss']:.4f}"
        agg = record.get("aggregate", {})
        msg += f" · sigma {agg.get('sigma', float('nan')):.3f} · |z| {agg.get('mean_norm', float('nan')):.2f}"
        if record["dropped"]:
            msg += f" · dropped {len(record['dropped'])}"
        return msg

    def finish(self, run_dir: Path, records: list[dict], final: Arrays) -> dict:
        from fedtune.fedbpt.recipe import communication, write_report

        cfg, fed = self.cfg, self.fed
        self._zero()
        final_z = np.asarray(final["mean"], dtype=np.float32)
        final_dev = {k[4:]: v for k, v in records[-1].get("eval", {}).items()} or fed.evaluate(final_z, fed.dev)
        selected = "best" if self.strategy.fixes.select_on_dev else "final"
        best = self.best
        chosen = (best["z"], best["round"], best["dev"]) if selected == "best" else (final_z, len(records), final_dev)
        fed.save(chosen[0], run_dir / "prompt", chosen[1], chosen[2])
        test = (lambda z: fed.evaluate(z, fed.test) if len(fed.test) else None)
        summary = {
            "algorithm": "fedbpt", "engine": "nvflare", "mode": cfg.fedbpt.mode, "task": fed.spec.name,
            "metric": fed.spec.metric, "model": cfg.model.name, "rounds": len(records), "selected": selected,
            "zero_prompt": {"dev": self.zero_dev, "test": test(None)},
            "best": {"round": best["round"], "dev": best["dev"], "test": test(best["z"])},
            "final": {"round": len(records), "dev": final_dev, "test": test(final_z)},
            "client_sizes": self.sizes, "dev_rows": len(fed.dev), "test_rows": len(fed.test),
            "test_source": self.data.test_source, "communication": communication(records),
            "seconds": round(time.perf_counter() - self.t0, 1),
        }
        (run_dir / "prompt" / "summary.json").write_text(json.dumps({k: summary[k] for k in ("best", "final", "selected")}))
        write_report(run_dir, summary, records)
        return summary


class FedBPTAlgorithm:
    name = "fedbpt"
    output = "prompt"

    def initial_arrays(self, cfg) -> Arrays:
        from fedtune.fedbpt.recipe import build_strategy

        return build_strategy(cfg, max(1, cfg.partition.num_clients)).initial_arrays()

    def strategy(self, cfg, initial: Arrays, sites: list[str]):
        from fedtune.fedbpt.recipe import build_strategy

        return build_strategy(cfg, len(sites))  # its initial arrays are fixed by the config

    def site_client(self, cfg, settings) -> SiteClient:
        return FedBPTSite(cfg, settings)

    def local_run(self, cfg) -> FedBPTLocal:
        return FedBPTLocal(cfg)

    def write_output(self, cfg, arrays: Arrays, folder: Path, rounds: int) -> Path:
        """The final global prompt (`fedtune nvflare collect`), reusable by `fedtune classify`."""
        from fedtune.fedbpt.recipe import FedBPT, TaskData
        from fedtune.fedbpt.tasks import task_from_config

        fed = FedBPT(cfg, TaskData(task_from_config(cfg.task), [], [], [], []))
        return fed.save(np.asarray(arrays["mean"], dtype=np.float32), folder, rounds, None)
