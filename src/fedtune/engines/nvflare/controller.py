"""The server side of a FLARE job: a ModelController that drives fedtune's Strategy.

FLARE only moves arrays. Each round the controller asks the Strategy which sites take
part and what each receives (`configure_fit`), sends every selected site its own task
(named numpy arrays + the config as JSON), validates each reply with
`strategy.check_reply`, and hands the accepted replies to `strategy.aggregate_fit`: the
same FedAvg / CMA-ES server step the embedded simulator runs. A site that fails, answers
with an error, times out or sends an invalid update is dropped from the round with its
reason; a round with fewer than server.min_clients updates asks its missing sites again
(server.round_retries) and then stops the job with an error that names every site's reason.

The server never sees data. It writes its results into its job workspace, in the folder
`fedtune/` (downloaded with the job result): metrics.jsonl (one record per round, as the
embedded simulator writes it, without held-out evaluation), rounds/round_NNN.safetensors,
global.safetensors, checkpoint/, and error.txt if the run stopped.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from pathlib import Path

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from fedtune.core import arrays as A
from fedtune.core.strategy import FitIns, FitRes
from fedtune.engines.nvflare import site as S
from fedtune.engines.simulator import RoundFailed, RunState, append_metrics, save_checkpoint
from fedtune.errors import FedtuneError, UpdateRejected

RESULTS_FOLDER = "fedtune"
TASK = "train"


def _json_metrics(raw) -> dict:
    metrics = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(metrics, dict):
        raise UpdateRejected(f"metrics must be a JSON object, got {type(metrics).__name__}")
    for k, v in metrics.items():
        if not isinstance(v, (bool, int, float, str)):
            raise UpdateRejected(f"metric {k!r} = {v!r}: metrics must be numbers or strings")
    return metrics


def reply_to_fitres(cid: str, reply: FLModel) -> tuple[FitRes, float]:
    """A site's reply as a FitRes (plain arrays, a count, JSON numbers); UpdateRejected
    (or the site's own error) otherwise."""
    meta = reply.meta or {}
    if meta.get(S.META_ERROR):
        raise RuntimeError(str(meta[S.META_ERROR]))
    try:
        arrays = S._plain_arrays(reply.params or {})
    except TypeError as e:
        raise UpdateRejected(str(e)) from None
    examples = meta.get(S.META_EXAMPLES)
    if isinstance(examples, bool) or not isinstance(examples, (int, np.integer)):
        raise UpdateRejected(f"num_examples must be an integer, got {examples!r}")
    try:
        metrics = _json_metrics(meta.get(S.META_METRICS, "{}"))
    except json.JSONDecodeError as e:
        raise UpdateRejected(f"metrics are not JSON: {e}") from None
    seconds = meta.get(S.META_SECONDS, 0.0)
    return FitRes(cid, arrays, int(examples), metrics), float(seconds) if isinstance(seconds, (int, float)) else 0.0


class FedtuneController(ModelController):
    def __init__(self, results_folder: str = RESULTS_FOLDER):
        # errors are handled here, per site and with reasons: FLARE must not panic on a failed site
        super().__init__(persistor_id="", ignore_result_error=True)
        self.results_folder = results_folder

    # ------------------------------------------------------------------ one round trip

    def _ask(self, rnd: int, plan: dict[str, FitIns], index: dict[str, int], timeout: int) -> dict:
        """Send every site its own task at once; wait for all of them. Returns {site: FLModel}
        for the sites that replied (a site FLARE reports as failed or timed out is absent)."""
        replies: dict[str, FLModel] = {}
        for cid, ins in plan.items():
            data = FLModel(params=dict(ins.arrays), current_round=rnd,
                           meta={S.META_CONFIG: json.dumps(ins.config), S.META_INDEX: index[cid]})

            def on_reply(reply: FLModel, cid=cid) -> bool:
                replies[cid] = reply
                return True

            self.send_model(task_name=TASK, data=data, targets=[cid], min_responses=1, timeout=timeout,
                            callback=on_reply)
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                raise RoundFailed(f"round {rnd}: the job was aborted")
            time.sleep(0.05)
        return replies

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        out = Path(self.engine.get_workspace().get_run_dir(self.fl_ctx.get_job_id())) / self.results_folder
        out.mkdir(parents=True, exist_ok=True)
        try:
            self._run(out)
        except FedtuneError as e:
            (out / "error.txt").write_text(str(e) + "\n", encoding="utf-8")
            self.error(f"fedtune: {e}")
            self.panic(f"fedtune: {e}")
        except Exception as e:
            (out / "error.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}", encoding="utf-8")
            raise

    def _run(self, out: Path) -> None:
        from fedtune.engines.nvflare.job import read_job_files

        app_dir = Path(self.engine.get_workspace().get_app_dir(self.fl_ctx.get_job_id()))
        cfg, algorithm, initial = read_job_files(app_dir, with_initial=True)
        sites = sorted(c.name for c in self.engine.get_clients())
        strategy = algorithm.strategy(cfg, initial, sites)
        index = {cid: i for i, cid in enumerate(sites)}
        s = cfg.server
        timeout = int(math.ceil(s.client_timeout)) if s.client_timeout > 0 else 0
        self.info(f"fedtune: {cfg.run.algorithm} · {cfg.run.rounds} rounds · sites {sites} · results in {out}")
        (out / "sites.json").write_text(json.dumps({"sites": sites}), encoding="utf-8")

        state = RunState(0, strategy.initial_arrays(), [])
        t_run = time.perf_counter()
        for rnd in range(1, cfg.run.rounds + 1):
            t_round = time.perf_counter()
            plan = strategy.configure_fit(rnd, state.global_arrays, sites)
            received: dict[str, tuple[FitRes, dict]] = {}
            dropped: list[dict] = []
            for attempt in range(s.round_retries + 1):
                pending = {cid: plan[cid] for cid in plan if cid not in received}
                if attempt:
                    self.warning(f"round {rnd}: {len(received)} of {len(plan)} update(s), server.min_clients = "
                                 f"{s.min_clients}: asking {len(pending)} site(s) again (retry {attempt})")
                replies = self._ask(rnd, pending, index, timeout)
                for cid, ins in pending.items():
                    drop = {"id": cid, "attempt": attempt + 1}  # attempts count from 1, as in the simulator
                    reply = replies.get(cid)
                    if reply is None:
                        drop.update(cause="no reply", reason="no reply: the site failed, disconnected or timed out "
                                                             "(see the site's FLARE log)")
                        dropped.append(drop)
                        continue
                    try:
                        res, seconds = reply_to_fitres(cid, reply)
                        strategy.check_reply(ins, res)
                    except UpdateRejected as e:
                        drop.update(cause="rejected", reason=f"rejected: {e}")
                    except RuntimeError as e:
                        drop.update(cause="error", reason=str(e))
                    else:
                        record = {"id": cid, "attempt": attempt + 1, "examples": res.num_examples,
                                  "bytes_down": len(A.pack(ins.arrays)), "bytes_up": len(A.pack(res.arrays)),
                                  "seconds": round(seconds, 4)}
                        record.update({k: v for k, v in res.metrics.items() if k not in record})
                        received[cid] = (res, record)
                        continue
                    self.warning(f"round {rnd}: site {cid} dropped: {drop['reason']}")
                    dropped.append(drop)
                if len(received) >= s.min_clients or not pending:
                    break
            if len(received) < s.min_clients:
                last = {d["id"]: d["reason"] for d in dropped}
                reasons = "; ".join(f"{cid}: {r}" for cid, r in last.items()) or "none selected"
                raise RoundFailed(f"round {rnd}: {len(received)} site update(s) arrived after {attempt + 1} "
                                  f"attempt(s), server.min_clients = {s.min_clients} needed. Dropped: {reasons}")
            results = [received[cid][0] for cid in plan if cid in received]  # plan order: the same sums every run
            clients = [received[cid][1] for cid in plan if cid in received]
            new_global, agg_metrics = strategy.aggregate_fit(rnd, state.global_arrays, results)
            record = {"round": rnd, "selected": list(plan), "attempts": attempt + 1, "clients": clients,
                      "dropped": dropped, "aggregate": agg_metrics,
                      "bytes_down": sum(c["bytes_down"] for c in clients),
                      "bytes_up": sum(c["bytes_up"] for c in clients),
                      "round_seconds": round(time.perf_counter() - t_round, 3),
                      "wall_time": round(time.perf_counter() - t_run, 3)}
            state = RunState(rnd, new_global, state.history + [record])
            (out / "rounds").mkdir(exist_ok=True)
            (out / "rounds" / f"round_{rnd:03d}.safetensors").write_bytes(A.pack(new_global))
            append_metrics(out, record)
            save_checkpoint(out, state, strategy)
            self.info(f"fedtune: round {rnd} done: {len(results)} update(s), {len(dropped)} dropped")
        (out / "global.safetensors").write_bytes(A.pack(state.global_arrays))
        (out / "done.json").write_text(json.dumps({"rounds": state.round}), encoding="utf-8")
