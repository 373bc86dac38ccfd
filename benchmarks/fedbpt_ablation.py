"""FedBPT's levers, switched on one at a time on one task and budget (the ablation table of
docs/fedbpt.md): reference mode, today's improved mode, then the starting-point search, the
calibrated fitness, the one-generation mode (separable CMA-ES across all clients' rows,
population `--popsize`, minibatch fitness) and deep prompts. Every row is a normal `fedtune run`
of the task's config with the overrides in ROWS; each reports the majority-class baseline, the
zero prompt, best-by-dev and final-round test scores, and the bytes per client per round.

    .venv/bin/python benchmarks/fedbpt_ablation.py --json docs/benchmarks/fedbpt_ablation_sst2.json
    .venv/bin/python benchmarks/fedbpt_ablation.py --config configs/fedbpt_agnews.toml \\
        --json docs/benchmarks/fedbpt_ablation_agnews.json
    .venv/bin/python benchmarks/fedbpt_ablation.py --only generation+search --seeds 1,2,3   # 3 seeds of one row

The test file is never used for selection (each run picks on its dev split); `--set` applies to
every row, after its own overrides (e.g. --set run.rounds=30 --set task.test_max_rows=0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

GENERATION = ["fedbpt.mode='generation'", "fedbpt.minibatch=4", "fedbpt.select_on_dev=true"]
ROWS = {  # name -> overrides on top of the config (and of --set); each adds one lever to the row above it
    "reference": ["fedbpt.mode='reference'", "fedbpt.search=false"],
    "improved": ["fedbpt.mode='improved'", "fedbpt.search=false"],
    "improved+search": ["fedbpt.mode='improved'", "fedbpt.search=true"],
    "improved+search+calibrated-fitness": ["fedbpt.mode='improved'", "fedbpt.search=true",
                                           "fedbpt.calibrate_fitness=true"],
    "generation": [*GENERATION, "fedbpt.search=false"],  # from the config's own start (e.g. configs/fedbpt_sst2.toml: the search's choice written in)
    "generation+search": [*GENERATION, "fedbpt.search=true"],
    # the input prompt alone with the acceptance test: its CMA-ES mean replaces the prompt only when it scores lower
    "generation+accept": [*GENERATION, "fedbpt.search=false", "fedbpt.deep=true", "fedbpt.deep_layers=1", "fedbpt.deep_accept=true"],
    "generation+search+accept": [*GENERATION, "fedbpt.search=true", "fedbpt.deep=true", "fedbpt.deep_layers=1",
                                 "fedbpt.deep_accept=true"],
    "generation+search+deep": [*GENERATION, "fedbpt.search=true", "fedbpt.deep=true"],
    "generation+search+deep+accept": [*GENERATION, "fedbpt.search=true", "fedbpt.deep=true", "fedbpt.deep_accept=true"],
}


def chosen(search_json: Path) -> list[str]:
    """Overrides that set a finished search's choice (template, words, calibration) with the
    search off: the search scores the zero prompt on the run's training and dev rows, which are
    the same in every row of one seed, so its choice is the same and is computed once."""
    s = json.loads(search_json.read_text(encoding="utf-8"))
    words = ", ".join(f"{json.dumps(str(k))} = {json.dumps(v)}" for k, v in s["verbalizer"].items())
    return [f"task.template={json.dumps(s['template'])}", f"task.verbalizer={{{words}}}",
            "task.template_candidates=[]", "task.word_candidates={}",
            f"fedbpt.calibration={json.dumps(s['calibration'])}", "fedbpt.search=false"]


def run_row(config: str, name: str, overrides: list[str], seed: int, work: Path, popsize: int,
            searched: dict) -> dict:
    from fedtune import config as C
    from fedtune import runner

    extra = ROWS[name] + ([f"fedbpt.popsize={popsize}"] if name.startswith("generation") else [])
    reused = ""
    if "fedbpt.search=true" in extra and seed in searched:
        reused = str(searched[seed])
        extra = [o for o in extra if o != "fedbpt.search=true"] + chosen(searched[seed])
    cfg = C.load(config or None, extra + overrides + [f"run.seed={seed}", "run.progress=false", "run.save_every_round=false"])
    run_dir = work / f"{name}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    C.save(cfg, run_dir / "config.toml")
    t0 = time.perf_counter()
    s = runner.run(cfg, run_dir)
    if (run_dir / "search.json").exists():
        searched.setdefault(seed, run_dir / "search.json")
    from fedtune.fedbpt.session import prepare_task

    test = prepare_task(cfg).test
    majority = max(Counter(e.label for e in test).values()) / len(test)
    pick = (lambda part: {k: s[part]["test"][k] for k in ("accuracy", "score", "f1") if k in s[part]["test"]})
    return {"row": name, "seed": seed, "metric": s["metric"], "majority": majority, "test_rows": s["test_rows"],
            "zero_prompt": pick("zero_prompt"), "best_round": s["best"]["round"], "best": pick("best"),
            "final": pick("final"), "communication": s["communication"], "search": s.get("search", {}).get("template") or (cfg.task.template if reused else None),
            "search_reused_from": reused,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "fedbpt_sst2_bbt.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--only", default="", help="comma-separated row names (default: every row)")
    ap.add_argument("--seeds", default="1234")
    ap.add_argument("--popsize", type=int, default=20, help="population of the one-generation rows")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_fedbpt_ablation"))
    ap.add_argument("--json", default="")
    ap.add_argument("--search-from", default="", help="search.json of an earlier run of the same task, seed and "
                    "data settings: its choice is reused instead of searching again; comma-separated, one per seed "
                    "of --seeds in order (fewer files than seeds: the later seeds search)")
    args = ap.parse_args()
    from fedtune import config as C

    cfg = C.load(args.config or None, args.overrides)
    for p in (cfg.task.train_path, cfg.task.test_path):
        if p and not p.startswith("hub:") and not Path(p).exists():
            print(f"skipped: {p} is absent (../shared/data holds the task files)", file=sys.stderr)
            return 0
    names = [n for n in args.only.split(",") if n] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    # every row reads one copy of the config, taken now: a file edited or renamed during a long run
    # must not change the rows still to come (paths inside it are relative to the working directory)
    config = args.config
    if config:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        config = str(shutil.copyfile(config, Path(args.work) / "base_config.toml"))
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    files = [Path(f) for f in args.search_from.split(",") if f]
    if len(files) > len(seeds):
        ap.error(f"--search-from names {len(files)} files for {len(seeds)} seeds")
    searched = dict(zip(seeds, files))
    for name in names:
        for seed in seeds:
            rows.append(run_row(config, name, args.overrides, seed, Path(args.work), args.popsize, searched))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            lines = table(rows, names)
            if args.json:  # after every row: a long run cut short keeps the rows it finished
                Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "table": lines,
                                                       "finished": len(rows) == len(names) * len(seeds)}, indent=1))
    print(f"metric: {rows[0]['metric']}\n" + "\n".join(lines))
    return 0


def table(rows: list[dict], names: list[str]) -> list[str]:
    lines = ["| row | seed | majority | zero prompt | best-by-dev (round) | final | final - best | bytes down / up "
             "per client per round (max) | s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        z, b, f = (100 * r[k]["score"] for k in ("zero_prompt", "best", "final"))
        c = r["communication"]
        lines.append(f"| {r['row']} | {r['seed']} | {100 * r['majority']:.1f}% | {z:.1f}% | {b:.1f}% ({r['best_round']}) | "
                     f"{f:.1f}% | {f - b:+.1f} | {c['bytes_down_per_client_round_max']:,} / "
                     f"{c['bytes_up_per_client_round_max']:,} | {r['seconds']:.0f} |")
    for name in names:  # several seeds of one row: their mean and spread (sample std)
        rs = [r for r in rows if r["row"] == name]
        if len(rs) > 1:
            z, b, f = (np.array([100 * r[k]["score"] for r in rs]) for k in ("zero_prompt", "best", "final"))
            lines.append(f"| {name}, mean ± std | {len(rs)} seeds | - | {z.mean():.1f} ± {z.std(ddof=1):.1f}% | "
                         f"{b.mean():.1f} ± {b.std(ddof=1):.1f}% | {f.mean():.1f} ± {f.std(ddof=1):.1f}% | "
                         f"{(f - b).mean():+.1f} | - | {np.mean([r['seconds'] for r in rs]):.0f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
