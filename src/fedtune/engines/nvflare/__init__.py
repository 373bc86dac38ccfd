"""NVIDIA FLARE engine: the same Strategy and ClientApp objects as the embedded simulator,
moved by FLARE between a server and sites that are separate processes (or machines).

- `run(cfg, run_dir)`: `fedtune run CONFIG --engine nvflare`, in FLARE's simulator. The data
  is partitioned as the embedded simulator partitions it, one file per simulated site, and
  each site finds its file through its site config; the server sees no data. After the
  rounds, the global arrays of each round are evaluated on the held-out set here (as the
  embedded recipe does) and the run folder gets the same files: metrics.jsonl, adapter/ or
  prompt, rounds/, summary.json.
- `export(cfg, out)`: `fedtune nvflare export CONFIG --out JOB_DIR`, a job folder for
  `nvflare job submit -j JOB_DIR` on a POC or production deployment.

See docs/nvflare.md.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from fedtune.errors import FedtuneError

SIM_JOB_ID = "simulate_job"  # the job id FLARE's simulator uses


def _python(cfg, for_export: bool) -> str:
    if cfg.nvflare.python:
        return cfg.nvflare.python
    return "python3 -u" if for_export else f"{shlex.quote(sys.executable)} -u"


def export(cfg, out: str | Path, console=None) -> Path:
    """Write a FLARE job folder for this config (initial arrays computed here)."""
    from fedtune.engines.nvflare import job as J
    from fedtune.engines.nvflare.algorithms import get_algorithm

    out = Path(out)
    if out.exists() and any(out.iterdir()):  # before loading any model
        raise FedtuneError(f"{out} is not empty; choose an empty or new folder for the job")
    algorithm = get_algorithm(cfg.run.algorithm)
    initial = algorithm.initial_arrays(cfg)
    return J.export(cfg, initial, out, _python(cfg, for_export=True))


def read_results(results: Path) -> list[dict]:
    path = results / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run(cfg, run_dir: Path, resume: bool = False, console=None) -> dict:
    """Run a config in FLARE's simulator; returns the summary (as the embedded recipes do)."""
    from fedtune.core import arrays as A
    from fedtune.engines.nvflare import job as J
    from fedtune.engines.nvflare.algorithms import get_algorithm
    from fedtune.engines.nvflare.site import SITE_CONFIG_ENV
    from fedtune.engines.simulator import append_metrics

    if resume:
        raise FedtuneError("--resume is not available with run.engine = 'nvflare'; start a new run "
                           "(or resume an embedded-simulator run)")
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    nv = run_dir / "nvflare"
    workspace = Path(cfg.nvflare.workspace) if cfg.nvflare.workspace else nv / "workspace"
    if workspace.exists() and any(workspace.iterdir()):
        raise FedtuneError(f"nvflare.workspace = {workspace} is not empty; FLARE's simulator needs a fresh folder")
    algorithm = get_algorithm(cfg.run.algorithm)
    local = algorithm.local_run(cfg)
    if console:
        console.print(local.describe())

    # --- the sites' data: one file per simulated site, named in a site config that only sites read
    site_files = local.write_site_data(nv / "site_data")
    site_config = nv / "site_config.toml"
    lines = ["# fedtune site config for FLARE's simulator: each site reads its own entry", ""]
    for site, path in site_files.items():
        lines += [f'[sites."{site}"]', f"data_path = {json.dumps(str(path.resolve()))}"]
        lines += [f'format = "{local.site_format}"', ""] if local.site_format else [""]
    site_config.write_text("\n".join(lines), encoding="utf-8")

    # --- FLARE's simulator: server and sites, each site script a process of its own
    results = workspace / "server" / SIM_JOB_ID / "fedtune"
    sites = list(site_files)
    threads = J.check_threads(cfg.nvflare.threads, len(sites))
    env = dict(os.environ, **{SITE_CONFIG_ENV: str(site_config.resolve())})
    log_path = nv / "simulator.log"
    job, stage = J.build_job(cfg, local.initial, _python(cfg, for_export=False))
    if console:
        console.print(f"FLARE simulator: {len(sites)} sites, {threads} thread(s), workspace {workspace} · log {log_path}")
        if threads < len(sites):
            console.print(f"[yellow]warning:[/] nvflare.threads = {threads} < {len(sites)} sites: FLARE's simulator "
                          "relaunches each site's process (and reloads its model) every round")
    seen = [0]

    def poll():
        records = read_results(results)
        for rec in records[seen[0]:]:
            if console:
                console.print(local.round_line(rec) + f" · {rec['round_seconds']:.1f}s (FLARE)")
        seen[0] = len(records)

    try:
        rc = J.simulate(job, workspace, sites, threads, env, log_path, poll)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    err = results / "error.txt"
    if err.is_file():
        raise FedtuneError(f"the FLARE run stopped: {err.read_text(encoding='utf-8').strip()} "
                           f"(server log: {workspace / 'server' / 'log.txt'})")
    if not (results / "done.json").is_file():
        raise FedtuneError(f"FLARE's simulator exited (code {rc}) before the run finished; see {log_path}")

    # --- what the embedded recipe does around the rounds: evaluation, saved outputs, the summary
    records = read_results(results)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    for rec in records:
        rnd = rec["round"]
        local.on_round(rnd, A.unpack((results / "rounds" / f"round_{rnd:03d}.safetensors").read_bytes()), rec, run_dir)
        rec["engine"] = "nvflare"
        append_metrics(run_dir, rec)
        if console and "eval" in rec:
            console.print(local.round_line(rec))
    summary = local.finish(run_dir, records, A.unpack((results / "global.safetensors").read_bytes()))
    summary["nvflare"] = {"workspace": str(workspace), "results": str(results), "simulator_exit_code": rc}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def find_results(result_dir: Path) -> tuple[Path, Path]:
    """(the server's fedtune/ results folder, the job's app folder) inside a downloaded job result
    (`nvflare job download JOB_ID -o DIR` gives DIR/JOB_ID/{job,workspace})."""
    result_dir = Path(result_dir)
    candidates = [result_dir / "workspace" / "fedtune", result_dir / "fedtune", result_dir]
    results = next((c for c in candidates if (c / "metrics.jsonl").is_file() or (c / "error.txt").is_file()), None)
    if results is None:
        raise FedtuneError(f"{result_dir}: no fedtune results (expected workspace/fedtune/metrics.jsonl from "
                           "`nvflare job download JOB_ID -o DIR`, i.e. DIR/JOB_ID)")
    jobs = sorted(result_dir.rglob("fedtune_job.json"))
    if not jobs:
        raise FedtuneError(f"{result_dir}: no fedtune_job.json (the downloaded job folder holds it under job/)")
    return results, jobs[0].parent.parent


