"""The one round driver: every algorithm, every engine.

A round reads top to bottom: configure (the Strategy picks clients and what each gets),
fit (the Transport carries each message and brings back replies; a reply that fails,
times out, vanishes or is rejected drops its client with the reason; a round below
`min_clients` asks its missing clients again), further exchanges (protocols with more
than one message exchange per round ask for them through their Aggregator), aggregate,
evaluate, record, checkpoint.

An engine supplies only a `Transport`: the embedded simulator calls client apps in this
process; NVIDIA FLARE sends FLARE messages to sites. Nothing here knows which.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from fedtune.core import arrays as A
from fedtune.core import checkpoint as CK
from fedtune.core.checkpoint import RunState
from fedtune.core.strategy import FitIns, FitRes, Strategy, aggregator_for, check_metrics
from fedtune.errors import FedtuneError, UpdateRejected

log = logging.getLogger("fedtune.driver")

OUTLIER_FACTOR = 10  # a claimed example count over this many times the round's median is flagged


class RoundFailed(FedtuneError):
    pass


@dataclass
class Reply:
    """What came back for one message: a result, or the cause and reason it did not."""

    client_id: str
    res: FitRes | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
    cause: str = ""  # "", or: error, timeout, disappeared, no reply
    reason: str = ""
    injected: bool = False  # the failure was injected on purpose ([faults])
    traceback: str = ""


class Transport(Protocol):
    def exchange(self, rnd: int, attempt: int, messages: dict[str, FitIns]) -> Iterable[Reply]:
        """Deliver each message to its client; yield one Reply per message as it arrives."""
        ...

    def settle(self) -> None:
        """Return once nothing a transport started may still touch shared client state."""
        ...


class RoundHooks(Protocol):
    """What an algorithm does around the rounds on the driver's side (all optional)."""

    def evaluate(self, rnd: int, arrays: A.Arrays) -> dict: ...

    def on_round_end(self, rnd: int, arrays: A.Arrays, record: dict) -> None: ...

    def state(self) -> tuple[A.Arrays, dict]: ...

    def load_state(self, arrays: A.Arrays, meta: dict) -> None: ...


@dataclass
class DriverSettings:
    rounds: int
    min_clients: int = 1
    eval_every: int = 1
    round_retries: int = 2
    progress: bool = True
    max_examples: int = 0  # cap on a client's claimed example count (0 = no cap)
    known_sizes: dict[str, int] | None = None  # example counts the server knows; a different claim is rejected
    engine: str = ""  # recorded in every metrics line

    @classmethod
    def from_config(cls, cfg, engine: str, known_sizes: dict[str, int] | None = None) -> "DriverSettings":
        s = cfg.server
        return cls(rounds=cfg.run.rounds, min_clients=s.min_clients, eval_every=cfg.run.eval_every,
                   round_retries=s.round_retries, progress=cfg.run.progress, max_examples=s.max_examples,
                   known_sizes=known_sizes, engine=engine)


