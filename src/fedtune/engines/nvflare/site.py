"""The site side of a FLARE job: site-local config, and the client loop.

A site reads its own data path from its own site config, never from the job: the job that
the server distributes carries the fedtune config and the initial arrays, and no data path
is used from it. The site config is a small TOML file, looked up in this order:

1. the file named by the environment variable FEDTUNE_SITE_CONFIG;
2. `<site workspace>/local/fedtune_site.toml` (the `local/` folder of the site's startup kit).

It holds a table per site (a file may serve several simulated sites), or top-level keys
that apply to whichever site reads it:

    [sites."site-1"]
    data_path = "/srv/data/site1.jsonl"   # required
    format = "auto"                       # optional: overrides data.format for this file
    model = "/srv/models/SmolLM2-135M"    # optional: this site's copy of the base model

The client script (`fedtune_site.py` in the job) calls `main()`: it is launched once per
run and keeps the model loaded across rounds. Each round it receives named numpy arrays
and a JSON config, runs the algorithm's ClientApp, and sends back named numpy arrays and
JSON-encoded numbers. A site that cannot load its data answers every task with the reason,
so the server drops it (naming the site and the path) and the run goes on if enough sites
remain.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from fedtune.engines.nvflare import wire as W
from fedtune.errors import ConfigError, DataError, FedtuneError

SITE_CONFIG_ENV = "FEDTUNE_SITE_CONFIG"
SITE_CONFIG_FILE = "fedtune_site.toml"
SITE_KEYS = ("data_path", "format", "model", "trust_remote_code")

@dataclass
class SiteSettings:
    site: str
    data_path: Path
    format: str | None  # None: the job's data.format
    model: str | None  # None: the job's model.name
    source: str  # the site config file these came from
    trust_remote_code: bool = False  # site-local only: a job can never turn it on
    state_dir: Path | None = None  # where this site keeps state between rounds (SCAFFOLD's control variate)


def find_site_config(site_workspace: Path | None) -> Path | None:
    env = os.environ.get(SITE_CONFIG_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    if site_workspace is not None:
        p = site_workspace / "local" / SITE_CONFIG_FILE
        if p.is_file():
            return p
    return None


def read_site_settings(site: str, site_workspace: Path | None) -> SiteSettings:
    """This site's settings from its site config; DataError naming the site and file otherwise."""
    path = find_site_config(site_workspace)
    where = (f"${SITE_CONFIG_ENV}" if os.environ.get(SITE_CONFIG_ENV, "").strip()
             else f"{site_workspace}/local/{SITE_CONFIG_FILE}" if site_workspace else SITE_CONFIG_FILE)
    if path is None:
        raise DataError(f"site '{site}': no site config: write {where} with [sites.\"{site}\"] data_path = \"...\" "
                        f"(or point ${SITE_CONFIG_ENV} at one)")
    if not path.is_file():
        raise DataError(f"site '{site}': site config {path} (from {where}) does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"site '{site}': {path}: invalid TOML: {e}") from None
    sites = raw.get("sites", {})
    if not isinstance(sites, dict):
        raise ConfigError(f"site '{site}': {path}: 'sites' must be a table of site names")
    entry = sites.get(site)
    if entry is None:
        entry = {k: v for k, v in raw.items() if k != "sites"}
    if not isinstance(entry, dict) or "data_path" not in entry:
        known = ", ".join(sorted(sites)) or "none"
        raise DataError(f"site '{site}': {path} names no data_path for this site "
                        f"(add [sites.\"{site}\"] data_path = \"...\"; sites in the file: {known})")
    unknown = sorted(set(entry) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(f"site '{site}': {path}: unknown key(s) {unknown} (valid: {', '.join(SITE_KEYS)})")
    for k in SITE_KEYS:
        want = bool if k == "trust_remote_code" else str
        if k in entry and not isinstance(entry[k], want):
            raise ConfigError(f"site '{site}': {path}: {k} must be a {want.__name__}, got {entry[k]!r}")
    data_path = Path(entry["data_path"]).expanduser()
    if not data_path.is_absolute():
        data_path = (path.parent / data_path).resolve()
    return SiteSettings(site, data_path, entry.get("format"), entry.get("model"), str(path),
                        entry.get("trust_remote_code", False))


def site_config(cfg, s: SiteSettings):
    """The job's config as this site runs it: the site's own model (if it names one), and
    trust_remote_code from the site config only (whoever writes a job must not decide what
    code a site runs)."""
    model = replace(cfg.model, trust_remote_code=s.trust_remote_code, name=s.model or cfg.model.name)
    return replace(cfg, model=model)


def check_data_path(s: SiteSettings) -> None:
    """A clear error for a missing or empty data path, naming the site and the path."""
    p = s.data_path
    if not p.exists():
        raise DataError(f"site '{s.site}': data path {p} does not exist (from {s.source})")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"site '{s.site}': data path {p} is empty (from {s.source})")
    if p.is_dir() and not any(p.iterdir()):
        raise DataError(f"site '{s.site}': data path {p} is an empty folder (from {s.source})")


# ----------------------------------------------------------------------------- the client loop


def _fit(client, site: str, model, faults, timeout: float) -> dict:
    """One task: the reply's params and meta (or the reason there is none)."""
    from fedtune.core.strategy import FitIns
    from fedtune.engines.faults import InjectedFault, injected_call

    meta = model.meta or {}
    attempt = int(meta.get(W.META_ATTEMPT, 0))
    fault = faults.draw(int(model.current_round or 0), attempt, site) if faults else None
    ins = FitIns(W.plain_arrays(model.params or {}), json.loads(meta[W.META_CONFIG]))
    t0 = time.perf_counter()
    try:
        res = injected_call(fault, lambda: client.fit(site, ins, int(meta[W.META_INDEX])), timeout)()
    except InjectedFault as e:
        return {"params": {}, "meta": {W.META_ERROR: f"{type(e).__name__}: {e}", W.META_INJECTED: True}}
    if fault == "disappear":  # the site did its work; the reply is lost on the way
        return {"params": {}, "meta": {W.META_ERROR: "disappeared: injected fault: the client's reply never arrived",
                                       W.META_CAUSE: "disappeared", W.META_INJECTED: True}}
    return {"params": W.plain_arrays(res.arrays),
            "meta": {W.META_EXAMPLES: int(res.num_examples), W.META_METRICS: json.dumps(res.metrics),
                     W.META_SECONDS: float(time.perf_counter() - t0), W.META_INJECTED: fault is not None}}


def main(app_dir: str | Path) -> None:
    """The client loop of the job's site script; runs until FLARE ends the job."""
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel

    from fedtune.engines.faults import FaultInjector
    from fedtune.engines.nvflare.jobfiles import read_job_files

    flare.init()
    site = flare.get_site_name()
    app_dir = Path(app_dir).resolve()
    site_workspace = app_dir.parents[1] if len(app_dir.parents) > 1 else None  # <site>/<job_id>/app_<site>
    client, startup_error, faults, timeout = None, None, None, 0.0
    try:
        cfg, algorithm, _ = read_job_files(app_dir)
        settings = read_site_settings(site, site_workspace)
        check_data_path(settings)
        print(f"fedtune site {site}: data {settings.data_path} (site config {settings.source})", flush=True)
        if cfg.model.trust_remote_code and not settings.trust_remote_code:
            print(f"fedtune site {site}: the job asks for model.trust_remote_code; it is off unless this site's "
                  f"config sets trust_remote_code = true", flush=True)
        cfg = site_config(cfg, settings)
        settings.state_dir = (site_workspace or app_dir) / "fedtune_client_state"
        faults, timeout = FaultInjector.from_config(cfg.faults), cfg.server.client_timeout
        client = algorithm.site_client(cfg, settings)
    except FedtuneError as e:
        startup_error = str(e) if site in str(e) else f"site '{site}': {e}"
    except Exception as e:  # anything else at start-up: report it to the server with where it came from
        startup_error = f"site '{site}': {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
    if startup_error:
        print(f"fedtune site {site}: cannot take part: {startup_error}", flush=True)

    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if startup_error:
            flare.send(FLModel(params={}, meta={W.META_ERROR: startup_error}))
            continue
        try:
            reply = _fit(client, site, model, faults, timeout)
        except Exception as e:  # this round fails for this site; the server records the reason
            reason = f"site '{site}': {type(e).__name__}: {e}"
            print(f"fedtune site {site}: {reason}\n{traceback.format_exc(limit=6)}", flush=True)
            reply = {"params": {}, "meta": {W.META_ERROR: reason}}
        flare.send(FLModel(params=reply["params"], meta=reply["meta"]))
