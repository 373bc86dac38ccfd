"""Which config keys a resumed run may change (`fedtune run --resume RUN_DIR --set ...`)."""

from __future__ import annotations

from fedtune.config import Config, apply_override, from_dict
from fedtune.errors import ConfigError

# Keys a resumed run may change: how far it goes, how it reports, how patient it is. Any other
# key (the seed, the data and its partition, the model, the algorithm, the aggregation) would
# mix two runs in one, and is refused by name.
RESUMABLE = ("run.rounds", "run.progress", "run.eval_every", "run.save_every_round", "eval.*", "judge.*",
             "server.client_timeout", "server.round_retries", "server.min_clients", "faults.*",
             "nvflare.threads", "nvflare.launch_timeout", "nvflare.task_timeout", "nvflare.python",
             "nvflare.workspace")


# Keys a resumed comparison (`fedtune compare --resume DIR`) may change: variants that finished
# are read back as they are, so only what they do not depend on: which variants and algorithms
# the comparison holds, the judge and the progress bars.
COMPARE_RESUMABLE = ("run.progress", "judge.*", "compare.variants", "compare.algorithms", "compare.local_clients")


def _resumable(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == r or (r.endswith(".*") and key.startswith(r[:-1])) for r in allowed)


def for_resume(saved: Config, overrides: list[str], source: str, allowed: tuple[str, ...] = RESUMABLE) -> Config:
    """The saved config of a run with `--set` overrides for its resumption; ConfigError naming
    every key that may not change on resume (`allowed`: the keys that may)."""
    raw = saved.to_dict()
    for item in overrides:
        apply_override(raw, item)
    merged = from_dict(raw, f"{source} with --set")
    changed = changed_keys(saved.to_dict(), merged.to_dict())
    refused = [k for k in changed if not _resumable(k, allowed)]
    if "run.rounds" in changed and merged.train.schedule_span == "run":  # the schedule's length is the run's
        refused.append("run.rounds (with train.schedule_span = 'run', the rounds already trained followed a "
                       "schedule of the old length)")
    if refused:
        raise ConfigError(f"--resume: {', '.join(refused)} cannot change in a resumed run (it would mix two runs); "
                          f"keys that may change: {', '.join(allowed)}. Start a new run instead")
    return merged


def changed_keys(before: dict, after: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """`section.key` of every value that differs between two raw configs (sections in `skip` aside)."""
    return [f"{sec}.{k}" for sec in after if sec not in skip for k in after[sec]
            if after[sec][k] != before.get(sec, {}).get(k)]
