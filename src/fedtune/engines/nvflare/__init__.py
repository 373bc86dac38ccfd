"""NVIDIA FLARE engine: the same round driver, Strategy and client apps as the embedded
simulator, with FLARE carrying the messages between a server and sites that are separate
processes (or machines).

- `run(cfg, session, hooks, run_dir)`: `fedtune run CONFIG --engine nvflare`, in FLARE's
  simulator. Each simulated site gets its data file (named in a site config only sites
  read); FLARE's server runs the driver; then each round's global arrays go through the
  session's hooks here (held-out evaluation, best-by-dev, saved outputs), and the run
  folder gets the same files as an embedded run, with a checkpoint that `--resume` continues.
- `export(cfg, out)`: `fedtune nvflare export CONFIG --out JOB_DIR`.
- `collect(result_dir, out)`: `fedtune nvflare collect`, a deployment's result as a run folder.

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

from fedtune.core import arrays as A
from fedtune.core import atomic
from fedtune.core import checkpoint as CK
from fedtune.core.checkpoint import RunState
from fedtune.errors import FedtuneError

SIM_JOB_ID = "simulate_job"  # the job id FLARE's simulator uses


def _python(cfg, for_export: bool) -> str:
    if cfg.nvflare.python:
        return cfg.nvflare.python
    return "python3 -u" if for_export else f"{shlex.quote(sys.executable)} -u"


def export(cfg, out: str | Path, console=None) -> Path:
    """Write a FLARE job folder for this config (initial arrays computed here)."""
    from fedtune.core import algorithm as registry
    from fedtune.engines.nvflare import job as J

    out = Path(out)
    if out.exists() and any(out.iterdir()):  # before loading any model
        raise FedtuneError(f"{out} is not empty; choose an empty or new folder for the job")
    initial = registry.get(cfg.run.algorithm).initial_arrays(cfg)
    return J.export(cfg, initial, out, _python(cfg, for_export=True))


def _write_site_config(session, nv: Path) -> tuple[Path, list[str]]:
    site_files = session.write_site_data(nv / "site_data")
    lines = ["# fedtune site config for FLARE's simulator: each site reads its own entry", ""]
    for site, path in site_files.items():
        lines += [f'[sites."{site}"]', f"data_path = {json.dumps(str(path.resolve()))}"]
        lines += [f'format = "{session.site_format}"', ""] if session.site_format else [""]
    path = nv / "site_config.toml"
    atomic.write_text(path, "\n".join(lines))
    return path, list(site_files)


def run(cfg, session, hooks, run_dir: Path, resume: bool = False, console=None) -> tuple[RunState, dict]:
    """Run the rounds in FLARE's simulator, passing each new round through `hooks` here;
    returns the state and where FLARE kept its files."""
    from fedtune.engines.nvflare import job as J
    from fedtune.engines.nvflare.site import SITE_CONFIG_ENV

    run_dir = Path(run_dir)
    nv = run_dir / "nvflare"
    state, resume_from = RunState(0, {}, []), None
    if resume and CK.exists(run_dir):
        state = CK.load(run_dir, session.strategy(), hooks)  # restores the session's state too
        resume_from = run_dir / CK.FOLDER
        if console:
            console.print(f"resuming after round {state.round} (a new FLARE job continues from the checkpoint)")
    elif resume:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    attempt = 1 + sum(1 for _ in nv.glob("workspace*")) if nv.is_dir() else 1
    workspace = Path(cfg.nvflare.workspace) if cfg.nvflare.workspace else \
        nv / ("workspace" if attempt == 1 else f"workspace-{attempt}")
    if workspace.exists() and any(workspace.iterdir()):
        raise FedtuneError(f"nvflare.workspace = {workspace} is not empty; FLARE's simulator needs a fresh folder")
    site_config, sites = _write_site_config(session, nv)
    results = workspace / "server" / SIM_JOB_ID / "fedtune"
    threads = J.check_threads(cfg.nvflare.threads, len(sites))
    env = dict(os.environ, **{SITE_CONFIG_ENV: str(site_config.resolve())})
    log_path = nv / "simulator.log"
    job, stage = J.build_job(cfg, session.strategy().initial_arrays(), _python(cfg, for_export=False), resume_from)
    if console:
        console.print(f"FLARE simulator: {len(sites)} sites, {threads} thread(s), workspace {workspace} · log {log_path}")
        if threads < len(sites):
            console.print(f"[yellow]warning:[/] nvflare.threads = {threads} < {len(sites)} sites: FLARE's simulator "
                          "relaunches each site's process (and reloads its model) every round")
    done = [state.round]

    def poll():  # each new round's global arrays through the session, as the round ends on the server
        for rec in CK.read_metrics(results)[done[0]:]:
            path = results / "rounds" / f"round_{rec['round']:03d}.safetensors"
            if rec["round"] <= done[0] or not path.is_file():
                continue
            arrays = A.unpack(path.read_bytes())
            rnd = rec["round"]
            if rnd % cfg.run.eval_every == 0 or rnd == cfg.run.rounds:
                t_eval = time.perf_counter()
                ev = hooks.evaluate(rnd, arrays)
                if ev is not None:
                    rec["eval"] = ev
                    rec["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
            hooks.on_round_end(rnd, arrays, rec)
            CK.append_metrics(run_dir, rec)
            state.history.append(rec)
            state.round, state.global_arrays = rnd, arrays
            done[0] = rnd

    try:
        rc = J.simulate(job, workspace, sites, threads, env, log_path, poll)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        _save_checkpoint(run_dir, results, state, hooks)
    err = results / "error.txt"
    if err.is_file():
        raise FedtuneError(f"the FLARE run stopped: {err.read_text(encoding='utf-8').strip()} "
                           f"(server log: {workspace / 'server' / 'log.txt'}); continue with --resume {run_dir}")
    if not (results / "done.json").is_file():
        raise FedtuneError(f"FLARE's simulator exited (code {rc}) before the run finished; see {log_path}; "
                           f"continue with --resume {run_dir}")
    return state, {"workspace": str(workspace), "results": str(results), "simulator_exit_code": rc}


def _save_checkpoint(run_dir: Path, results: Path, state: RunState, hooks) -> None:
    """The local checkpoint: the server's strategy state at the last round both sides have,
    with the session's own state (best-by-dev, say)."""
    if not state.round or not CK.exists(results):
        return
    meta, _, s_arrays, _ = CK.read(results)
    if meta["round"] != state.round:  # the server got one round further than this side saw
        return

    class _Saved:
        def state(self):
            return s_arrays, meta.get("strategy") or {}

    CK.save(run_dir, state, _Saved(), hooks)


