"""Building, exporting and simulating a FLARE job from a fedtune config.

A job is a FLARE app folder holding:
- config/config_fed_server.json: the FedtuneController (server side);
- config/config_fed_client.json: a ClientAPIExecutor that launches custom/fedtune_site.py
  once per job on each site, as an external process (the model stays loaded across rounds),
  exchanging numpy arrays (FLARE's FOBS serializer writes them with np.save, allow_pickle=False);
- custom/fedtune_job.json: the fedtune config (JSON) and the algorithm's name and version;
- custom/fedtune_initial.safetensors: the initial global arrays (the server loads no model).

No data and no data path is in the job: each site names its own data in its site config.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from fedtune import __version__
from fedtune import config as C
from fedtune.core import arrays as A
from fedtune.engines.nvflare.controller import FedtuneController
from fedtune.engines.nvflare.jobfiles import INITIAL_FILE, JOB_FILE, RESUME_FOLDER
from fedtune.errors import ConfigError, FedtuneError
SITE_SCRIPT = Path(__file__).with_name("fedtune_site.py")


def job_name(cfg) -> str:
    name = cfg.nvflare.job_name or cfg.run.name or "fedtune"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "fedtune"


def _absolute_model_name(name: str) -> str:
    """A model given as a local path must still resolve from the site's own working folder."""
    p = Path(name).expanduser()
    if (name.startswith((".", "/", "~")) or os.sep in name) and p.exists():
        return str(p.resolve())
    return name


def build_job(cfg, initial: A.Arrays, python: str, resume_from: Path | None = None):
    """A FedJob for this config: the controller, the site script and the job files (and, to
    continue a run, the checkpoint folder `resume_from`, which only the server gets)."""
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    raw = cfg.to_dict()
    raw["model"]["name"] = _absolute_model_name(cfg.model.name)
    raw["data"]["path"] = raw["data"]["test_path"] = ""  # sites name their own data; the job carries none
    if "task" in raw:
        raw["task"]["train_path"] = raw["task"]["test_path"] = ""
    C.from_dict(raw, "the job's config")  # what a site will load must validate here first
    stage = Path(tempfile.mkdtemp(prefix="fedtune-job-"))
    (stage / JOB_FILE).write_text(json.dumps({"fedtune_version": __version__, "algorithm": cfg.run.algorithm,
                                              "config": raw}, indent=1), encoding="utf-8")
    (stage / INITIAL_FILE).write_bytes(A.pack(initial))
    shutil.copy(SITE_SCRIPT, stage / SITE_SCRIPT.name)  # a file outside the fedtune package, so FLARE copies it

    job = FedJob(name=job_name(cfg), min_clients=cfg.server.min_clients)
    job.set_app_packages(["fedtune"])  # sites and server run the installed fedtune; none of it is copied
    job.to_server(FedtuneController())
    job.to_clients(ScriptRunner(script=str(stage / SITE_SCRIPT.name), launch_external_process=True, command=python,
                                framework=FrameworkType.NUMPY, launch_timeout=float(cfg.nvflare.launch_timeout)))
    for f in (JOB_FILE, INITIAL_FILE):
        job.add_file_to_server(str(stage / f))
        job.add_file_to_clients(str(stage / f))
    if resume_from is not None:
        shutil.copytree(resume_from, stage / RESUME_FOLDER)
        job.add_file_to_server(str(stage / RESUME_FOLDER))
    return job, stage


def export(cfg, initial: A.Arrays, out: Path, python: str) -> Path:
    """Write a job folder that `nvflare job submit -j FOLDER` accepts; returns FOLDER."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FedtuneError(f"{out} is not empty; choose an empty or new folder for the job")
    job, stage = build_job(cfg, initial, python)
    try:
        with tempfile.TemporaryDirectory(prefix="fedtune-export-") as tmp:
            job.export_job(tmp)
            made = Path(tmp) / job.name
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                out.rmdir()
            shutil.copytree(made, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- FLARE's simulator


def kill_tree(pid: int, grace: float = 5.0) -> None:
    """Stop a process we started and every process below it (FLARE starts site scripts in
    their own process groups, so a group kill alone would miss them)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


def simulate(job, workspace: Path, sites: list[str], threads: int, env: dict, log_path: Path,
             poll: Callable[[], None] | None = None, timeout: float | None = None) -> int:
    """Run the job in FLARE's simulator (a subprocess, output to log_path); returns its exit code."""
    workspace = Path(workspace)
    with tempfile.TemporaryDirectory(prefix="fedtune-simjob-") as tmp:
        job.export_job(tmp)
        cmd = [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", str(Path(tmp) / job.name),
               "-w", str(workspace), "-c", ",".join(sites), "-n", str(len(sites)), "-t", str(threads)]
        with open(log_path, "a", encoding="utf-8") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            t0 = time.monotonic()
            try:
                while proc.poll() is None:
                    if poll:
                        poll()
                    if timeout and time.monotonic() - t0 > timeout:
                        raise FedtuneError(f"FLARE's simulator ran past {timeout:.0f}s; its log is {log_path}")
                    time.sleep(0.5)
            finally:
                if proc.poll() is None:
                    kill_tree(proc.pid)
            if poll:
                poll()
            return proc.returncode


def check_threads(threads: int, n_sites: int) -> int:
    if threads < 0:
        raise ConfigError(f"nvflare.threads must be >= 0, got {threads}")
    return n_sites if threads == 0 else min(threads, n_sites)
