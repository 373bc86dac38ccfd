"""Utility against epsilon: client-level DP-FedAvg on a federation with enough clients for DP
to make sense, at epsilon = infinity (no DP), 8, 3 and 1 (delta = 1e-5).

The generated skills data (the demo's six skills) split over `--clients` clients (category
shards), `--per-round` of them sampled each round without replacement, the embedded
SmolLM2-135M; every run has the same data, seed and local budget and differs only in
[privacy]. The noise multiplier of each epsilon is calibrated by dp-accounting for the
planned rounds. The table: held-out loss and exact match of the final global adapter, the
noise multiplier, and the epsilon actually spent (from the run's own metrics).

Run:  .venv/bin/python benchmarks/privacy.py --out runs/privacy --json docs/benchmarks/privacy.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "fedtune" / "configs" / "demo.toml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clip", type=float, default=0.5)
    ap.add_argument("--epsilons", default="inf,8,3,1")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default="runs/privacy")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from fedtune import config as C
    from fedtune import runner

    common = [f"partition.num_clients={args.clients}", f"server.clients_per_round={args.per_round}",
              f"run.rounds={args.rounds}", "partition.method='shards'", "run.progress=false",
              "run.save_every_round=false", *args.overrides]
    rows = []
    for i, eps in enumerate(float(e) for e in args.epsilons.split(",")):
        dp = [] if math.isinf(eps) else ["privacy.mode='central'", f"privacy.target_epsilon={eps}",
                                        f"privacy.clip={args.clip}"]
        once = [] if i == 0 else ["eval.compare_base=false"]
        cfg = C.load(str(DEMO), common + dp + once)
        run_dir = Path(args.out) / (f"eps_{eps:g}" if dp else "no_dp")
        run_dir.mkdir(parents=True, exist_ok=False)
        C.save(cfg, run_dir / "config.toml")
        t0 = time.perf_counter()
        s = runner.run(cfg, run_dir)
        final, pv = s["final"], s.get("privacy", {})
        rows.append({"target_epsilon": eps, "epsilon_spent": pv.get("epsilon"), "noise_multiplier": pv.get("noise_multiplier"),
                     "loss": final.get("loss"), "exact_match": final.get("exact_match"),
                     "base_loss": (s.get("base") or {}).get("loss"), "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = ["| target ε | ε spent | noise multiplier | held-out loss | exact match |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        spent = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3g}"
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3g}"
        em = "-" if r["exact_match"] is None else f"{100 * r['exact_match']:.1f}%"
        lines.append(f"| {r['target_epsilon']:g} | {spent} | {z} | {r['loss']:.4f} | {em} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
