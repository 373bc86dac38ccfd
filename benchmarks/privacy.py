"""Utility against epsilon: client-level DP-FedAvg on a federation with enough clients for DP
to make sense, at epsilon = infinity (no DP), 8, 3 and 1 (delta = 1e-5), plus epsilon = 8 with
adaptive clipping and with distributed DP under secure aggregation.

The generated skills data (the demo's six skills, --rows-per-skill rows each) split over
`--clients` clients (category shards, so non-IID), `--per-round` of them sampled each round
without replacement, the embedded SmolLM2-135M-Instruct with a DP-friendly adapter: FFA-LoRA
(A frozen at its random init, only B trained and noised; Sun et al. 2024 propose it for DP)
of rank --rank on --targets. Every run has the same data, seed and local budget and differs
only in [privacy] (and [secagg]). The noise multiplier of each epsilon is calibrated by
dp-accounting for the planned rounds. The table: held-out loss and exact match of the final
global adapter, the noise multiplier, the epsilon actually spent (from the run's own
metrics), the noise std on each coordinate of the mean update, and seconds per round.

Run:  .venv/bin/python benchmarks/privacy.py --out runs/privacy --json docs/benchmarks/privacy.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "fedtune" / "configs" / "demo.toml"


def variants(epsilons: list[float], clip: float) -> list[tuple[str, list[str]]]:
    out = []
    for eps in epsilons:
        if math.isinf(eps):
            out.append(("no DP", []))
        else:
            out.append((f"central ε={eps:g}", ["privacy.mode='central'", f"privacy.target_epsilon={eps}",
                                                f"privacy.clip={clip}"]))
    # clipping alone (noise multiplier 1e-6: epsilon unbounded): separates what clipping costs from what noise costs
    out.append(("clip only (no noise)", ["privacy.mode='central'", "privacy.noise_multiplier=1e-6",
                                         f"privacy.clip={clip}"]))
    if 8.0 in epsilons:
        out.append(("central ε=8, adaptive clip", ["privacy.mode='central'", "privacy.target_epsilon=8.0",
                                                   f"privacy.clip={clip}", "privacy.adaptive_clip=true"]))
        out.append(("distributed ε=8 + SecAgg+", ["privacy.mode='distributed'", "privacy.target_epsilon=8.0",
                                                  f"privacy.clip={clip}", "secagg.enabled=true",
                                                  "secagg.neighbours=10"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=300)
    ap.add_argument("--per-round", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--rows-per-skill", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--targets", default="v_proj")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--epsilons", default="inf,8,3,1")
    ap.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/privacy")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from fedtune import config as C
    from fedtune import runner

    targets = [t for t in args.targets.split(",") if t]
    common = [f"partition.num_clients={args.clients}", f"server.clients_per_round={args.per_round}",
              f"run.rounds={args.rounds}", f"run.eval_every={args.rounds}", "partition.method='shards'",
              f"data.demo_rows_per_skill={args.rows_per_skill}", f"train.max_steps={args.local_steps}",
              f"train.lr={args.lr}", f"lora.r={args.rank}", f"lora.alpha={2 * args.rank}", "lora.freeze_a=true",
              f"lora.target_modules={json.dumps(targets)}", "run.progress=false", "run.save_every_round=false",
              *args.overrides]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    rows = []
    for i, (name, extra) in enumerate(variants([float(e) for e in args.epsilons.split(",")], args.clip)):
        if only and name not in only:
            continue
        once = [] if not rows else ["eval.compare_base=false"]
        cfg = C.load(str(DEMO), common + extra + once)
        run_dir = Path(args.out) / name.replace(" ", "_").replace(",", "").replace("+", "").replace("=", "")
        run_dir.mkdir(parents=True, exist_ok=False)
        C.save(cfg, run_dir / "config.toml")
        t0 = time.perf_counter()
        s = runner.run(cfg, run_dir)
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        final, pv = s["final"], s.get("privacy") or {}
        z, m = pv.get("noise_multiplier"), args.per_round
        std = None
        if z is not None:  # std of the noise on each coordinate of the mean update
            zu = pv.get("update_noise_multiplier", z)
            std = zu * pv["clip"] / m
        rows.append({"name": name, "epsilon_spent": pv.get("epsilon"), "noise_multiplier": z,
                     "clip_last": pv.get("clip"), "noise_std_of_mean": std,
                     "loss": final.get("loss"), "exact_match": final.get("exact_match"),
                     "base_loss": (s.get("base") or {}).get("loss"), "base_exact_match": (s.get("base") or {}).get("exact_match"),
                     "seconds": round(time.perf_counter() - t0, 1),
                     "round_seconds_median": statistics.median(r["round_seconds"] - r.get("eval_seconds", 0) for r in recs),
                     "bytes_up_per_client": statistics.median(c["bytes_up"] for r in recs for c in r["clients"])})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next((r for r in rows if r["base_loss"] is not None), None)
    lines = ["| run | ε spent (δ = 1e-5) | noise multiplier | noise std per coordinate of the mean | held-out loss | exact match | s per round | bytes up per client |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if base:
        lines.append(f"| base model (no tuning) | - | - | - | {base['base_loss']:.4f} | {100 * base['base_exact_match']:.1f}% | - | - |")
    for r in rows:
        spent = "∞" if r["epsilon_spent"] is None or r["epsilon_spent"] > 1e6 else f"{r['epsilon_spent']:.3g}"
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3g}"
        std = "-" if r["noise_std_of_mean"] is None else f"{r['noise_std_of_mean']:.2e}"
        em = "-" if r["exact_match"] is None else f"{100 * r['exact_match']:.1f}%"
        lines.append(f"| {r['name']} | {spent} | {z} | {std} | {r['loss']:.4f} | {em} | "
                     f"{r['round_seconds_median']:.1f} | {r['bytes_up_per_client'] / 1e3:.1f} KB |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "table": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
