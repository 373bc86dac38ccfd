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


class Strategy(Protocol):
    def initial_arrays(self) -> Arrays: ...

    def configure_fit(self, rnd: int, global_arrays: Arrays, client_ids: list[str]) -> dict[str, FitIns]: ...

    def aggregate_fit(self, rnd: int, global_arrays: Arrays, results: list[FitRes]) -> tuple[Arrays, dict]: ...

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
