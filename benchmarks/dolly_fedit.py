"""The Dolly experiment: FedIT with Shepherd's data allocation on databricks-dolly-15k.

10 clients, both of Shepherd's allocations (diff_quantity 0 = `shards`: category-sorted
shards, two per client; diff_quantity 1 = `dirichlet`: Dirichlet(0.5) over categories,
at least 40 rows per client), the embedded SmolLM2-135M-Instruct, evaluated on FedIT's
80-row global test set (`fedit_global_test_80.jsonl`, 10 rows per category), which is
removed from the training data (`data.test_path`), by held-out loss and by ROUGE-L and
exact match of greedy answers.

The CPU budget (2 shared cores) is stated in the output and in docs/dolly.md: the
allocation is over the whole data set, but each client takes only `--max-steps`
optimizer steps of `--batch-size` rows per round, for `--rounds` rounds, with every
client in every round (Shepherd's default fraction 0.1 would make FedAvg sequential
single-client training). So the model sees a small sample of each client's rows.

Each mode is a normal fedtune run folder (config.toml, metrics.jsonl, summary.json,
report.md with plots, adapter/). The same run from the command line:

  fedtune run --set data.path='../shared/data/dolly15k/databricks-dolly-15k.jsonl' \\
      --set data.test_path='../shared/data/dolly15k/fedit_global_test_80.jsonl' ...   (see `overrides` below)

Run:  .venv/bin/python benchmarks/dolly_fedit.py --out runs/dolly
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly15k"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def overrides(args, mode: str) -> list[str]:
    return [
        f"run.name='dolly-{mode}'", f"run.rounds={args.rounds}", "run.seed=42", "run.save_every_round=false",
        f"run.progress={'true' if args.progress else 'false'}",
        "model.name='smollm2-135m'",
        f"data.path='{DOLLY / 'databricks-dolly-15k.jsonl'}'", f"data.test_path='{DOLLY / 'fedit_global_test_80.jsonl'}'",
        "data.template='alpaca'", f"data.cutoff_len={args.cutoff_len}", "data.too_long='drop'",
        "partition.num_clients=10", f"partition.method='{mode}'", "partition.shards_per_client=2",
        "partition.alpha=0.5", "partition.min_client_size=40",
        "server.fraction=1.0",
        "lora.r=16", "lora.alpha=16", "lora.dropout=0.05", "lora.target_modules=['q_proj', 'v_proj']",
        f"train.max_steps={args.max_steps}", f"train.batch_size={args.batch_size}",
        f"train.micro_batch_size={args.micro_batch_size}", f"train.lr={args.lr}", "train.scheduler='linear'",
        "eval.generate=true", f"eval.max_new_tokens={args.max_new_tokens}", "eval.batch_size=16",
        f"eval.compare_base={'true' if mode == (args.base_mode or args.modes.split(',')[0]) else 'false'}",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="FedIT on Dolly with Shepherd's allocation (10 clients, both modes)")
    ap.add_argument("--out", default="runs/dolly", help="parent folder of the two run folders")
    ap.add_argument("--modes", default="shards,dirichlet")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=2, help="local optimizer steps per client per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4,
                    help="rows per forward/backward (8 rows of 512 tokens need about 6 GB of activations)")
    ap.add_argument("--lr", type=float, default=3e-4, help="Shepherd's local learning rate")
    ap.add_argument("--cutoff-len", type=int, default=512, help="Shepherd's cutoff_len")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--jobs", type=int, default=1, help="run the modes in this many processes at once")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--base-mode", default="", help=argparse.SUPPRESS)  # the mode that also evaluates the base
    args = ap.parse_args(argv)
    if not (DOLLY / "databricks-dolly-15k.jsonl").is_file():
        print(f"skipped: {DOLLY} not found (the Dolly experiment needs ../shared/data)")
        return 0

    from rich.console import Console

    from fedtune import config as C
    from fedtune import runner as recipe

    console = Console(highlight=False)
    out = Path(args.out)
    results = {}
    t_all = time.perf_counter()
    modes = args.modes.split(",")
    for mode in modes:
        if (out / f"dolly-{mode}" / "summary.json").exists():
            raise SystemExit(f"{out / f'dolly-{mode}'} already holds a finished run; choose another --out")
    if args.jobs > 1 and len(modes) > 1:  # one process per mode; each writes its own run folder
        import subprocess

        same = ["--out", str(out), "--rounds", str(args.rounds), "--max-steps", str(args.max_steps),
                "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
                "--lr", str(args.lr), "--cutoff-len", str(args.cutoff_len),
                "--max-new-tokens", str(args.max_new_tokens), "--base-mode", modes[0]]
        out.mkdir(parents=True, exist_ok=True)
        procs = []
        for mode in modes:
            cmd = [sys.executable, __file__, *same, "--modes", mode]
            log = open(out / f"{mode}.log", "w")
            procs.append((mode, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        for mode, p, log in procs:
            if p.wait() != 0:
                raise SystemExit(f"mode {mode} failed (exit {p.returncode}); see {log.name}")
        args.jobs = 1
    for mode in modes:
        cfg = C.load(None, overrides(args, mode))
        run_dir = out / f"dolly-{mode}"
        if not (run_dir / "summary.json").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            C.save(cfg, run_dir / "config.toml")
            console.print(f"[bold]mode {mode}[/] -> {run_dir}")
            summary = recipe.run(cfg, run_dir, console=console)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        summary = json.loads((run_dir / "summary.json").read_text())
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        clients = [c for r in recs for c in r["clients"]]
        results[mode] = {"summary": summary, "steps": sum(c["steps"] for c in clients),
                         "examples": sum(c["examples_seen"] for c in clients),
                         "tokens": sum(c["tokens"] for c in clients),
                         "loss_by_round": [r["eval"]["loss"] for r in recs if "eval" in r]}
    seconds = time.perf_counter() - t_all
    import resource

    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    base = next((r["summary"]["base"] for r in results.values() if "base" in r["summary"]), None)

    print(f"\nDolly, 10 clients, {args.rounds} rounds x {args.max_steps} local steps x batch {args.batch_size} per "
          f"client (all clients every round), cutoff {args.cutoff_len}, lr {args.lr}; 80 held-out rows; "
          f"greedy answers of at most {args.max_new_tokens} new tokens; {seconds / 60:.1f} min wall, "
          f"{cpu / 60:.1f} CPU-min (torch threads {torch_threads()}, load average now {os.getloadavg()[1]:.1f})")
    sizes = {m: sorted(r["summary"]["client_sizes"].values()) for m, r in results.items()}
    for m, s in sizes.items():
        print(f"  {m}: client sizes {s}")
    header = f"{'':12} {'loss':>8} {'ROUGE-L':>8} {'EM':>6} {'steps':>6} {'examples':>9} {'tokens':>9}"
    print(header)
    if base:
        print(f"{'base':12} {base['loss']:8.4f} {base['rouge_l']:8.4f} {base['exact_match']:6.3f}")
    for m, r in results.items():
        f = r["summary"]["final"]
        print(f"{m:12} {f['loss']:8.4f} {f['rouge_l']:8.4f} {f['exact_match']:6.3f} {r['steps']:6d} "
              f"{r['examples']:9d} {r['tokens']:9d}   loss by round {[round(x, 4) for x in r['loss_by_round']]}")
    cats = sorted((base or next(iter(results.values()))["summary"]["final"])["rouge_l_by_category"])
    print("\nROUGE-L by category")
    print(f"{'':16}" + "".join(f"{c[:12]:>13}" for c in cats))
    rows = ([("base", base)] if base else []) + [(m, r["summary"]["final"]) for m, r in results.items()]
    for name, ev in rows:
        print(f"{name:16}" + "".join(f"{ev['rouge_l_by_category'][c]:13.4f}" for c in cats))
    print("\nheld-out loss by category")
    for name, ev in rows:
        print(f"{name:16}" + "".join(f"{ev['loss_by_category'][c]:13.4f}" for c in cats))
    (out / "dolly_results.json").write_text(json.dumps({"args": vars(args), "seconds": seconds, "cpu_seconds": cpu,
                                                         "base": base,
                                                         "modes": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
