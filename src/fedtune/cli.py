"""The `fedtune` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from fedtune import __version__
from fedtune.cli_common import DEMO_CONFIG
from fedtune.cli_common import add_config_args as _add_config_args
from fedtune.cli_common import console as _console
from fedtune.cli_common import load_config as _load_config
from fedtune.cli_common import new_run_dir as _new_run_dir
from fedtune.cli_compare import cmd_compare
from fedtune.errors import FedtuneError


# ----------------------------------------------------------------------------- commands


def cmd_run(args) -> int:
    from fedtune import config as C
    from fedtune import runner
    from fedtune.config_resume import for_resume
    from fedtune.summary_console import print_summary

    console = _console()
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.toml").is_file():
            raise FedtuneError(f"--resume {run_dir}: no config.toml there; is it a fedtune run folder?")
        if args.config:
            raise FedtuneError("--resume takes its config from the run folder; do not pass CONFIG")
        saved = C.load(run_dir / "config.toml")
        if args.engine and args.engine != saved.run.engine:
            raise FedtuneError(f"--engine {args.engine}: this run was started with run.engine = '{saved.run.engine}'; "
                               "a run is resumed on the engine it started on")
        cfg = for_resume(saved, args.overrides, str(run_dir / "config.toml"))
        C.save(cfg, run_dir / "config.toml")  # the resumed run's config, overrides included
    else:
        if args.config is None:  # no CONFIG: the embedded demo
            args.config = str(DEMO_CONFIG)
            console.print(f"no CONFIG given: running the embedded demo ({DEMO_CONFIG.name}; see `fedtune config --demo`)")
        cfg = _load_config(args)
        if args.engine:
            cfg.run.engine = args.engine
        run_dir = _new_run_dir(cfg, args.out)
        C.save(cfg, run_dir / "config.toml")
    if args.no_progress:
        cfg.run.progress = False
    console.print(f"run folder: {run_dir}")
    summary = runner.run(cfg, run_dir, resume=bool(args.resume), console=console)
    print_summary(summary, console)
    from fedtune.core import algorithm as registry

    console.print(f"results in {run_dir} (metrics.jsonl, summary.json, {registry.get(cfg.run.algorithm).output}/)")
    return 0


def cmd_nvflare_export(args) -> int:
    from fedtune.engines import nvflare

    cfg = _load_config(args)
    console = _console()
    out = nvflare.export(cfg, args.out, console)
    console.print(f"FLARE job folder: {out}")
    console.print("each site names its data in its own site config (<site>/local/fedtune_site.toml or "
                  "$FEDTUNE_SITE_CONFIG); then: nvflare job submit -j " + str(out) + " --startup-kit ADMIN_KIT")
    return 0


def cmd_nvflare_collect(args) -> int:
    from fedtune.engines import nvflare

    console = _console()
    nvflare.collect(args.result_dir, args.out, args.overrides, console)
    console.print(f"run folder: {args.out}")
    return 0


def cmd_partition(args) -> int:
    from rich.table import Table

    from fedtune.data import partition as P
    from fedtune.data.instructions import write_jsonl
    from fedtune.fedit.session import prepare_data

    cfg = _load_config(args)
    data = prepare_data(cfg)
    out = Path(args.out)
    cats = [r.category for r in data.rows]
    table = Table(title=f"{len(data.parts)} clients · method {cfg.partition.method} · seed {cfg.run.seed}")
    table.add_column("client")
    table.add_column("rows", justify="right")
    table.add_column("categories (rows)")
    for cid, part in zip(data.client_ids(), data.parts):
        write_jsonl([data.rows[i] for i in part], out / f"{cid}.jsonl")
        table.add_row(cid, str(len(part)), ", ".join(f"{c} {n}" for c, n in P.category_mix(cats, part).items()))
    write_jsonl(data.test, out / "global_test.jsonl")
    console = _console()
    console.print(table)
    console.print(f"held-out global test set: {len(data.test)} rows · files in {out}/")
    return 0


def _positional_config(args) -> None:
    """generate and classify take CONFIG as every other command does; --config still works."""
    if args.config_opt:
        if args.config:
            raise FedtuneError("give CONFIG once (positional), not also with --config")
        args.config = args.config_opt


def cmd_generate(args) -> int:
    from fedtune import config as C
    from fedtune.data.instructions import PromptFormatter, Row
    from fedtune.fedit.evaluate import generate_answers
    from fedtune.models import load_causal_lm

    _positional_config(args)
    cfg_path = args.config
    if cfg_path is None and args.adapter and (Path(args.adapter).parent / "config.toml").is_file():
        cfg_path = Path(args.adapter).parent / "config.toml"  # the run's own model and template
    cfg = C.load(cfg_path, args.overrides)
    if args.model:
        cfg.model.name = args.model
    prompts = list(args.prompt or [])
    if args.file:
        p = Path(args.file)
        if not p.is_file():
            raise FedtuneError(f"prompt file not found: {p}")
        prompts += [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise FedtuneError("give at least one --prompt TEXT or --file FILE (one prompt per line)")
    lm = load_causal_lm(cfg.model)
    model = lm.model
    if args.adapter:
        from peft import PeftModel

        ad = Path(args.adapter)
        if not (ad / "adapter_config.json").is_file():
            raise FedtuneError(f"{ad}: not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(ad))
    fmt = PromptFormatter(args.template or cfg.data.template, lm.tokenizer)
    rows = [Row(p, "", "", "all") for p in prompts]
    answers = generate_answers(model, lm.tokenizer, fmt, rows, batch_size=8, max_new_tokens=args.max_new_tokens,
                               device=lm.device, amp=lm.autocast)
    for p, a in zip(prompts, answers):
        print(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False))
    return 0


def cmd_report(args) -> int:
    from fedtune.reporting import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file() and not (run_dir / "summary.json").is_file():
        raise FedtuneError(f"{run_dir}: no metrics.jsonl or summary.json; is it a fedtune run folder?")
    print(f"wrote {write_report(run_dir)}")
    return 0


def cmd_classify(args) -> int:
    from fedtune import config as C
    from fedtune.fedbpt.classify import classify, read_inputs
    from fedtune.fedbpt.prompt import load_prompt
    from fedtune.fedbpt.tasks import TaskSpec

    _positional_config(args)
    _, _, meta = load_prompt(Path(args.prompt_dir))
    rows = read_inputs(TaskSpec.from_json(meta["task"]), args.text or [], args.file)
    cfg = C.load(args.config, args.overrides)  # model.device / dtype / autocast
    for r in classify(args.prompt_dir, rows, cfg.model, model_name=args.model):
        print(json.dumps(r, ensure_ascii=False))
    return 0


def cmd_config(args) -> int:
    from fedtune import config as C

    if args.demo:
        if args.config:
            raise FedtuneError("give either CONFIG or --demo, not both")
        args.config = str(DEMO_CONFIG)
    cfg = _load_config(args)
    sys.stdout.write(C.to_toml(cfg, comments=True))
    return 0


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated fine-tuning of LLMs: FedIT (LoRA adapters) and FedBPT (black-box prompt tuning).",
    )
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run a federated job (no CONFIG: the embedded demo)",
                       description="Run a federated job. With no CONFIG, runs the embedded offline demo.")
    _add_config_args(p, "the embedded demo")
    p.add_argument("--out", metavar="DIR", help="run folder (default: <run.out_dir>/<run.name>, numbered if taken)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--engine", choices=["simulator", "nvflare"], help="override run.engine (a resumed run keeps its engine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("partition", help="split data across clients and write one file per client",
                       description="Hold out the global test set, partition the rest across clients, write "
                                   "client_NNN.jsonl and global_test.jsonl, and print each client's size and "
                                   "category mix.")
    _add_config_args(p)
    p.add_argument("--out", metavar="DIR", default="data/clients", help="output folder (default: data/clients)")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("generate", help="answer prompts with the base model plus a saved adapter",
                       description="Answer prompts with the base model, plus a saved global adapter if given.")
    p.add_argument("--adapter", metavar="DIR", help="PEFT adapter folder (e.g. RUN_DIR/adapter)")
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="config for the model and template (default: the run's config.toml beside --adapter)")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--model", help="base model (overrides model.name)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--file", metavar="FILE", help="a text file with one prompt per line")
    p.add_argument("--template", choices=["alpaca", "chat", "plain"], help="prompt template (default: the config's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compare", help="base vs each client alone vs centralized vs federated, equal budgets",
                       description="Run, with equal training budgets (the same optimizer steps and examples), the "
                                   "base model, each client alone (local-only), centralized (all client data pooled) "
                                   "and federated; print and save the held-out table per category and overall "
                                   "(compare.md, compare.json). With no CONFIG, uses the embedded demo.")
    _add_config_args(p, "the embedded demo")
    p.add_argument("--out", metavar="DIR", help="compare folder (default: <run.out_dir>/<run.name>-compare)")
    p.add_argument("--resume", metavar="DIR", help="continue a stopped comparison (docs/evaluation.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="(re)write report.md with plots for a run folder",
                       description="Write RUN_DIR/report.md (resolved config, results table, PNG plots) from its "
                                   "config.toml, metrics.jsonl and summary.json.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("nvflare", help="NVIDIA FLARE: export a job for a POC or production deployment",
                       description="NVIDIA FLARE engine. `fedtune run CONFIG --engine nvflare` runs in FLARE's "
                                   "simulator; `fedtune nvflare export` writes a job folder for "
                                   "`nvflare job submit -j JOB_DIR`. See docs/nvflare.md.")
    nv = p.add_subparsers(dest="nvflare_command", metavar="SUBCOMMAND", required=True)
    q = nv.add_parser("export", help="write a FLARE job folder for a config",
                      description="Write a FLARE job folder (server controller, site script, the config and the "
                                  "initial arrays; no data) that `nvflare job submit -j JOB_DIR` accepts. Each site "
                                  "reads its data path from its own site config.")
    _add_config_args(q)
    q.add_argument("--out", metavar="JOB_DIR", required=True, help="job folder to write (new or empty)")
    q.set_defaults(func=cmd_nvflare_export)
    q = nv.add_parser("collect", help="turn a downloaded job result into a run folder (adapter or prompt)",
                      description="Turn a deployment's result (`nvflare job download JOB_ID -o DIR`, then DIR/JOB_ID) "
                                  "into a run folder: metrics.jsonl, config.toml, summary.json and the global adapter "
                                  "(FedIT, PEFT format) or prompt (FedBPT). Loads the base model named in the job "
                                  "(override with --set model.name=...).")
    q.add_argument("result_dir", metavar="RESULT_DIR", help="the downloaded job result (holds workspace/fedtune/)")
    q.add_argument("--out", metavar="RUN_DIR", required=True, help="run folder to write (new or empty)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the job's config, e.g. --set model.name=/models/SmolLM2")
    q.set_defaults(func=cmd_nvflare_collect)

    p = sub.add_parser("classify", help="label text with a saved FedBPT global prompt",
                       description="Label text with a saved FedBPT global prompt (RUN_DIR/prompt): the model it "
                                   "was tuned on runs forward with the prompt; prints one JSON line per text with "
                                   "the label, its verbalizer word and the class probabilities.")
    p.add_argument("prompt_dir", metavar="PROMPT_DIR", help="a saved prompt folder, e.g. RUN_DIR/prompt")
    p.add_argument("--text", action="append", metavar="TEXT", help="a text to label (repeatable; one-field tasks)")
    p.add_argument("--file", metavar="FILE", help=".txt (one text per line) or .csv/.tsv/.jsonl with the task's text columns")
    p.add_argument("--model", help="run another copy of the model (default: the one in prompt.json)")
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="config for model.device/dtype/autocast (default: the built-in defaults)")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("config", help="print the full config as TOML, every key commented",
                       description="Print the resolved config (defaults, or CONFIG with --set overrides) as TOML.")
    _add_config_args(p)
    p.add_argument("--demo", action="store_true", help="print the embedded demo's config (what `fedtune run` runs)")
    p.set_defaults(func=cmd_config)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # transformers missing is reported where it is needed
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except FedtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
