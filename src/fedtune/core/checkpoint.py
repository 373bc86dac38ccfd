"""Checkpoints and metrics of a run folder.

A checkpoint holds everything a resumed run needs, and nothing is unpickled: the global
arrays, the strategy's state and the algorithm's own driver-side state (best-by-dev
prompt, say) as safetensors, and the round, the history and the JSON parts of both
states in state.json. It is published with `core.atomic.publish_dir`, so a crash at any
step leaves the previous or the new checkpoint readable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.core import arrays as A
from fedtune.core import atomic
from fedtune.errors import FedtuneError, UpdateRejected

FOLDER = "checkpoint"


@dataclass
class RunState:
    """Everything needed to continue a run after the last completed round."""

    round: int = 0
    global_arrays: A.Arrays = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one metrics record per completed round


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def save(run_dir: Path, state, strategy, hooks=None) -> None:
    """Write the whole federated state (see the module doc)."""
    s_arrays, s_meta = strategy.state()
    h_arrays, h_meta = hooks.state() if hooks is not None and hasattr(hooks, "state") else ({}, {})

    def fill(tmp: Path) -> None:
        (tmp / "global.safetensors").write_bytes(A.pack(state.global_arrays))
        (tmp / "strategy.safetensors").write_bytes(A.pack(s_arrays))
        (tmp / "algorithm.safetensors").write_bytes(A.pack(h_arrays))
        (tmp / "state.json").write_text(json.dumps({"round": state.round, "strategy": s_meta, "algorithm": h_meta,
                                                    "history": state.history}), encoding="utf-8")

    atomic.publish_dir(Path(run_dir) / FOLDER, fill)


def exists(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / FOLDER).is_dir() or (run_dir / f"{FOLDER}.old").is_dir()


def read(run_dir: Path, folder: str = FOLDER) -> tuple[dict, A.Arrays, A.Arrays, A.Arrays]:
    """(state.json, global arrays, strategy arrays, algorithm arrays) of the last checkpoint,
    after recovering from a crash mid-save. FedtuneError naming the file otherwise."""
    run_dir = Path(run_dir)
    ck = run_dir / folder
    atomic.recover_dir(ck)
    if not ck.is_dir():
        raise FedtuneError(f"{run_dir}: no checkpoint to resume from (expected {ck})")
    try:
        meta = json.loads((ck / "state.json").read_text(encoding="utf-8"))
        global_arrays = A.unpack((ck / "global.safetensors").read_bytes())
        s_arrays = A.unpack((ck / "strategy.safetensors").read_bytes())
        h_path = ck / "algorithm.safetensors"
        h_arrays = A.unpack(h_path.read_bytes()) if h_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, UpdateRejected) as e:
        raise FedtuneError(f"{ck}: checkpoint is unreadable: {e}") from None
    rnd = meta.get("round") if isinstance(meta, dict) else None
    history = meta.get("history") if isinstance(meta, dict) else None
    if (not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0 or not isinstance(history, list)
            or [h.get("round") if isinstance(h, dict) else None for h in history] != list(range(1, rnd + 1))):
        raise FedtuneError(f"{ck / 'state.json'}: not a fedtune checkpoint (needs 'round' and one 'history' "
                           "record per completed round)")
    return meta, global_arrays, s_arrays, h_arrays


def load(run_dir: Path, strategy, hooks=None) -> RunState:
    """Restore strategy (and hooks) from the last checkpoint and rewrite metrics.jsonl to the
    checkpointed rounds."""
    run_dir = Path(run_dir)
    meta, global_arrays, s_arrays, h_arrays = read(run_dir)
    ck = run_dir / FOLDER
    try:
        A.check_update(strategy.initial_arrays(), global_arrays)
    except UpdateRejected as e:
        raise FedtuneError(f"{ck / 'global.safetensors'}: the checkpoint does not fit this run's model and "
                           f"config: {e}") from None
    try:
        strategy.load_state(s_arrays, meta.get("strategy") or {})
        if hooks is not None and hasattr(hooks, "load_state"):
            hooks.load_state(h_arrays, meta.get("algorithm") or {})
    except (KeyError, TypeError, ValueError) as e:
        raise FedtuneError(f"{ck}: cannot restore the run's state: {e}") from None
    history = meta["history"]
    # metrics.jsonl may hold a round written after the last checkpoint: rewrite it from the checkpoint
    atomic.write_text(run_dir / "metrics.jsonl", "".join(json.dumps(rec) + "\n" for rec in history))
    return RunState(meta["round"], global_arrays, history)
