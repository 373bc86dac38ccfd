"""Checks of the `[compare]` section: its variants and the algorithms of its federated variant.

A `compare.algorithms` entry is a name (a `server.aggregation` value, or one of EXTRA), or an
inline table naming a variant with settings of its own, for a sweep at equal budgets:

    algorithms = ["fedavg", { name = "fedavgm_lr3", algorithm = "fedavgm",
                              set = { server = { server_lr = 3.0, momentum = 0.0 } } }]

`set` may change only what leaves the budget alone: the server's rule and its parameters (not
which clients it selects), FedProx's mu, LoRA's frozen A and per-client ranks.
"""

from __future__ import annotations

import difflib
import re
import typing

from fedtune.config_schema import ServerSection

EXTRA = ["fedprox", "flexlora_svd", "flora", "ffa_lora", "hetlora", "flexlora_het"]
VARIANTS = ["base", "local", "centralized", "federated"]
SETTABLE = ("server.*", "train.prox_mu", "lora.freeze_a", "lora.client_ranks")
NOT_SETTABLE = ("server.fraction", "server.clients_per_round", "server.min_clients")  # they change the budget


def known_algorithms() -> list[str]:
    return list(typing.get_args(typing.get_type_hints(ServerSection)["aggregation"])) + EXTRA


def settable(key: str) -> bool:
    if key in NOT_SETTABLE:
        return False
    return any(key == s or (s.endswith(".*") and key.startswith(s[:-1])) for s in SETTABLE)


def entry(item) -> tuple[str, str, dict]:
    """(variant name, algorithm, {section: {key: value}}) of one compare.algorithms entry."""
    if isinstance(item, dict):
        return item.get("name") or item["algorithm"], item["algorithm"], item.get("set", {})
    return item, item, {}


def check(cfg, need) -> None:
    """Raise (through `need(cond, message)`) on a [compare] setting that cannot run."""
    for v in cfg.compare.variants:
        need(v in VARIANTS, f"compare.variants: unknown variant {v!r}{_suggest(str(v), VARIANTS)}")
    need(cfg.compare.local_clients >= 0, "compare.local_clients must be >= 0")
    known = known_algorithms()
    names = []
    for i, item in enumerate(cfg.compare.algorithms):
        where = f"compare.algorithms[{i}]"
        if isinstance(item, dict):
            extra = sorted(set(item) - {"name", "algorithm", "set"})
            need(not extra, f"{where}: an entry table takes name, algorithm and set; unknown key(s) {extra}")
            alg = item.get("algorithm")
            need(isinstance(alg, str), f"{where}: an entry table needs algorithm = \"...\" (one of {', '.join(known)})")
            need(alg in known, f"{where}: unknown algorithm {alg!r}{_suggest(alg, known)}")
            name = item.get("name", alg)
            need(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.+-]+", name) is not None,
                 f"{where}: name = {name!r}: letters, digits and _ . + - only (it names the variant's folder)")
            sets = item.get("set", {})
            need(isinstance(sets, dict) and all(isinstance(v, dict) for v in sets.values()),
                 f"{where}: set = {{ section = {{ key = value }} }}, e.g. set = {{ server = {{ server_lr = 2.0 }} }}")
            for sec, values in sets.items():
                for k in values:
                    need(settable(f"{sec}.{k}"),
                         f"{where} ('{name}'): set.{sec}.{k} may not differ between the variants of one comparison "
                         f"(their budgets must stay equal); an entry may set {', '.join(SETTABLE)} "
                         f"(not {', '.join(NOT_SETTABLE)})")
        else:
            need(isinstance(item, str) and item in known,
                 f"{where}: unknown algorithm {item!r}{_suggest(str(item), known)}")
            name = item
        need(name not in names, f"{where}: a second variant named '{name}'; give it name = \"...\"")
        names.append(name)


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(options))})"
