"""The embedded in-process engine.

It drives a Strategy and a ClientApp round by round in one process. Payloads go through
the same wire format a real deployment uses (safetensors bytes), so byte counts are real
and no client can alias the server's arrays. The engine holds no algorithm logic.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fedtune.core import arrays as A
from fedtune.core.strategy import ClientApp, FitIns, FitRes, Strategy
from fedtune.errors import FedtuneError, UpdateRejected

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


@dataclass
class RunState:
    """Everything needed to continue a run after the last completed round."""

    round: int = 0
    global_arrays: A.Arrays = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one metrics record per completed round


class Simulator:
    def __init__(self, strategy: Strategy, client_app: ClientApp, client_ids: list[str], settings: SimulatorSettings,
                 *, evaluate: EvaluateFn | None = None, on_round_end: RoundHook | None = None,
                 run_dir: str | Path | None = None):
        if not client_ids:
            raise ValueError("no clients")
        self.strategy = strategy
        self.client_app = client_app
        self.client_ids = list(client_ids)
        self.settings = settings
        self.evaluate = evaluate
        self.on_round_end = on_round_end
        self.run_dir = Path(run_dir) if run_dir else None

    # ------------------------------------------------------------------ one client call

    def _call_client(self, cid: str, ins: FitIns) -> tuple[FitRes, int, int, float]:
        down = A.pack(ins.arrays)
        t0 = time.perf_counter()
        res = self.client_app.fit(cid, FitIns(A.unpack(down), dict(ins.config)))
        seconds = time.perf_counter() - t0
        up = A.pack(res.arrays)
        res = FitRes(cid, A.unpack(up), int(res.num_examples), dict(res.metrics))
        return res, len(down), len(up), seconds

    # ------------------------------------------------------------------ the loop

    def run(self, state: RunState | None = None) -> RunState:
        s = self.settings
        state = state or RunState(0, self.strategy.initial_arrays(), [])
        t_run = time.perf_counter()
        for rnd in range(state.round + 1, s.rounds + 1):
            t_round = time.perf_counter()

            # --- configure: the strategy picks clients and what each receives
            plan = self.strategy.configure_fit(rnd, state.global_arrays, self.client_ids)

            # --- fit: each selected client trains from the global arrays
            results, clients, dropped = [], [], []
            bar = _bar(total=len(plan), desc=f"round {rnd}/{s.rounds}", disable=not s.progress)
            for cid, ins in plan.items():
                try:
                    res, b_down, b_up, seconds = self._call_client(cid, ins)
                    self.strategy.check_reply(ins, res)  # raises UpdateRejected with the reason
                except UpdateRejected as e:
                    dropped.append({"id": cid, "reason": f"rejected: {e}"})
                except FedtuneError:
                    raise
                except Exception as e:  # a client that raises is left out of the round, with its reason
                    dropped.append({"id": cid, "reason": f"{type(e).__name__}: {e}",
                                    "traceback": traceback.format_exc(limit=3)})
                else:
                    results.append(res)
                    clients.append({"id": cid, "examples": res.num_examples, "bytes_down": b_down, "bytes_up": b_up,
                                    "seconds": round(seconds, 4), **res.metrics})
                bar.update(1)
                if clients:
                    bar.set_postfix(loss=f"{clients[-1].get('train_loss', float('nan')):.3f}")
            bar.close()
            if len(results) < s.min_clients:
                reasons = "; ".join(f"{d['id']}: {d['reason']}" for d in dropped) or "none selected"
                raise RoundFailed(f"round {rnd}: {len(results)} client update(s) arrived, "
                                  f"server.min_clients = {s.min_clients} needed. Dropped: {reasons}")

            # --- aggregate: the strategy turns client results into the next global arrays
            new_global, agg_metrics = self.strategy.aggregate_fit(rnd, state.global_arrays, results)

            # --- evaluate the new global arrays
            record = {"round": rnd, "selected": list(plan), "clients": clients, "dropped": dropped,
                      "aggregate": agg_metrics}
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
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, strategy: Strategy) -> RunState:
    ck = run_dir / "checkpoint"
    if not ck.is_dir():
        old = run_dir / "checkpoint.old"  # a crash between the two renames
        if old.is_dir():
            ck = old
        else:
            raise FedtuneError(f"{run_dir}: no checkpoint to resume from (expected {ck})")
    try:
        meta = json.loads((ck / "state.json").read_text())
        global_arrays = A.unpack((ck / "global.safetensors").read_bytes())
        s_arrays = A.unpack((ck / "strategy.safetensors").read_bytes())
    except (OSError, json.JSONDecodeError, UpdateRejected) as e:
        raise FedtuneError(f"{ck}: checkpoint is unreadable: {e}") from None
    strategy.load_state(s_arrays, meta.get("strategy", {}))
    history = meta["history"]
    # metrics.jsonl may hold a round written after the last checkpoint: rewrite it from the checkpoint
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for rec in history:
            f.write(json.dumps(rec) + "\n")
    return RunState(int(meta["round"]), global_arrays, history)