class RoundDriver:
    def __init__(self, strategy: Strategy, transport: Transport, client_ids: list[str], settings: DriverSettings, *,
                 hooks: RoundHooks | None = None, run_dir: str | Path | None = None):
        if not client_ids:
            raise ValueError("no clients")
        self.strategy = strategy
        self.transport = transport
        self.client_ids = list(client_ids)
        self.s = settings
        self.hooks = hooks
        self.run_dir = Path(run_dir) if run_dir else None

    # ------------------------------------------------------------------ weights the server trusts

    def _weigh(self, res: FitRes) -> dict:
        """Apply the server's rule for a client's weight; returns what to record. A client
        cannot choose its own weight: a count the server knows wins (a different claim is
        rejected), else the claim is capped at server.max_examples."""
        claimed = res.num_examples
        if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed <= 0:
            raise UpdateRejected(f"num_examples = {claimed!r}: must be a positive integer")
        known = (self.s.known_sizes or {}).get(res.client_id)
        if known is not None and claimed != known:
            raise UpdateRejected(f"claims {claimed} examples; the server knows {known}")
        if self.s.max_examples and claimed > self.s.max_examples:
            res.num_examples = self.s.max_examples
            return {"examples_claimed": claimed, "capped": True}
        return {}

    # ------------------------------------------------------------------ one exchange with drops

    def _collect(self, rnd: int, attempt: int, messages: dict[str, FitIns], accept, weigh: bool = True
                 ) -> tuple[dict, list]:
        """Send messages; for each reply call accept(ins, res) (raises UpdateRejected to drop).
        Returns ({client: record} accepted, [drop records])."""
        accepted, dropped = {}, []
        bar = _bar(len(messages), f"round {rnd}/{self.s.rounds}" + (f" retry {attempt}" if attempt else ""),
                   not self.s.progress)
        for reply in self.transport.exchange(rnd, attempt, messages):
            cid = reply.client_id
            drop = {"id": cid, "attempt": attempt + 1, "injected": reply.injected}  # attempts count from 1
            if reply.res is None:
                drop.update(cause=reply.cause or "error", reason=reply.reason or "no reason given")
                if reply.traceback:
                    drop["traceback"] = reply.traceback
            else:
                try:
                    res = FitRes(cid, reply.res.arrays, reply.res.num_examples, check_metrics(reply.res.metrics))
                    extra = self._weigh(res) if weigh else {}
                    accept(messages[cid], res)
                except UpdateRejected as e:
                    drop.update(cause="rejected", reason=f"rejected: {e}")
                else:
                    record = {"id": cid, "attempt": attempt + 1, "examples": res.num_examples,
                              "bytes_down": reply.bytes_down, "bytes_up": reply.bytes_up,
                              "seconds": round(reply.seconds, 4), **extra}
                    record.update({k: v for k, v in res.metrics.items() if k not in record})
                    accepted[cid] = record
                    bar.set_postfix(loss=f"{record.get('train_loss', float('nan')):.3f}")
                    bar.update(1)
                    continue
            log.warning("round %d: client %s dropped (attempt %d): %s", rnd, cid, attempt + 1, drop["reason"])
            dropped.append(drop)
            bar.update(1)
        bar.close()
        return accepted, dropped

    # ------------------------------------------------------------------ the loop

    def run(self, state: RunState | None = None) -> RunState:
        s = self.s
        state = state or RunState(0, self.strategy.initial_arrays(), [])
        t_run = time.perf_counter()
        for rnd in range(state.round + 1, s.rounds + 1):
            t_round = time.perf_counter()

            # --- configure: the strategy picks clients and what each receives
            plan = self.strategy.configure_fit(rnd, state.global_arrays, self.client_ids)
            agg = aggregator_for(self.strategy, rnd, state.global_arrays)

            # --- fit: each accepted update is folded in at once; the driver keeps only its record
            def accept(ins: FitIns, res: FitRes) -> None:
                self.strategy.check_reply(ins, res)  # raises UpdateRejected with the reason
                agg.add(res)

            clients: dict[str, dict] = {}
            dropped: list[dict] = []
            for attempt in range(s.round_retries + 1):
                pending = {cid: plan[cid] for cid in plan if cid not in clients}
                if attempt:
                    log.warning("round %d: %d of %d client update(s), server.min_clients = %d: asking %d client(s) "
                                "again (retry %d of %d)", rnd, len(clients), len(plan), s.min_clients,
                                len(pending), attempt, s.round_retries)
                got, lost = self._collect(rnd, attempt, pending, accept)
                clients.update(got)
                dropped += lost
                if len(clients) >= s.min_clients or not pending:
                    break
            self.transport.settle()  # nothing may still run on shared state while we aggregate and evaluate
            if len(clients) < s.min_clients:
                last = {d["id"]: d["reason"] for d in dropped}  # each client's latest reason
                reasons = "; ".join(f"{cid}: {r}" for cid, r in last.items()) or "none selected"
                raise RoundFailed(f"round {rnd}: {len(clients)} client update(s) arrived after {attempt + 1} "
                                  f"attempt(s), server.min_clients = {s.min_clients} needed. Dropped: {reasons}")

            # --- further exchanges: protocols with more than one message exchange per round
            phase = 1
            while (more := agg.next_exchange(sorted(clients))):
                got, lost = self._collect(rnd, 0, more, lambda ins, res, p=phase: agg.add_reply(p, res), weigh=False)
                for cid, rec in got.items():  # a client's bytes over every exchange of the round
                    if cid in clients:
                        clients[cid]["bytes_down"] += rec["bytes_down"]
                        clients[cid]["bytes_up"] += rec["bytes_up"]
                for d in lost:
                    d["phase"] = phase
                    agg.lost(phase, d["id"], d["reason"])
                dropped += lost
                phase += 1
            self.transport.settle()

            # --- aggregate: the strategy turns client results into the next global arrays
            new_global, agg_metrics = agg.result()
            order = [cid for cid in plan if cid in clients]  # plan order in the record, whatever the arrival order
            record = {"round": rnd, "selected": list(plan), "attempts": attempt + 1,
                      "clients": [clients[cid] for cid in order], "dropped": dropped, "aggregate": agg_metrics}
            if phase > 1:
                record["exchanges"] = phase
            outliers = _weight_outliers(record["clients"])
            if outliers:
                record["weight_outliers"] = outliers
                log.warning("round %d: example counts far above the round's median: %s", rnd, outliers)
            if s.engine:
                record["engine"] = s.engine

            # --- evaluate the new global arrays
            if self.hooks and (rnd % s.eval_every == 0 or rnd == s.rounds):
                t_eval = time.perf_counter()
                ev = self.hooks.evaluate(rnd, new_global)
                if ev is not None:
                    record["eval"] = ev
                    record["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
            record["bytes_down"] = sum(c["bytes_down"] for c in record["clients"])
            record["bytes_up"] = sum(c["bytes_up"] for c in record["clients"])
            record["round_seconds"] = round(time.perf_counter() - t_round, 3)
            record["wall_time"] = round(time.perf_counter() - t_run + _elapsed_before(state), 3)

            # --- record and checkpoint
            state = RunState(rnd, new_global, state.history + [record])
            if self.hooks:
                self.hooks.on_round_end(rnd, new_global, record)
            if self.run_dir:
                CK.append_metrics(self.run_dir, record)
                CK.save(self.run_dir, state, self.strategy, self.hooks)
        return state


def _weight_outliers(clients: list[dict]) -> list[str]:
    if len(clients) < 3:
        return []
    med = statistics.median(c.get("examples_claimed", c["examples"]) for c in clients)
    return [c["id"] for c in clients if c.get("examples_claimed", c["examples"]) > OUTLIER_FACTOR * med]


def _elapsed_before(state: RunState) -> float:
    return float(state.history[-1]["wall_time"]) if state.history else 0.0


def _bar(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=disable)
