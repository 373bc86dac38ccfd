"""The embedded in-process engine: a Transport that calls client apps in this process.

Payloads go through the same wire format a real deployment uses (safetensors bytes), so
byte counts are real and no client can alias the server's arrays. The round loop is the
one in `fedtune.core.driver`; this module only moves messages, injects seeded faults
([faults]) and enforces the time limit per client call.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fedtune.core import arrays as A
from fedtune.core.checkpoint import RunState
from fedtune.core.driver import DriverSettings, Reply, RoundDriver, RoundFailed
from fedtune.core.strategy import ClientApp, FitIns, FitRes, Strategy
from fedtune.engines.faults import (ClientDisappeared, ClientTimeout, FaultInjector, InjectedFault,
                                    call_with_time_limit, injected_call)

__all__ = ["InProcessTransport", "Simulator", "SimulatorSettings", "RoundFailed", "RunState"]


class InProcessTransport:
    def __init__(self, client_app: ClientApp, client_timeout: float = 0.0, faults: FaultInjector | None = None):
        if faults and "timeout" in faults.kinds and faults.probability > 0 and client_timeout <= 0:
            raise ValueError("injected 'timeout' faults need a time limit (client_timeout > 0)")
        self.client_app = client_app
        self.client_timeout = client_timeout
        self.faults = faults
        self._late: list[tuple[str, threading.Thread]] = []  # calls that outlived their time limit

    def _call(self, cid: str, ins: FitIns, fault: str | None) -> tuple[FitRes, int, int, float]:
        """Send the arrays, run the client (under its time limit), receive its reply."""
        down = A.pack(ins.arrays)
        config = dict(ins.config)

        def call():
            t0 = time.perf_counter()
            res = self.client_app.fit(cid, FitIns(A.unpack(down), config))
            return res, A.pack(res.arrays), time.perf_counter() - t0

        call = injected_call(fault, call, self.client_timeout)
        if self.client_timeout > 0:
            res, up, seconds = call_with_time_limit(call, self.client_timeout, name=cid)
        else:
            res, up, seconds = call()
        if fault == "disappear":
            raise ClientDisappeared("injected fault: the client's reply never arrived")
        return FitRes(cid, A.unpack(up), res.num_examples, res.metrics), len(down), len(up), seconds

    def exchange(self, rnd: int, attempt: int, messages: dict[str, FitIns]) -> Iterator[Reply]:
        for cid, ins in messages.items():
            self.settle()
            fault = self.faults.draw(rnd, attempt, cid) if self.faults else None
            try:
                res, b_down, b_up, seconds = self._call(cid, ins, fault)
            except ClientTimeout as e:
                self._late.append((cid, e.thread))
                yield Reply(cid, cause="timeout", reason=f"timeout: {e}", injected=fault is not None)
            except ClientDisappeared as e:
                yield Reply(cid, cause="disappeared", reason=f"disappeared: {e}", injected=fault is not None)
            except Exception as e:  # a client that raises is left out of the round, with its reason
                yield Reply(cid, cause="error", reason=f"{type(e).__name__}: {e}", injected=fault is not None,
                            traceback="" if isinstance(e, InjectedFault) else traceback.format_exc(limit=3))
            else:
                yield Reply(cid, res, b_down, b_up, seconds, injected=fault is not None)

    def settle(self) -> None:
        """Let calls that outlived their time limit end before the next call touches shared
        client state; stop the run if one is still going (a thread cannot be killed)."""
        limit = self.client_timeout
        for cid, thread in self._late:
            thread.join(limit)
            if thread.is_alive():
                raise RoundFailed(
                    f"client {cid} is still running {limit:g}s after its time limit (server.client_timeout = "
                    f"{limit:g}); a Python thread cannot be stopped, and the clients of this process share state, "
                    "so the run stops here. The last completed round is in the checkpoint: continue with "
                    "`fedtune run --resume RUN_DIR`, or raise server.client_timeout")
        self._late = []


@dataclass
class SimulatorSettings:
    rounds: int
    min_clients: int = 1
    eval_every: int = 1
    progress: bool = True
    client_timeout: float = 0.0  # seconds per client call (0 = no limit); see engines/faults.py
    round_retries: int = 2  # a round below min_clients asks its missing clients again, this many times
    max_examples: int = 0
    known_sizes: dict | None = None


class _Hooks:
    def __init__(self, evaluate, on_round_end):
        self._evaluate, self._end = evaluate, on_round_end

    def evaluate(self, rnd, arrays):
        return self._evaluate(rnd, arrays) if self._evaluate else None

    def on_round_end(self, rnd, arrays, record):
        if self._end:
            self._end(rnd, arrays, record)


class Simulator:
    """The round driver over the in-process transport, with plain callbacks (tests, compare)."""

    def __init__(self, strategy: Strategy, client_app: ClientApp, client_ids: list[str], settings: SimulatorSettings,
                 *, evaluate=None, on_round_end=None, run_dir: str | Path | None = None,
                 faults: FaultInjector | None = None, hooks=None):
        s = settings
        self.transport = InProcessTransport(client_app, s.client_timeout, faults)
        self.driver = RoundDriver(strategy, self.transport, client_ids,
                                  DriverSettings(rounds=s.rounds, min_clients=s.min_clients, eval_every=s.eval_every,
                                                 round_retries=s.round_retries, progress=s.progress,
                                                 max_examples=s.max_examples, known_sizes=s.known_sizes),
                                  hooks=hooks or (_Hooks(evaluate, on_round_end) if evaluate or on_round_end else None),
                                  run_dir=run_dir)

    def run(self, state: RunState | None = None) -> RunState:
        return self.driver.run(state)