def find_results(result_dir: Path) -> tuple[Path, Path]:
    """(the server's fedtune/ results folder, the job's app folder) inside a downloaded job result
    (`nvflare job download JOB_ID -o DIR` gives DIR/JOB_ID/{job,workspace})."""
    from fedtune.engines.nvflare.jobfiles import JOB_FILE

    result_dir = Path(result_dir)
    candidates = [result_dir / "workspace" / "fedtune", result_dir / "fedtune", result_dir]
    results = next((c for c in candidates if (c / "metrics.jsonl").is_file() or (c / "error.txt").is_file()), None)
    if results is None:
        raise FedtuneError(f"{result_dir}: no fedtune results (expected workspace/fedtune/metrics.jsonl from "
                           "`nvflare job download JOB_ID -o DIR`, i.e. DIR/JOB_ID)")
    jobs = sorted(result_dir.rglob(JOB_FILE))
    if not jobs:
        raise FedtuneError(f"{result_dir}: no {JOB_FILE} (the downloaded job folder holds it under job/)")
    return results, jobs[0].parent.parent


def collect(result_dir: str | Path, out: str | Path, overrides: list[str] | None = None, console=None) -> dict:
    """`fedtune nvflare collect`: a deployment's downloaded result as a run folder. With the
    data the run's evaluation needs (the config's data or task paths, e.g. through --set),
    every round goes through the algorithm's session as in `fedtune run` (held-out metrics,
    best-by-dev prompt); without it, the final round's global arrays are written as they are,
    and a config that selects on dev is refused with what to set."""
    from fedtune import config as C
    from fedtune.engines.nvflare.jobfiles import read_job_files
    from fedtune.reporting import write_outputs

    results, app_dir = find_results(Path(result_dir))
    err = results / "error.txt"
    if err.is_file():
        raise FedtuneError(f"the FLARE run stopped: {err.read_text(encoding='utf-8').strip()}")
    if not (results / "done.json").is_file():
        raise FedtuneError(f"{results}: the run did not finish (no done.json); see the server's log in {result_dir}")
    cfg, algorithm, _ = read_job_files(app_dir, overrides=list(overrides or []) + ["model.trust_remote_code=false"])
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FedtuneError(f"{out} is not empty; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    records = CK.read_metrics(results)
    C.save(cfg, out / "config.toml")
    final = A.unpack((results / "global.safetensors").read_bytes())
    if algorithm.needs_data_to_collect(cfg):
        session = algorithm.session(cfg)
        session.run_dir = out
        for rec in records:
            arrays = A.unpack((results / "rounds" / f"round_{rec['round']:03d}.safetensors").read_bytes())
            if rec["round"] % cfg.run.eval_every == 0 or rec["round"] == len(records):
                rec["eval"] = session.evaluate(rec["round"], arrays)
            session.on_round_end(rec["round"], arrays, rec)
            CK.append_metrics(out, rec)
        summary = session.finish(out, records, final)
        written = out / algorithm.output
    else:
        shutil.copy(results / "metrics.jsonl", out / "metrics.jsonl")
        written = algorithm.write_output(cfg, final, out / algorithm.output, len(records))
        summary = {"algorithm": cfg.run.algorithm, "rounds": len(records), "final": {}}
    sites = sorted({c["id"] for r in records for c in r["clients"]})
    summary.update({"engine": "nvflare", "sites": sites, "dropped": sum(len(r["dropped"]) for r in records),
                    "source": str(results)})
    write_outputs(out, summary)
    if console:
        console.print(f"{len(records)} rounds from sites {', '.join(sites)} · {algorithm.output}: {written}")
    return summary
