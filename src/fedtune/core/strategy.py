"""The contracts between algorithms and engines.

A `Strategy` is the server's algorithm: it picks clients and says what each gets
(`configure_fit`), and turns client results into the next global arrays
(`aggregate_fit`). A `ClientApp` is the client's algorithm: arrays and a config in,
arrays, an example count and metrics out. Engines (the in-process simulator, NVIDIA
FLARE) only move these values; all of them carry named numpy arrays and JSON-able dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fedtune.core.arrays import Arrays, check_update
from fedtune.core.selection import select_clients
from fedtune.errors import UpdateRejected


@dataclass
class FitIns:
    arrays: Arrays
    config: dict = field(default_factory=dict)  # JSON-able: round number, seeds, hyper-parameters


@dataclass
class FitRes:
    client_id: str
    arrays: Arrays
    num_examples: int
    metrics: dict = field(default_factory=dict)  # JSON-able numbers


class Aggregator(Protocol):
    """One round's aggregation, fed one accepted result at a time (the driver keeps no update).

    A protocol with more than one message exchange per round (secure aggregation, say)
    returns the next messages from `next_exchange` (None when done); their replies come back
    through `add_reply`, and a client lost in that phase through `lost`."""

    def add(self, res: FitRes) -> None: ...

    def next_exchange(self, accepted: list[str]) -> dict[str, "FitIns"] | None: ...

    def add_reply(self, phase: int, res: FitRes) -> None: ...

    def lost(self, phase: int, client_id: str, reason: str) -> None: ...

    def result(self) -> tuple[Arrays, dict]: ...


class Strategy(Protocol):
    def initial_arrays(self) -> Arrays: ...

    def configure_fit(self, rnd: int, global_arrays: Arrays, client_ids: list[str]) -> dict[str, FitIns]: ...

    def aggregate_fit(self, rnd: int, global_arrays: Arrays, results: list[FitRes]) -> tuple[Arrays, dict]: ...

    def aggregator(self, rnd: int, global_arrays: Arrays) -> Aggregator:
        """This round's aggregation, one result at a time (SelectingStrategy: collect, then aggregate_fit)."""
        ...

    def check_reply(self, ins: FitIns, res: FitRes) -> None:
        """Raise UpdateRejected (with the reason) if a client's reply must not be aggregated."""
        ...

    def state(self) -> tuple[Arrays, dict]:
        """Everything the strategy carries across rounds, as arrays + JSON (for checkpoints)."""
        ...

    def load_state(self, arrays: Arrays, meta: dict) -> None: ...


class ClientApp(Protocol):
    def fit(self, client_id: str, ins: FitIns) -> FitRes: ...


class SelectingStrategy:
    """Shared client selection: a fraction or a count of clients, seeded per round."""

    def __init__(self, seed: int, fraction: float = 1.0, clients_per_round: int = 0, max_update_norm: float = 0.0):
        self.seed = seed
        self.fraction = fraction
        self.clients_per_round = clients_per_round
        self.max_update_norm = max_update_norm

    def check_reply(self, ins: FitIns, res: FitRes) -> None:
        """By default a reply must have the keys, shapes and dtypes of what was sent, be
        finite, and lie within max_update_norm of it (when that bound is set)."""
        if res.num_examples <= 0:
            raise UpdateRejected(f"num_examples = {res.num_examples}")
        check_update(ins.arrays, res.arrays, self.max_update_norm)

    def select(self, rnd: int, client_ids: list[str]) -> list[str]:
        return select_clients(client_ids, rnd, self.seed, self.fraction, self.clients_per_round)

    def aggregator(self, rnd: int, global_arrays: Arrays) -> Aggregator:
        return CollectingAggregator(self, rnd, global_arrays)


class OneExchange:
    """The parts of an Aggregator for a round with a single message exchange."""

    def next_exchange(self, accepted: list[str]) -> dict[str, FitIns] | None:
        return None

    def add_reply(self, phase: int, res: FitRes) -> None:
        raise UpdateRejected(f"unexpected reply in exchange {phase}: this round has one exchange")

    def lost(self, phase: int, client_id: str, reason: str) -> None:
        pass


class CollectingAggregator(OneExchange):
    """Keeps every accepted result, then calls the strategy's aggregate_fit (rules that need
    all updates at once: median, trimmed mean, FedBPT's server step)."""

    def __init__(self, strategy, rnd: int, global_arrays: Arrays):
        self.strategy, self.rnd, self.global_arrays = strategy, rnd, global_arrays
        self.results: list[FitRes] = []

    def add(self, res: FitRes) -> None:
        self.results.append(res)

    def result(self) -> tuple[Arrays, dict]:
        return self.strategy.aggregate_fit(self.rnd, self.global_arrays, self.results)


def aggregator_for(strategy, rnd: int, global_arrays: Arrays) -> Aggregator:
    if hasattr(strategy, "aggregator"):
        return strategy.aggregator(rnd, global_arrays)
    return CollectingAggregator(strategy, rnd, global_arrays)


def check_metrics(metrics) -> dict:
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
