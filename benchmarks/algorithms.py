"""Every FedIT server rule and client correction on one federation, one table.

Each algorithm is a normal `fedtune run` of the same config (same data, partition, seed,
model, local budget: the same clients, local steps and rows per round), changed only in
`server.aggregation` (and `train.prox_mu` for FedProx). The table holds the held-out loss,
exact match and ROUGE-L of the final global adapter, the bytes per round (both ways, all
clients) and the seconds per round, measured in this one run, one algorithm after another.

Run (the packaged demo: the generated skills data, category shards, 6 clients):

  .venv/bin/python benchmarks/algorithms.py --out runs/algorithms --json docs/benchmarks/algorithms.json \\
      --set run.rounds=3 --set train.max_steps=4

Any config works (`--config FILE`, `--set` overrides); `--only fedavg,scaffold` runs a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "fedtune" / "configs" / "demo.toml"

# name -> (the algorithm as `fedtune compare` switches it on, extra settings of this table).
# The robust rules need 2f + 3 clients per round (Bulyan 4f + 3): a row the config cannot run
# (too few clients per round) is listed as skipped with the config's own error, not dropped.
ALGORITHMS = {
    "fedavg": ("fedavg", []),
    "fedavgm": ("fedavgm", ["server.server_lr=1.0", "server.momentum=0.5"]),
    "fedadagrad": ("fedadagrad", ["server.server_lr=0.01"]),
    "fedadam": ("fedadam", ["server.server_lr=0.01"]),
    "fedyogi": ("fedyogi", ["server.server_lr=0.01"]),
    "fedexp": ("fedexp", []),
    "fedprox": ("fedprox", ["train.prox_mu=0.01"]),
    "scaffold": ("scaffold", []),
    "flexlora_svd": ("flexlora_svd", []),
    "flora": ("flora", []),
    "ffa_lora": ("ffa_lora", []),
    "hetlora": ("hetlora", []),  # ranks r/4, r/2, r (as `fedtune compare`)
    "flexlora_het": ("flexlora_het", []),
    "fedsa_lora": ("", ["lora.personal_b=true"]),  # personalized: each client's model on its own categories
    "median": ("median", []),
    "trimmed_mean": ("trimmed_mean", ["server.trim_fraction=0.2"]),
    "krum": ("krum", ["server.byzantine=1", "server.min_clients=5"]),
    "multi_krum": ("multi_krum", ["server.byzantine=1", "server.min_clients=5"]),
    "bulyan": ("bulyan", ["server.byzantine=1", "server.min_clients=7"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEMO))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(ALGORITHMS))
    ap.add_argument("--out", default="runs/algorithms")
    ap.add_argument("--json", default="")
    ap.add_argument("--append-to", default="", help="an earlier report (its --json) of the same config and overrides: "
                    "its base model and rows are kept, the rows run now are added (each row marked with its run)")
    args = ap.parse_args()

    from fedtune import compare, runner
    from fedtune import config as C
    from fedtune.errors import ConfigError

    names = [n for n in args.only.split(",") if n] or list(ALGORITHMS)
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        ap.error(f"unknown algorithm(s) {unknown}")
    out = Path(args.out)
    rows = []
    load = os.getloadavg()[0]
    base = {}
    earlier = json.loads(Path(args.append_to).read_text()) if args.append_to else None
    if earlier is not None:
        if earlier["overrides"] != args.overrides or Path(earlier["config"]).name != Path(args.config).name:
            ap.error(f"--append-to {args.append_to}: its config/overrides {earlier['config']} {earlier['overrides']} "
                     f"differ from this run's {args.config} {args.overrides}")
        base = earlier["base"]
        for r in earlier["rows"]:
            r.setdefault("run", 1)
        rows = [r for r in earlier["rows"] if r["algorithm"].split(" ")[0] not in names]
    this_run = 1 + max((r["run"] for r in rows), default=0) if earlier is not None else 1
    for name in names:
        once = [] if not base else ["eval.compare_base=false"]  # the base model is evaluated once
        alg, extra = ALGORITHMS[name]
        try:
            cfg = compare.with_algorithm(C.load(args.config, args.overrides + ["run.progress=false"] + once + extra), alg)
        except ConfigError as e:  # e.g. too few clients per round for Bulyan: say so in the table
            rows.append({"algorithm": name, "skipped": str(e), "run": this_run})
            print(f"{name}: skipped: {e}", file=sys.stderr, flush=True)
            continue
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=False)
        C.save(cfg, run_dir / "config.toml")
        t0 = time.perf_counter()
        summary = runner.run(cfg, run_dir)
        wall = time.perf_counter() - t0
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        final = summary["final"]
        if "personalized" in summary:  # FedSA-LoRA: the global A with B = 0 is the base model; score the clients'
            p = summary["personalized"]
            final = {k: p.get(f"mean_{k}") for k in ("loss", "exact_match", "rouge_l")}
        row = {"algorithm": name + (" (personalized)" if "personalized" in summary else ""),
               "loss": final.get("loss"), "exact_match": final.get("exact_match"),
               "rouge_l": final.get("rouge_l"),
               "bytes_per_round": sum(r["bytes_down"] + r["bytes_up"] for r in recs) / len(recs),
               "seconds_per_round": sum(r["round_seconds"] for r in recs) / len(recs), "wall_seconds": round(wall, 1), "run": this_run}
        rows.append(row)
        base = base or summary.get("base", {})
        print(json.dumps(row), file=sys.stderr, flush=True)
    report = {"config": args.config, "overrides": args.overrides, "load_average_at_start": load,
              "runs": _runs(earlier) + [{"load_average_at_start": load, "rows": names}],
              "base": {k: base.get(k) for k in ("loss", "exact_match", "rouge_l")}, "rows": rows}
    print(_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _runs(earlier: dict | None) -> list[dict]:
    if earlier is None:
        return []
    return earlier.get("runs") or [{"load_average_at_start": earlier.get("load_average_at_start"),
                                    "rows": [r["algorithm"] for r in earlier["rows"]]}]


def _table(report: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = ["| algorithm | held-out loss | exact match | ROUGE-L | bytes per round | seconds per round |",
             "|---|---:|---:|---:|---:|---:|"]
    b = report["base"]
    if b.get("loss") is not None:
        lines.append(f"| base model (no tuning) | {b['loss']:.4f} | {pct(b.get('exact_match'))} | "
                     f"{pct(b.get('rouge_l'))} | - | - |")
    several = len({r.get("run", 1) for r in report["rows"]}) > 1
    for r in report["rows"]:
        name = r["algorithm"] + (f" (run {r.get('run', 1)})" if several else "")
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {name} | {r['loss']:.4f} | {pct(r['exact_match'])} | {pct(r['rouge_l'])} | "
                     f"{r['bytes_per_round'] / 1e6:.2f} MB | {r['seconds_per_round']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
