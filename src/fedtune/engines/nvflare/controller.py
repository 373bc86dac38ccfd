"""The server side of a FLARE job: the round driver over a FLARE transport.

FLARE only moves arrays. The driver (fedtune.core.driver, the one the embedded simulator
runs) asks the Strategy what each site receives; `FlareTransport` sends every site its
own task (named numpy arrays + the config as JSON) and yields each reply as it arrives; a
site that fails, answers with an error or gives no reply in time is dropped with its
reason, and the driver validates, folds, retries and checkpoints exactly as in the
simulator.

The server never sees data. It writes its results into its job workspace, in the folder
`fedtune/` (downloaded with the job result): metrics.jsonl (one record per round, without
held-out evaluation), rounds/round_NNN.safetensors, global.safetensors, checkpoint/, and
error.txt if the run stopped.
"""

from __future__ import annotations

import json
import math
import queue
import time
import traceback
from pathlib import Path
from typing import Iterator

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from fedtune.core import arrays as A
from fedtune.core import atomic
from fedtune.core import checkpoint as CK
from fedtune.core.checkpoint import RunState
from fedtune.core.driver import DriverSettings, Reply, RoundDriver, RoundFailed
from fedtune.core.strategy import FitIns
from fedtune.engines.nvflare import jobfiles as J
from fedtune.engines.nvflare import wire as W
from fedtune.errors import FedtuneError, UpdateRejected

RESULTS_FOLDER = "fedtune"
TASK = "train"


class FlareTransport:
    """Carries a round's messages as FLARE tasks, one per site, all at once."""

    def __init__(self, controller: "FedtuneController", index: dict[str, int], timeout: int):
        self.c, self.index, self.timeout = controller, index, timeout

    def exchange(self, rnd: int, attempt: int, messages: dict[str, FitIns]) -> Iterator[Reply]:
        inbox: queue.Queue = queue.Queue()
        sent_at, down = {}, {}
        for cid, ins in messages.items():
            data = FLModel(params=dict(ins.arrays), current_round=rnd,
                           meta={W.META_CONFIG: json.dumps(ins.config), W.META_INDEX: self.index[cid],
                                 W.META_ATTEMPT: attempt})
            down[cid] = len(A.pack(ins.arrays))
            sent_at[cid] = time.perf_counter()
            self.c.send_model(task_name=TASK, data=data, targets=[cid], min_responses=1, timeout=self.timeout,
                              callback=lambda reply, cid=cid: inbox.put((cid, reply)) or True)
        waiting = set(messages)
        while waiting:
            try:
                cid, reply = inbox.get(timeout=0.05)
            except queue.Empty:
                if self.c.abort_signal.triggered:
                    raise RoundFailed(f"round {rnd}: the job was aborted")
                if not self.c.get_num_standing_tasks():  # FLARE gave up on the rest (failed, gone, timed out)
                    while not inbox.empty():
                        cid, reply = inbox.get()
                        waiting.discard(cid)
                        yield self._reply(cid, reply, down[cid])
                    for cid in sorted(waiting):
                        late = self.timeout and time.perf_counter() - sent_at[cid] >= self.timeout
                        yield Reply(cid, cause="timeout" if late else "no reply",
                                    reason=(f"timeout: no reply within the time limit of {self.timeout}s "
                                            "(server.client_timeout)") if late else
                                    "no reply: the site failed or disconnected (see the site's FLARE log)")
                    return
                continue
            waiting.discard(cid)
            yield self._reply(cid, reply, down[cid])

    @staticmethod
    def _reply(cid: str, reply: FLModel, bytes_down: int) -> Reply:
        meta = reply.meta or {}
        injected = bool(meta.get(W.META_INJECTED))
        if meta.get(W.META_ERROR):
            return Reply(cid, cause=str(meta.get(W.META_CAUSE) or "error"), reason=str(meta[W.META_ERROR]),
                         injected=injected)
        try:
            res, seconds = W.reply_to_fitres(cid, reply)
        except UpdateRejected as e:
            return Reply(cid, cause="rejected", reason=f"rejected: {e}", injected=injected)
        return Reply(cid, res, bytes_down, len(A.pack(res.arrays)), seconds, injected=injected)

    def settle(self) -> None:
        pass  # each site is a process of its own: nothing shared to wait for


class ServerHooks:
    """What the server keeps of each round: the global arrays, for evaluation elsewhere."""

    def __init__(self, out: Path):
        self.out = out

    def evaluate(self, rnd, arrays):
        return None  # the server holds no data

    def on_round_end(self, rnd, arrays, record):
        atomic.write_bytes(self.out / "rounds" / f"round_{rnd:03d}.safetensors", A.pack(arrays))

    def state(self):
        return {}, {}

    def load_state(self, arrays, meta):
        pass


class FedtuneController(ModelController):
    def __init__(self, results_folder: str = RESULTS_FOLDER):
        # errors are handled here, per site and with reasons: FLARE must not panic on a failed site
        super().__init__(persistor_id="", ignore_result_error=True)
        self.results_folder = results_folder

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
        app_dir = Path(self.engine.get_workspace().get_app_dir(self.fl_ctx.get_job_id()))
        cfg, algorithm, initial = J.read_job_files(app_dir, with_initial=True)
        sites = sorted(c.name for c in self.engine.get_clients())
        strategy = algorithm.strategy(cfg, initial, sites)
        s = cfg.server
        timeout = int(math.ceil(s.client_timeout if s.client_timeout > 0 else cfg.nvflare.task_timeout))
        self.info(f"fedtune: {cfg.run.algorithm} · {cfg.run.rounds} rounds · sites {sites} · results in {out}")
        atomic.write_text(out / "sites.json", json.dumps({"sites": sites}))
        state = None
        resume = app_dir / "custom" / J.RESUME_FOLDER
        if resume.is_dir():  # continue a run from the checkpoint the job carries
            meta, global_arrays, s_arrays, _ = CK.read(resume.parent, folder=J.RESUME_FOLDER)
            strategy.load_state(s_arrays, meta.get("strategy") or {})
            state = RunState(meta["round"], global_arrays, meta["history"])
            for rec in meta["history"]:
                CK.append_metrics(out, rec)
            self.info(f"fedtune: resuming after round {state.round}")
        settings = DriverSettings.from_config(cfg, "nvflare")
        settings.progress = False
        driver = RoundDriver(strategy, FlareTransport(self, {cid: i for i, cid in enumerate(sites)}, timeout), sites,
                             settings, hooks=ServerHooks(out), run_dir=out)
        state = driver.run(state)
        atomic.write_bytes(out / "global.safetensors", A.pack(state.global_arrays))
        atomic.write_text(out / "done.json", json.dumps({"rounds": state.round}))
