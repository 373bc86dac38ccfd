"""Helpers shared by the `fedtune` subcommands: config arguments, run folders, the console."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtune.errors import FedtuneError

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.toml"


def console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def add_config_args(p: argparse.ArgumentParser, default: str = "the built-in defaults") -> None:
    p.add_argument("config", nargs="?", metavar="CONFIG", help=f"TOML config file (default: {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 --set run.rounds=3 (repeatable)")


def load_config(args):
    from fedtune import config as C

    return C.load(args.config, args.overrides)


def new_run_dir(cfg, out: str | None) -> Path:
    if out:
        d = Path(out)
        if (d / "metrics.jsonl").exists() or (d / "checkpoint").exists():
            raise FedtuneError(f"{d} already holds a run; continue it with --resume {d}, or choose another --out")
        return make_dir(d, "--out")
    base = Path(cfg.run.out_dir) / cfg.run.name
    d, i = base, 1
    while d.is_dir() and any(d.iterdir()):
        i += 1
        d = base.with_name(f"{base.name}-{i}")
    return make_dir(d, "run.out_dir / run.name")


def make_dir(d: Path, what: str) -> Path:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a name too long
        raise FedtuneError(f"{what}: cannot create the run folder {d}: {e.strerror or e}") from None
    return d