def collect(result_dir: str | Path, out: str | Path, overrides: list[str] | None = None, console=None) -> dict:
    """`fedtune nvflare collect`: turn a deployment's downloaded result into a run folder:
    metrics.jsonl, config.toml, the global adapter (FedIT, PEFT format) or prompt (FedBPT),
    summary.json. The model is loaded here (model.name can be overridden)."""
    from fedtune import config as C
    from fedtune.core import arrays as A
    from fedtune.engines.nvflare.job import read_job_files

    results, app_dir = find_results(Path(result_dir))
    err = results / "error.txt"
    if err.is_file():
        raise FedtuneError(f"the FLARE run stopped: {err.read_text(encoding='utf-8').strip()}")
    if not (results / "done.json").is_file():
        raise FedtuneError(f"{results}: the run did not finish (no done.json); see the server's log in {result_dir}")
    cfg, algorithm, _ = read_job_files(app_dir, overrides=overrides)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FedtuneError(f"{out} is not empty; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    records = read_results(results)
    shutil.copy(results / "metrics.jsonl", out / "metrics.jsonl")
    C.save(cfg, out / "config.toml")
    written = algorithm.write_output(cfg, A.unpack((results / "global.safetensors").read_bytes()),
                                     out / algorithm.output, len(records))
    sites = sorted({c["id"] for r in records for c in r["clients"]})
    summary = {"algorithm": cfg.run.algorithm, "engine": "nvflare", "rounds": len(records), "sites": sites,
               "final": {}, "dropped": sum(len(r["dropped"]) for r in records), "source": str(results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if console:
        console.print(f"{len(records)} rounds from sites {', '.join(sites)} · {algorithm.output}: {written}")
    return summary
