"""The fedtune files inside a FLARE job, and reading them on a site, the server, or where a
downloaded result is collected."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune import __version__
from fedtune import config as C
from fedtune.core import algorithm as registry
from fedtune.core import arrays as A
from fedtune.errors import FedtuneError

JOB_FILE = "fedtune_job.json"
INITIAL_FILE = "fedtune_initial.safetensors"
RESUME_FOLDER = "fedtune_resume"  # a checkpoint the server continues from (fedtune run --resume)


def read_job_files(app_dir: Path, with_initial: bool = False, overrides: list[str] | None = None):
    """(config, algorithm, initial arrays or None) from a job's app folder, on a site or the server
    (or, with `overrides`, where a downloaded result is collected)."""
    custom = Path(app_dir) / "custom"
    path = custom / JOB_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FedtuneError(f"{path}: cannot read the fedtune job file: {e}") from None
    if meta.get("fedtune_version") != __version__:
        raise FedtuneError(f"{path}: the job was built with fedtune {meta.get('fedtune_version')}, but this "
                           f"machine runs fedtune {__version__}; install the same version everywhere")
    raw = meta["config"]
    for item in overrides or []:
        C.apply_override(raw, item)
    cfg = C.from_dict(raw, str(path))
    initial = None
    if with_initial:
        try:
            initial = A.unpack((custom / INITIAL_FILE).read_bytes())
        except OSError as e:
            raise FedtuneError(f"{custom / INITIAL_FILE}: cannot read the initial arrays: {e}") from None
    return cfg, registry.get(cfg.run.algorithm), initial


