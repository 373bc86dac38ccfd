"""`fedtune run`: one code path for every algorithm and engine.

The algorithm (from the registry) builds its session; the engine supplies the transport:
the embedded simulator calls client apps in this process, NVIDIA FLARE carries messages to
sites (fedtune.engines.nvflare). The round driver is the same.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedtune import config as C
from fedtune.config import Config
from fedtune.core import algorithm as registry
from fedtune.core import checkpoint as CK
from fedtune.core.driver import DriverSettings, RoundDriver
from fedtune.engines.faults import FaultInjector
from fedtune.engines.simulator import InProcessTransport
from fedtune.errors import ConfigError
from fedtune.reporting import write_outputs


class ConsoleHooks:
    """The session's hooks, printing one line per round."""

    def __init__(self, session, console):
        self.session, self.console = session, console

    def evaluate(self, rnd, arrays):
        return self.session.evaluate(rnd, arrays)

    def on_round_end(self, rnd, arrays, record):
        self.session.on_round_end(rnd, arrays, record)
        if self.console:
            self.console.print(self.session.round_line(record) + f" · {record['round_seconds']:.1f}s")

    def state(self):
        return self.session.state()

    def load_state(self, arrays, meta):
        self.session.load_state(arrays, meta)


def run(cfg: Config, run_dir: Path, resume: bool = False, console=None) -> dict:
    """Run a config on its engine; returns the summary (also written to summary.json and report.md)."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    algo = registry.get(cfg.run.algorithm)
    engine = cfg.run.engine
    if engine not in ("simulator", "nvflare"):
        raise ConfigError(f"run.engine = '{engine}' is not available (simulator, nvflare)")
    session = algo.session(cfg)
    session.run_dir = run_dir
    if getattr(session, "cfg", cfg) != cfg:  # the session resolved choices made before round 1 (fedbpt.search)
        cfg = session.cfg
        C.save(cfg, run_dir / "config.toml")  # what a resume, a FLARE job and a reader see
    if console:
        console.print(session.describe(engine))
    hooks = ConsoleHooks(session, console)
    if engine == "nvflare":
        from fedtune.engines import nvflare

        state, where = nvflare.run(cfg, session, hooks, run_dir, resume=resume, console=console)
    else:
        where = None
        strategy = session.strategy()
        transport = InProcessTransport(session.client_app(), cfg.server.client_timeout, FaultInjector.from_config(cfg.faults))
        driver = RoundDriver(strategy, transport, session.client_ids,
                             DriverSettings.from_config(cfg, "simulator", session.client_sizes), hooks=hooks, run_dir=run_dir)
        state = None
        if resume and CK.exists(run_dir):
            state = CK.load(run_dir, strategy, hooks)
            if console:
                console.print(f"resuming after round {state.round}")
        elif resume:  # stopped before round 1 was checkpointed: start over
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            if console:
                console.print("no checkpoint yet (stopped during round 1): starting from round 1")
        state = driver.run(state)
    summary = session.finish(run_dir, state.history, state.global_arrays)
    summary["engine"] = engine
    if where:
        summary["nvflare"] = where
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_outputs(run_dir, summary)
    return summary
