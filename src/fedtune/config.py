"""Typed, validated configuration loaded from TOML.

Every section is a dataclass; every field carries its documentation in `metadata["doc"]`
so that `fedtune config` can print the whole default config with a comment on each key.
Loading is strict: an unknown key or a wrong type is a `ConfigError` that names the key
(`section.key`) and suggests the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal


from fedtune.config_schema import (  # noqa: F401  (the sections are part of this module's API)
    RunSection,
    ModelSection,
    DataSection,
    PartitionSection,
    ServerSection,
    FaultsSection,
    LoraSection,
    TrainSection,
    EvalSection,
    CompareSection,
    JudgeSection,
    NvflareSection,
    TaskSection,
    PrivacySection,
    SecAggSection,
    FedBPTSection,
    Config,
    SECTION_DOCS,
)
from fedtune import config_compare
from fedtune.core import algorithm as registry
from fedtune.config_write import save, to_toml  # noqa: F401  (writing: part of this module's API)
from fedtune.errors import ConfigError


# ----------------------------------------------------------------------------- validation


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(options))})"


def _check_value(where: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where} = {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_value(where, args[0], value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return list(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {hint} for {where}")


def _build_section(cls: type, name: str, raw: dict, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{name}.{key}'{_suggest(key, names)}")
        kwargs[key] = _check_value(f"{source}: {name}.{key}", hints[key], value)
    return cls(**kwargs)


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def from_dict(raw: dict, source: str = "config") -> Config:
    sections = _sections()
    built = {}
    for name, value in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section '[{name}]'{_suggest(name, list(sections))}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{name}' must be a table ([{name}]), got {value!r}")
        built[name] = _build_section(sections[name], name, value, source)
    cfg = Config(**built)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Cross-field checks that a type alone cannot express."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {msg}")

    try:  # the algorithm's own checks (the registry imports only the package named)
        registry.get(cfg.run.algorithm).check_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    need(cfg.run.rounds >= 1, f"run.rounds must be >= 1, got {cfg.run.rounds}")
    need(cfg.run.eval_every >= 1, f"run.eval_every must be >= 1, got {cfg.run.eval_every}")
    need(0 <= cfg.run.seed < 2**63, f"run.seed must be in [0, 2**63), got {cfg.run.seed}")
    need(cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    need(cfg.eval.max_examples >= 0, f"eval.max_examples must be >= 0 (0 = all), got {cfg.eval.max_examples}")
    need(cfg.eval.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {cfg.eval.max_new_tokens}")
    need(cfg.data.max_rows >= 0, f"data.max_rows must be >= 0 (0 = all), got {cfg.data.max_rows}")
    need(cfg.data.demo_rows_per_skill >= 1, f"data.demo_rows_per_skill must be >= 1, got {cfg.data.demo_rows_per_skill}")
    need(cfg.train.max_steps >= 0, f"train.max_steps must be >= 0 (0 = use train.epochs), got {cfg.train.max_steps}")
    need(cfg.train.weight_decay >= 0, f"train.weight_decay must be >= 0, got {cfg.train.weight_decay}")
    need(cfg.train.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {cfg.train.warmup_steps}")
    need(cfg.train.prox_mu >= 0, f"train.prox_mu must be >= 0 (0 = off), got {cfg.train.prox_mu}")
    need(cfg.train.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (0 = off), got {cfg.train.max_grad_norm}")
    need(cfg.partition.min_client_size >= 0, f"partition.min_client_size must be >= 0, got {cfg.partition.min_client_size}")
    need(cfg.lora.alpha >= 1, f"lora.alpha must be >= 1, got {cfg.lora.alpha}")
    need(cfg.partition.num_clients >= 1, f"partition.num_clients must be >= 1, got {cfg.partition.num_clients}")
    need(0.0 < cfg.server.fraction <= 1.0, f"server.fraction must be in (0, 1], got {cfg.server.fraction}")
    need(cfg.server.clients_per_round >= 0, "server.clients_per_round must be >= 0")
    need(cfg.server.clients_per_round <= cfg.partition.num_clients,
         f"server.clients_per_round = {cfg.server.clients_per_round} exceeds partition.num_clients = {cfg.partition.num_clients}")
    need(cfg.server.min_clients >= 1, "server.min_clients must be >= 1")
    per_round = cfg.server.clients_per_round or max(1, math.ceil(cfg.server.fraction * cfg.partition.num_clients - 1e-9))
    need(cfg.server.min_clients <= per_round,
         f"server.min_clients = {cfg.server.min_clients} exceeds the {per_round} client(s) selected per round "
         "(server.fraction / server.clients_per_round): every round would fail")
    need(0.0 <= cfg.server.trim_fraction < 0.5, f"server.trim_fraction must be in [0, 0.5), got {cfg.server.trim_fraction}")
    need(cfg.server.aggregation != "trimmed_mean" or math.floor(cfg.server.trim_fraction * per_round) >= 1,
         f"server.aggregation = 'trimmed_mean' with server.trim_fraction = {cfg.server.trim_fraction} and {per_round} "
         f"client(s) per round trims nothing (floor({cfg.server.trim_fraction} x {per_round}) = 0): raise "
         f"server.trim_fraction to at least {1 / per_round:.3g} or select more clients per round")
    need(cfg.server.byzantine >= 0, f"server.byzantine must be >= 0, got {cfg.server.byzantine}")
    need(cfg.server.krum_select >= 0, f"server.krum_select must be >= 0 (0 = updates - byzantine), got {cfg.server.krum_select}")
    least = {"krum": 2 * cfg.server.byzantine + 3, "multi_krum": 2 * cfg.server.byzantine + 3,
             "bulyan": 4 * cfg.server.byzantine + 3}.get(cfg.server.aggregation, 0)
    need(per_round >= least, f"server.aggregation = '{cfg.server.aggregation}' with server.byzantine = "
         f"{cfg.server.byzantine} needs at least {least} clients per round; {per_round} are selected "
         "(server.fraction / server.clients_per_round)")
    if least:
        need(cfg.server.min_clients >= least, f"server.aggregation = '{cfg.server.aggregation}' needs every round to "
             f"aggregate at least {least} updates: set server.min_clients >= {least}")
    need(cfg.server.max_examples >= 0, f"server.max_examples must be >= 0 (0 = no cap), got {cfg.server.max_examples}")
    need(not (cfg.server.aggregation == "scaffold" and cfg.server.clip_norm > 0),
         "server.clip_norm is not applied with server.aggregation = 'scaffold' (its control variates assume the "
         "clients' own updates): set server.clip_norm = 0")
    need(cfg.server.lora_aggregation == "separate" or cfg.server.aggregation == "fedavg",
         f"server.lora_aggregation = '{cfg.server.lora_aggregation}' takes the mean of the clients' products B A: it "
         f"goes with server.aggregation = 'fedavg', not '{cfg.server.aggregation}'")
    need(cfg.server.lora_aggregation != "stack" or cfg.server.clip_norm == 0,
         "server.lora_aggregation = 'stack' (FLoRA) stacks each client's adapter as it is: set server.clip_norm = 0")
    pv = cfg.privacy
    means = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
    ranks = cfg.lora.client_ranks
    if cfg.lora.personal_b:
        need(cfg.server.aggregation in means and pv.mode == "off" and not cfg.secagg.enabled and not ranks
             and not cfg.lora.freeze_a and cfg.server.lora_aggregation == "separate",
             "lora.personal_b (FedSA-LoRA: A shared, B kept by each client) goes with a mean rule "
             f"({', '.join(means)}) and server.lora_aggregation = 'separate', without lora.freeze_a (nothing would "
             "be shared), lora.client_ranks, privacy.mode or secagg")
    if ranks:
        need(all(isinstance(r, int) and 1 <= r <= cfg.lora.r for r in ranks),
             f"lora.client_ranks = {ranks}: each rank must be an integer between 1 and lora.r = {cfg.lora.r} "
             f"(the global adapter's rank)")
        need(cfg.server.aggregation in means and pv.mode == "off" and not cfg.secagg.enabled,
             f"lora.client_ranks (heterogeneous ranks) goes with a mean rule ({', '.join(means)}), without privacy.mode "
             f"or secagg; got server.aggregation = '{cfg.server.aggregation}'")
    if pv.mode != "off":
        need(pv.clip > 0, f"privacy.clip must be > 0, got {pv.clip}")
        need(pv.noise_multiplier >= 0 and pv.target_epsilon >= 0, "privacy.noise_multiplier and privacy.target_epsilon must be >= 0")
        need(pv.noise_multiplier > 0 or pv.target_epsilon > 0, f"privacy.mode = '{pv.mode}' needs privacy.noise_multiplier > 0 "
             "or privacy.target_epsilon > 0 (then the noise multiplier is calibrated for run.rounds)")
        need(0 < pv.delta < 1, f"privacy.delta must be in (0, 1), got {pv.delta}")
        need(0 < pv.target_quantile < 1, f"privacy.target_quantile must be in (0, 1), got {pv.target_quantile}")
        need(pv.clip_lr >= 0 and pv.count_noise >= 0 and pv.noise_shares >= 0,
             "privacy.clip_lr, privacy.count_noise and privacy.noise_shares must be >= 0")
        if cfg.run.algorithm == "fedbpt":
            need(pv.mode == "central", "privacy.mode = 'distributed' needs secure aggregation, which FedBPT does not have: "
                 "use privacy.mode = 'central'")
            need(cfg.fedbpt.mode != "reference", "privacy.mode = 'central' with run.algorithm = 'fedbpt' needs "
                 "fedbpt.mode = 'improved' or 'generation', not 'reference' (its global CMA-ES ranks the clients' "
                 "own fitness values, which DP does not cover)")
        else:
            need(cfg.run.algorithm == "fedit", f"privacy.mode = '{pv.mode}' is available for FedIT and FedBPT")
            need(cfg.server.aggregation in means and cfg.server.lora_aggregation == "separate"
                 and cfg.server.clip_norm == 0,
                 f"privacy.mode = '{pv.mode}' clips and averages the updates itself: it goes with a mean rule "
                 f"(fedavg, fedavgm, fedadagrad, fedadam, fedyogi), server.lora_aggregation = 'separate' and "
                 f"server.clip_norm = 0, not server.aggregation = '{cfg.server.aggregation}'")
        need(pv.mode != "distributed" or cfg.secagg.enabled,
             "privacy.mode = 'distributed': each client adds only a share of the noise, so the server must see only "
             "the sum: set secagg.enabled = true (or use privacy.mode = 'central' with a trusted server)")
    t = cfg.train
    if t.dpsgd_noise_multiplier:
        need(t.dpsgd_noise_multiplier > 0 and t.dpsgd_clip > 0 and 0 < t.dpsgd_delta < 1,
             f"train.dpsgd_noise_multiplier ({t.dpsgd_noise_multiplier}) and train.dpsgd_clip ({t.dpsgd_clip}) must be "
             f"> 0 and train.dpsgd_delta ({t.dpsgd_delta}) in (0, 1)")
        need(cfg.run.algorithm == "fedit", "train.dpsgd_noise_multiplier is sample-level DP for FedIT's local training")
    need(not (t.packing in ("on", "flat") and t.dpsgd_noise_multiplier), f"train.packing = '{t.packing}' cannot be combined "
         "with train.dpsgd_noise_multiplier > 0 (per-example gradients need one example per row)")
    need(not (t.packing == "flat" and t.attention != "auto"), f"train.packing = 'flat' computes attention with its "
         f"own kernel, row by row, so train.attention = '{t.attention}' would not apply; set train.attention = 'auto' "
         "or train.packing = 'off' (with packing 'auto', an explicit train.attention trains unpacked)")
    need(not (t.packing == "flat" and t.compile != "off"), "train.packing = 'flat' cannot be combined with "
         "train.compile = 'layers' (the flat attention loops over each micro-batch's rows, which a compiled layer "
         "would recompile for); set one of them to 'off'")
    need(not (t.compile != "off" and t.dpsgd_noise_multiplier), "train.compile = 'layers' cannot be combined with "
         "train.dpsgd_noise_multiplier > 0 (DP-SGD's per-example gradient hooks sit inside the compiled layers)")
    sa = cfg.secagg
    need(sa.neighbours >= 0 and sa.threshold >= 0, "secagg.neighbours and secagg.threshold must be >= 0")
    if sa.enabled:
        need(cfg.run.algorithm == "fedit", "secagg.enabled is available for run.algorithm = 'fedit'")
        need(cfg.server.aggregation in means and cfg.server.lora_aggregation == "separate",
             f"secagg.enabled: the server sees only the sum, so server.aggregation = '{cfg.server.aggregation}' "
             "(which needs each update) cannot run; use a mean rule (fedavg, fedavgm, fedadagrad, fedadam, fedyogi); "
             "bound clients instead with server.max_examples (each client caps its own weight)")
        need(cfg.server.clip_norm == 0 and cfg.server.max_update_norm == 0 and pv.mode != "central",
             "secagg.enabled: server.clip_norm, server.max_update_norm and privacy.mode = 'central' need each "
             "client's update, which the server never sees; set them to 0 / 'off' (privacy.mode = 'distributed' "
             "clips and noises on the clients)")
        need(not sa.threshold or not sa.neighbours or sa.threshold <= sa.neighbours,
             f"secagg.threshold = {sa.threshold} exceeds secagg.neighbours = {sa.neighbours}")
    need(cfg.server.clip_norm >= 0, f"server.clip_norm must be >= 0, got {cfg.server.clip_norm}")
    need(cfg.server.max_update_norm >= 0, f"server.max_update_norm must be >= 0, got {cfg.server.max_update_norm}")
    need(cfg.server.fedexp_epsilon >= 0, f"server.fedexp_epsilon must be >= 0, got {cfg.server.fedexp_epsilon}")
    need(cfg.server.client_timeout >= 0, f"server.client_timeout must be >= 0, got {cfg.server.client_timeout}")
    need(cfg.server.round_retries >= 0, f"server.round_retries must be >= 0, got {cfg.server.round_retries}")
    need(0.0 <= cfg.faults.probability <= 1.0, f"faults.probability must be in [0, 1], got {cfg.faults.probability}")
    fault_kinds = ["raise", "timeout", "disappear"]
    need(bool(cfg.faults.kinds), "faults.kinds must name at least one of 'raise', 'timeout', 'disappear'")
    for k in cfg.faults.kinds:
        need(k in fault_kinds, f"faults.kinds: unknown kind {k!r}{_suggest(str(k), fault_kinds)}")
    if cfg.faults.probability > 0 and "timeout" in cfg.faults.kinds:
        need(cfg.server.client_timeout > 0, "faults.kinds has 'timeout': set server.client_timeout > 0 (the time "
             "limit an injected hang exceeds), or leave 'timeout' out of faults.kinds")
    need(cfg.lora.r >= 1, f"lora.r must be >= 1, got {cfg.lora.r}")
    need(0.0 <= cfg.lora.dropout < 1.0, f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    need(all(isinstance(m, str) for m in cfg.lora.target_modules) and cfg.lora.target_modules,
         "lora.target_modules must be a non-empty list of module names")
    need(cfg.train.batch_size >= 1 and cfg.train.micro_batch_size >= 1, "train.batch_size and train.micro_batch_size must be >= 1")
    need(cfg.train.micro_batch_size >= cfg.train.batch_size or cfg.train.batch_size % cfg.train.micro_batch_size == 0,
         f"train.batch_size ({cfg.train.batch_size}) must be a multiple of train.micro_batch_size ({cfg.train.micro_batch_size})"
         " (or train.micro_batch_size >= train.batch_size: no accumulation)")
    need(cfg.train.lr > 0, "train.lr must be > 0")
    need(cfg.train.epochs > 0 or cfg.train.max_steps > 0, "set train.epochs > 0 or train.max_steps > 0")
    need(cfg.train.micro_batch_overhead_tokens >= 0,
         f"train.micro_batch_overhead_tokens must be >= 0, got {cfg.train.micro_batch_overhead_tokens}")
    need(cfg.data.cutoff_len >= 8, f"data.cutoff_len must be >= 8, got {cfg.data.cutoff_len}")
    need(cfg.partition.shards_per_client >= 1, "partition.shards_per_client must be >= 1")
    need(cfg.partition.alpha > 0, "partition.alpha must be > 0")
    need(cfg.partition.test_per_category >= 0, "partition.test_per_category must be >= 0")
    config_compare.check(cfg, need)
    if cfg.judge.endpoint:
        need(cfg.judge.endpoint.startswith(("http://", "https://")),
             f"judge.endpoint must be an http(s) URL, got {cfg.judge.endpoint!r}")
        need(bool(cfg.judge.model), "judge.endpoint is set: also set judge.model (the judge model's name)")
    need(cfg.judge.timeout_s > 0, "judge.timeout_s must be > 0")
    need(cfg.nvflare.threads >= 0, f"nvflare.threads must be >= 0, got {cfg.nvflare.threads}")
    need(cfg.nvflare.task_timeout > 0, f"nvflare.task_timeout must be > 0, got {cfg.nvflare.task_timeout}")
    need(cfg.nvflare.launch_timeout > 0, f"nvflare.launch_timeout must be > 0, got {cfg.nvflare.launch_timeout}")
    allowed_cols = {"instruction", "input", "output", "category"}
    for k, v in cfg.data.columns.items():
        need(k in allowed_cols, f"data.columns.{k} is not a column role{_suggest(k, sorted(allowed_cols))}")
        need(isinstance(v, str), f"data.columns.{k} must be a field name (string), got {v!r}")
    if cfg.data.format == "columns":
        need("instruction" in cfg.data.columns and "output" in cfg.data.columns,
             "data.format = 'columns' needs data.columns.instruction and data.columns.output")


# ----------------------------------------------------------------------------- loading


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML file (or the defaults when path is None) and apply `key=value` overrides."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
            if not text.strip():
                raise ConfigError(f"{p}: the config file is empty (leave CONFIG out to run the defaults)")
            raw = tomllib.loads(text)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{p}: invalid TOML: arrays or tables nested too deeply") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file: {e.strerror or e}") from None
        source = str(p)
    for item in overrides or []:
        apply_override(raw, item)
    if overrides:
        source += " with --set"  # a bad value may come from either
    return from_dict(raw, source)


def apply_override(raw: dict, item: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as TOML, else a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"--set {item!r}: the key must name a section, like train.lr=1e-4")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    except RecursionError:
        raise ConfigError(f"--set {key.strip()}=...: the value is nested too deeply") from None
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: '{p}' is not a table")
    node[parts[-1]] = parsed
