"""The contract every algorithm package fulfils, and the registry that finds them.

An algorithm package (`fedtune/<name>/`) holds a module `algorithm.py` whose `ALGORITHM`
object has:

- `name`, and `output`: the run folder's result (`adapter`, `prompt`);
- `check_config(cfg)`: checks of its own config sections that a type cannot express;
- `session(cfg)`: the driver's side of a run, in this process: data, model, held-out
  evaluation, per-round hook, checkpointed state, site data files, `finish` (outputs and
  summary). It gives the driver its `strategy()`, `client_ids`, `client_sizes` and, for the
  embedded simulator, `client_app()` over every client's data;
- `initial_arrays(cfg)` and `strategy(cfg, initial, sites)`: the server step where no data
  is (a FLARE server);
- `site_client(cfg, settings)`: on a FLARE site, the client app over that site's own data;
- `needs_data_to_collect(cfg)`: whether a deployment's result needs the session (data) to
  become a run folder (best-by-dev selection), else `write_output(cfg, arrays, folder,
  rounds)` writes the final global arrays as the result.

The registry lists the packages that have `algorithm.py` without importing them, so
config validation and `--help` stay cheap; adding an algorithm touches its package only.
Engines and the CLI find algorithms here, never by importing them by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Protocol

from fedtune.core.arrays import Arrays
from fedtune.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the fedtune package


class Session(Protocol):
    client_ids: list[str]
    client_sizes: dict[str, int]
    site_format: str | None
    run_dir: Path | None

    def strategy(self): ...

    def client_app(self): ...

    def describe(self, engine: str) -> str: ...

    def evaluate(self, rnd: int, arrays: Arrays) -> dict | None: ...

    def on_round_end(self, rnd: int, arrays: Arrays, record: dict) -> None: ...

    def round_line(self, record: dict) -> str: ...

    def state(self) -> tuple[Arrays, dict]: ...

    def load_state(self, arrays: Arrays, meta: dict) -> None: ...

    def write_site_data(self, folder: Path) -> dict[str, Path]: ...

    def finish(self, run_dir: Path, history: list[dict], final: Arrays) -> dict: ...


class Algorithm(Protocol):
    name: str
    output: str

    def check_config(self, cfg) -> None: ...

    def session(self, cfg) -> Session: ...

    def initial_arrays(self, cfg) -> Arrays: ...

    def strategy(self, cfg, initial: Arrays, sites: list[str]): ...

    def site_client(self, cfg, settings): ...

    def needs_data_to_collect(self, cfg) -> bool: ...

    def write_output(self, cfg, arrays: Arrays, folder: Path, rounds: int) -> Path: ...


def names() -> list[str]:
    """The algorithms installed: subpackages of fedtune with an algorithm module (not imported)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE_ROOT)])
                  if m.ispkg and (PACKAGE_ROOT / m.name / "algorithm.py").is_file())


def get(name: str) -> Algorithm:
    known = names()
    if name not in known:
        raise ConfigError(f"run.algorithm = '{name}' is not an installed algorithm (installed: {', '.join(known)})")
    return importlib.import_module(f"fedtune.{name}.algorithm").ALGORITHM
