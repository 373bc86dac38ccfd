"""The cost of secure aggregation, side by side with plain aggregation in one run.

Numpy clients return a LoRA-adapter-sized update (the embedded SmolLM2-135M's r = 8 adapter on
q_proj and v_proj: 460,800 float32 values) without training, so the numbers are the protocol's
own cost: bytes per client per round (all four exchanges, as the round driver records them) and
seconds per round (every client's masking and the server's unmasking, in one process), for 10
and 100 clients. Secure aggregation with 10 clients masks with all 9 others; with 100 clients it
uses SecAgg+'s sparse ring of `--neighbours` (10 by default).

Run:  .venv/bin/python benchmarks/secagg_cost.py --json docs/benchmarks/secagg_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ADAPTER = 460_800  # SmolLM2-135M, r = 8 on q_proj and v_proj (30 layers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="10,100")
    ap.add_argument("--neighbours", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from fedtune.core.secagg import SecAggSettings
    from fedtune.core.secagg_client import SecAggClient
    from fedtune.core.strategy import FitRes
    from fedtune.engines.simulator import Simulator, SimulatorSettings
    from fedtune.fedit.strategy import FedAvgStrategy

    class Clients:
        def fit(self, cid, ins):
            rng = np.random.default_rng(abs(hash(cid)) % 2**32)
            return FitRes(cid, {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
                                for k, v in ins.arrays.items()}, 10, {})

    initial = {"a.lora_A.weight": np.zeros((ADAPTER // 2,), np.float32),
               "a.lora_B.weight": np.zeros((ADAPTER // 2,), np.float32)}
    rows = []
    for n in (int(x) for x in args.clients.split(",")):
        ids = [f"c{i:03d}" for i in range(n)]
        k = 0 if n <= args.neighbours + 1 else args.neighbours
        for mode in ("plain", "secagg"):
            sa = SecAggSettings(neighbours=k) if mode == "secagg" else None
            app = SecAggClient(Clients()) if sa else Clients()
            t0 = time.perf_counter()
            state = Simulator(FedAvgStrategy(initial, seed=0, secagg=sa), app, ids,
                              SimulatorSettings(rounds=args.rounds, progress=False)).run()
            wall = time.perf_counter() - t0
            recs = state.history
            per_client = [c["bytes_down"] + c["bytes_up"] for r in recs for c in r["clients"]]
            rows.append({"clients": n, "mode": mode, "neighbours": (k or n - 1) if sa else None,
                         "bytes_per_client_round": int(np.mean(per_client)),
                         "seconds_per_round": round(wall / args.rounds, 2)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = ["| clients | aggregation | neighbours | bytes per client per round | seconds per round |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['mode']} | {r['neighbours'] or '-'} | "
                     f"{r['bytes_per_client_round'] / 1e6:.2f} MB | {r['seconds_per_round']:.2f} |")
    plain = {r["clients"]: r for r in rows if r["mode"] == "plain"}
    for r in rows:
        if r["mode"] == "secagg":
            p = plain[r["clients"]]
            lines.append(f"\n{r['clients']} clients: secure aggregation costs {r['bytes_per_client_round'] / p['bytes_per_client_round']:.2f}x "
                         f"the bytes and {r['seconds_per_round'] / max(p['seconds_per_round'], 1e-9):.1f}x the seconds of plain aggregation")
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_average": os.getloadavg()[0], "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
