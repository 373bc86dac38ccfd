"""The embedded in-process engine.

It drives a Strategy and a ClientApp round by round in one process. Payloads go through
the same wire format a real deployment uses (safetensors bytes), so byte counts are real
and no client can alias the server's arrays. The engine holds no algorithm logic.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fedtune.core import arrays as A
from fedtune.core.strategy import ClientApp, FitIns, FitRes, Strategy
from fedtune.engines.faults import (ClientDisappeared, ClientTimeout, FaultInjector, InjectedFault,
                                    call_with_time_limit, injected_call)
from fedtune.errors import FedtuneError, UpdateRejected

log = logging.getLogger("fedtune.simulator")

EvaluateFn = Callable[[int, A.Arrays], dict]
RoundHook = Callable[[int, A.Arrays, dict], None]


class RoundFailed(FedtuneError):
    pass


@dataclass
class SimulatorSettings:
    rounds: int
    min_clients: int = 1
    eval_every: int = 1
    progress: bool = True
    client_timeout: float = 0.0  # seconds per client call (0 = no limit); see engines/faults.py
    round_retries: int = 2  # a round below min_clients asks its missing clients again, this many times


@dataclass
class RunState:
    """Everything needed to continue a run after the last completed round."""

    round: int = 0
    global_arrays: A.Arrays = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one metrics record per completed round


class Simulator:
    def __init__(self, strategy: Strategy, client_app: ClientApp, client_ids: list[str], settings: SimulatorSettings,
                 *, evaluate: EvaluateFn | None = None, on_round_end: RoundHook | None = None,
                 run_dir: str | Path | None = None, faults: FaultInjector | None = None):
        if not client_ids:
            raise ValueError("no clients")
        if faults and "timeout" in faults.kinds and faults.probability > 0 and settings.client_timeout <= 0:
            raise ValueError("injected 'timeout' faults need a time limit (client_timeout > 0)")
        self.strategy = strategy
        self.client_app = client_app
        self.client_ids = list(client_ids)
        self.settings = settings
        self.evaluate = evaluate
        self.on_round_end = on_round_end
        self.run_dir = Path(run_dir) if run_dir else None
        self.faults = faults
        self._late: list[tuple[str, threading.Thread]] = []  # calls that outlived their time limit

    # ------------------------------------------------------------------ one client call

    def _call_client(self, cid: str, ins: FitIns, fault: str | None) -> tuple[FitRes, int, int, float]:
        """Send the arrays, run the client (under its time limit), receive its reply."""
        down = A.pack(ins.arrays)
        config = dict(ins.config)

        def call():
            t0 = time.perf_counter()
            res = self.client_app.fit(cid, FitIns(A.unpack(down), config))
            return res, A.pack(res.arrays), time.perf_counter() - t0

        call = injected_call(fault, call, self.settings.client_timeout)
        if self.settings.client_timeout > 0:
            res, up, seconds = call_with_time_limit(call, self.settings.client_timeout, name=cid)
        else:
            res, up, seconds = call()
        if fault == "disappear":
            raise ClientDisappeared("injected fault: the client's reply never arrived")
        res = FitRes(cid, A.unpack(up), int(res.num_examples), _json_metrics(res.metrics))
        return res, len(down), len(up), seconds

    def _fit_one(self, rnd: int, attempt: int, cid: str, ins: FitIns) -> tuple[FitRes | None, dict]:
        """One client call. Returns (its result, its record), or (None, a drop record with the reason)."""
        self._wait_for_late_calls()
        fault = self.faults.draw(rnd, attempt, cid) if self.faults else None
        drop = {"id": cid, "attempt": attempt + 1, "injected": fault is not None}  # attempts count from 1
        try:
            res, b_down, b_up, seconds = self._call_client(cid, ins, fault)
            self.strategy.check_reply(ins, res)  # raises UpdateRejected with the reason
        except UpdateRejected as e:
            drop.update(cause="rejected", reason=f"rejected: {e}")
        except ClientTimeout as e:
            self._late.append((cid, e.thread))
            drop.update(cause="timeout", reason=f"timeout: {e}")
        except ClientDisappeared as e:
            drop.update(cause="disappeared", reason=f"disappeared: {e}")
        except FedtuneError:  # a config or data error inside a client stops the run
            raise
        except Exception as e:  # a client that raises is left out of the round, with its reason
            drop.update(cause="error", reason=f"{type(e).__name__}: {e}")
            if not isinstance(e, InjectedFault):
                drop["traceback"] = traceback.format_exc(limit=3)
        else:
            record = {"id": cid, "attempt": attempt + 1, "examples": res.num_examples, "bytes_down": b_down,
                      "bytes_up": b_up, "seconds": round(seconds, 4)}
            record.update({k: v for k, v in res.metrics.items() if k not in record})
            return res, record
        log.warning("round %d: client %s dropped (attempt %d): %s", rnd, cid, drop["attempt"], drop["reason"])
        return None, drop

    def _wait_for_late_calls(self) -> None:
        """Let calls that outlived their time limit end before the next call touches
        shared client state; stop the run if one is still going (a thread cannot be killed)."""
        limit = self.settings.client_timeout
        for cid, thread in self._late:
            thread.join(limit)
            if thread.is_alive():
                raise RoundFailed(
                    f"client {cid} is still running {limit:g}s after its time limit (server.client_timeout = "
                    f"{limit:g}); a Python thread cannot be stopped, and the clients of this process share state, "
                    "so the run stops here. The last completed round is in the checkpoint: continue with "
                    "`fedtune run --resume RUN_DIR`, or raise server.client_timeout")
        self._late = []

    # ------------------------------------------------------------------ the loop

    def run(self, state: RunState | None = None) -> RunState:
        s = self.settings
        state = state or RunState(0, self.strategy.initial_arrays(), [])
        t_run = time.perf_counter()
        for rnd in range(state.round + 1, s.rounds + 1):
            t_round = time.perf_counter()

            # --- configure: the strategy picks clients and what each receives
            plan = self.strategy.configure_fit(rnd, state.global_arrays, self.client_ids)

            # --- fit: each selected client trains from the global arrays. A client that raises,
            # times out, disappears or sends an invalid update is dropped with its reason; a round
            # with fewer than min_clients updates asks its missing clients again (round_retries).
            received: dict[str, tuple[FitRes | None, dict]] = {}
            dropped: list[dict] = []
            # A strategy that can fold results in one at a time gets each accepted update at once,
            # and the engine keeps only its record: server memory stays flat in the number of clients.
            fold = self.strategy.fold(rnd, state.global_arrays) if hasattr(self.strategy, "fold") else None
            for attempt in range(s.round_retries + 1):
                pending = [cid for cid in plan if cid not in received]
                if attempt:
                    log.warning("round %d: %d of %d client update(s), server.min_clients = %d: asking %d client(s) "
                                "again (retry %d of %d)", rnd, len(received), len(plan), s.min_clients,
                                len(pending), attempt, s.round_retries)
                bar = _bar(total=len(pending), desc=f"round {rnd}/{s.rounds}" + (f" retry {attempt}" if attempt else ""),
                           disable=not s.progress)
                for cid in pending:
                    res, record = self._fit_one(rnd, attempt, cid, plan[cid])
                    if res is None:
                        dropped.append(record)
                    else:
                        if fold is not None:
                            fold.add(res)
                            res = None
                        received[cid] = (res, record)
                        bar.set_postfix(loss=f"{record.get('train_loss', float('nan')):.3f}")
                    bar.update(1)
                bar.close()
                if len(received) >= s.min_clients or not pending:
                    break
            self._wait_for_late_calls()  # nothing may still run on shared state while we aggregate and evaluate
            if len(received) < s.min_clients:
                last = {d["id"]: d["reason"] for d in dropped}  # each client's latest reason
                reasons = "; ".join(f"{cid}: {r}" for cid, r in last.items()) or "none selected"
                raise RoundFailed(f"round {rnd}: {len(received)} client update(s) arrived after {attempt + 1} "
                                  f"attempt(s), server.min_clients = {s.min_clients} needed. Dropped: {reasons}")
            clients = [received[cid][1] for cid in plan if cid in received]

            # --- aggregate: the strategy turns client results into the next global arrays
            if fold is not None:  # folded in arrival order: plan order, then each retry's, the same on every run
                new_global, agg_metrics = fold.result()
            else:  # plan order, whatever attempt a reply came in: the same sums in the same order on every run
                results = [received[cid][0] for cid in plan if cid in received]
                new_global, agg_metrics = self.strategy.aggregate_fit(rnd, state.global_arrays, results)

            # --- evaluate the new global arrays
            record = {"round": rnd, "selected": list(plan), "attempts": attempt + 1, "clients": clients,
                      "dropped": dropped, "aggregate": agg_metrics}
            if self.evaluate and (rnd % s.eval_every == 0 or rnd == s.rounds):
                t_eval = time.perf_counter()
                record["eval"] = self.evaluate(rnd, new_global)
                record["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
            record["bytes_down"] = sum(c["bytes_down"] for c in clients)
            record["bytes_up"] = sum(c["bytes_up"] for c in clients)
            record["round_seconds"] = round(time.perf_counter() - t_round, 3)
            record["wall_time"] = round(time.perf_counter() - t_run + _elapsed_before(state), 3)

            state = RunState(rnd, new_global, state.history + [record])
            if self.on_round_end:
                self.on_round_end(rnd, new_global, record)
            if self.run_dir:
                append_metrics(self.run_dir, record)
                save_checkpoint(self.run_dir, state, self.strategy)
        return state


def _json_metrics(metrics) -> dict:
    """A client's metrics as JSON numbers and strings (numpy scalars become Python ones);
    anything else is an invalid reply."""
    if not isinstance(metrics, dict):
        raise UpdateRejected(f"metrics must be a dict, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
            v = v.item()
        if not isinstance(k, str) or not isinstance(v, (bool, int, float, str)):
            raise UpdateRejected(f"metric {k!r} = {v!r}: metrics must be numbers or strings")
        out[k] = v
    return out


def _elapsed_before(state: RunState) -> float:
    return float(state.history[-1]["wall_time"]) if state.history else 0.0


def _bar(**kw):
    from tqdm.auto import tqdm

    return tqdm(leave=False, dynamic_ncols=True, **kw)


# ---------------------------------------------------------------------- metrics and checkpoints


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def save_checkpoint(run_dir: Path, state: RunState, strategy: Strategy) -> None:
    """Write the whole federated state atomically: a fresh folder, then a rename."""
    final = run_dir / "checkpoint"
    tmp = run_dir / f"checkpoint.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "global.safetensors").write_bytes(A.pack(state.global_arrays))
    s_arrays, s_meta = strategy.state()
    (tmp / "strategy.safetensors").write_bytes(A.pack(s_arrays))
    (tmp / "state.json").write_text(json.dumps({"round": state.round, "strategy": s_meta, "history": state.history}))
    for p in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    old = run_dir / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / "checkpoint").is_dir() or (Path(run_dir) / "checkpoint.old").is_dir()


def load_checkpoint(run_dir: Path, strategy: Strategy) -> RunState:
    """Read the last checkpoint of a run folder, restore the strategy's state, and rewrite
    metrics.jsonl to the checkpointed rounds. Raises FedtuneError (naming the file) on a
    missing, unreadable or mismatched checkpoint."""
    run_dir = Path(run_dir)
    for stale in run_dir.glob("checkpoint.tmp*"):  # a crash while writing: never published, never read
        shutil.rmtree(stale, ignore_errors=True)
    ck = run_dir / "checkpoint"
    if not ck.is_dir():
        old = run_dir / "checkpoint.old"  # a crash between the two renames
        if old.is_dir():
            ck = old
        else:
            raise FedtuneError(f"{run_dir}: no checkpoint to resume from (expected {ck})")
    try:
        meta = json.loads((ck / "state.json").read_text(encoding="utf-8"))
        global_arrays = A.unpack((ck / "global.safetensors").read_bytes())
        s_arrays = A.unpack((ck / "strategy.safetensors").read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, UpdateRejected) as e:
        raise FedtuneError(f"{ck}: checkpoint is unreadable: {e}") from None
    rnd = meta.get("round") if isinstance(meta, dict) else None
    history = meta.get("history") if isinstance(meta, dict) else None
    if (not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0 or not isinstance(history, list)
            or [h.get("round") if isinstance(h, dict) else None for h in history] != list(range(1, rnd + 1))):
        raise FedtuneError(f"{ck / 'state.json'}: not a fedtune checkpoint (needs 'round' and one 'history' "
                           "record per completed round)")
    try:
        A.check_update(strategy.initial_arrays(), global_arrays)
    except UpdateRejected as e:
        raise FedtuneError(f"{ck / 'global.safetensors'}: the checkpoint does not fit this run's model and "
                           f"config: {e}") from None
    try:
        strategy.load_state(s_arrays, meta.get("strategy") or {})
    except (KeyError, TypeError, ValueError) as e:
        raise FedtuneError(f"{ck / 'strategy.safetensors'}: cannot restore the server state: {e}") from None
    # metrics.jsonl may hold a round written after the last checkpoint: rewrite it from the checkpoint
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    return RunState(rnd, global_arrays, history)
