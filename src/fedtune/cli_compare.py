"""`fedtune compare`: base vs each client alone vs centralized vs federated, equal budgets."""

from __future__ import annotations

from pathlib import Path

from fedtune.cli_common import DEMO_CONFIG, load_config, new_run_dir
from fedtune.cli_common import console as _console
from fedtune.errors import FedtuneError


def cmd_compare(args) -> int:
    from fedtune import config as C
    from fedtune.compare import run_compare
    from fedtune.compare_report import print_table
    from fedtune.config_resume import COMPARE_RESUMABLE, for_resume

    console = _console()
    if args.resume:
        out = Path(args.resume)
        if not (out / "config.toml").is_file():
            raise FedtuneError(f"--resume {out}: no config.toml there; is it a fedtune compare folder?")
        if args.config or args.out:
            raise FedtuneError("--resume takes its config from the compare folder; do not pass CONFIG or --out")
        cfg = for_resume(C.load(out / "config.toml"), args.overrides, str(out / "config.toml"), COMPARE_RESUMABLE)
    else:
        if args.config is None:  # no CONFIG: the embedded demo, as `fedtune run`
            args.config = str(DEMO_CONFIG)
            console.print(f"no CONFIG given: comparing on the embedded demo ({DEMO_CONFIG.name})")
        cfg = load_config(args)
    if cfg.run.algorithm != "fedit":
        raise FedtuneError(f"fedtune compare runs FedIT variants; run.algorithm = '{cfg.run.algorithm}'")
    if args.no_progress:
        cfg.run.progress = False
    if args.out:
        out = Path(args.out)
        if (out / "compare.json").exists() or (out / "config.toml").exists():
            raise FedtuneError(f"{out} already holds a comparison; continue it with --resume {out}, "
                               "or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    elif not args.resume:
        cfg.run.name = f"{cfg.run.name}-compare"
        out = new_run_dir(cfg, None)
    C.save(cfg, out / "config.toml")
    console.print(f"compare folder: {out}")
    doc = run_compare(cfg, out, console, resume=bool(args.resume))
    print_table(doc, console)
    console.print(f"table in {out / 'compare.md'} and {out / 'compare.json'}; each variant's run folder beside them")
    return 0
