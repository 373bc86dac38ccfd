"""Failing clients in the in-process simulator: seeded fault injection and a time limit
per client call.

Fault injection makes client failures testable and repeatable. For every client call the
injector draws, from (fault seed, round, attempt, client id) only, whether the call
fails and how:

- `raise`: the call raises instead of training (a crashed client);
- `timeout`: the call hangs for 1.5 x `client_timeout` and never replies in time (a
  stuck client); needs a time limit (`server.client_timeout > 0`);
- `disappear`: the client trains, but its reply never arrives (a lost connection).

Because a draw depends on nothing else, a resumed run meets exactly the faults the
uninterrupted run met, and a retry of a round draws afresh (its attempt number differs).

The time limit runs the call in a worker thread and stops waiting after `seconds`.
Limitation: a Python thread cannot be killed. The late call keeps running in the
background; its reply is thrown away. The simulator waits for it (up to one more time
limit) before the next client call, because clients in one process may share state
(FedIT's clients share one model); if it is still running then, the run stops with an
error instead of letting two calls train the same model at once. A deployment with one
process per client (NVIDIA FLARE) has no such limitation.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np

KINDS = ("raise", "timeout", "disappear")
HANG_FACTOR = 1.5  # an injected hang lasts this many time limits

T = TypeVar("T")


class InjectedFault(RuntimeError):
    """A client failure injected on purpose by the simulator."""


class ClientTimeout(Exception):
    """A client call gave no reply within its time limit; `thread` is still running."""

    def __init__(self, seconds: float, thread: threading.Thread):
        super().__init__(f"no reply within the time limit of {seconds:g}s (server.client_timeout)")
        self.thread = thread


class ClientDisappeared(Exception):
    """The client's reply never arrived."""


@dataclass(frozen=True)
class FaultInjector:
    probability: float
    seed: int = 0
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault probability must be in [0, 1], got {self.probability}")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be a non-empty subset of {KINDS}, got {list(self.kinds)}")

    @classmethod
    def from_config(cls, faults) -> "FaultInjector | None":
        """The injector a [faults] section asks for (None when probability is 0)."""
        return cls(faults.probability, faults.seed, tuple(faults.kinds)) if faults.probability > 0 else None

    def draw(self, rnd: int, attempt: int, client_id: str) -> str | None:
        """The fault for this call, or None. Depends only on (seed, rnd, attempt, client_id)."""
        if self.probability <= 0:
            return None
        rng = np.random.default_rng([self.seed, rnd, attempt, zlib.crc32(client_id.encode("utf-8"))])
        if rng.random() >= self.probability:
            return None
        return self.kinds[int(rng.integers(len(self.kinds)))]


def injected_call(kind: str | None, call: Callable[[], T], client_timeout: float) -> Callable[[], T]:
    """`call` with the fault `kind` applied (None: unchanged). `disappear` is applied by
    the caller after the call returns: the client did its work, the reply is lost."""
    if kind == "raise":
        def failing() -> T:
            raise InjectedFault("injected fault: the client raised")
        return failing
    if kind == "timeout":
        if client_timeout <= 0:
            raise ValueError("an injected 'timeout' fault needs a time limit (server.client_timeout > 0)")

        def hanging() -> T:
            time.sleep(HANG_FACTOR * client_timeout)
            raise InjectedFault("injected fault: the client hung")
        return hanging
    return call


def call_with_time_limit(call: Callable[[], T], seconds: float, name: str = "client") -> T:
    """Run `call` in a worker thread; return its result, re-raise its exception, or raise
    ClientTimeout after `seconds` (the thread is left running: see the module doc)."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller's thread as it is
            box["error"] = e

    t = threading.Thread(target=target, name=f"fedtune-{name}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise ClientTimeout(seconds, t)
    if "error" in box:
        raise box["error"]
    return box["value"]
