"""Peak RSS of the embedded simulator with 10, 100 and 1,000 clients (FedIT and FedBPT).

Each (algorithm, client count) runs in a fresh Python process, so one measurement cannot
inherit another's heap. The data set is the same for every client count (it is split
more finely), so what grows with the count is what the engine and the clients hold per
client: shards, ids, per-client records, and (when many clients report in one round)
their updates. Every client trains in the measured round (`server.fraction = 1`): the
worst case for the server. A second FedIT setting draws 10 clients per round
(`server.clients_per_round = 10`), as a large federation would.

FedIT trains on generated rows that all have one token length (see child_fedit), and the
child takes one warm-up step before measuring: every step then has the same input shapes,
so oneDNN's per-shape kernels and allocator arenas are not blamed on the client count.
The child reports ru_maxrss (peak RSS) after loading the model and data and the warm-up
(`setup`) and after one round (`peak`); the parent prints the growth from 10 clients
against the budget: FedIT <= 2 x the adapter's own size, FedBPT <= 1 GB.

Run:  .venv/bin/python benchmarks/memory_rss.py          (about 10-20 minutes on 2 shared cores)
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "glue_sst2" / "train.tsv"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_fedit(n: int, per_round: int) -> dict:
    from fedtune import config as C
    from fedtune.core.arrays import nbytes
    from fedtune.engines.simulator import Simulator, SimulatorSettings
    from fedtune.core.strategy import FitIns
    from fedtune.fedit.client import FedITClientApp
    from fedtune.fedit.session import FedITSession as FedIT, prepare_data
    from fedtune.fedit.train import padded_width

    # 3,000 rows for every client count (1,000 clients: 3 rows each), all of one token length:
    # every training step has the same input shapes whatever the client count, so the growth
    # measured is what the clients cost, not oneDNN kernels and allocator arenas for shapes
    # that a larger round happens to meet (with the demo data, whose rows vary in length,
    # peak RSS rose by 40-90 MB from 10 to 100 clients for that reason alone).
    path = Path(tempfile.mkdtemp()) / "repeat.jsonl"
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(3000):
            words = " ".join(rng.choice(["red", "blue", "green", "gold"]) for _ in range(8))
            f.write(json.dumps({"instruction": f"Repeat: {words}", "context": "", "response": words,
                                "category": "repeat"}) + "\n")
    cfg = C.load(None, [f"data.path='{path}'", "partition.method='iid'", f"partition.num_clients={n}",
                        "partition.test_per_category=2", "train.max_steps=1", "train.batch_size=1",
                        "train.micro_batch_size=1", "run.progress=false", "eval.generate=false",
                        "run.rounds=1", f"server.clients_per_round={per_round}"])
    fed = FedIT(cfg, prepare_data(cfg))
    app = fed.client_app()
    # Warm-up: one local step on a row of every padded width the data holds, before anything
    # is measured. Each new input shape makes oneDNN build and keep kernels (tens of MB):
    # without this, the client count would be blamed for the shapes that a round happens to
    # meet (a round of 10 clients meets fewer widths than a round of 100).
    by_width = {}
    for rows in fed.client_data.values():
        for t in rows:
            by_width.setdefault(padded_width(len(t)), t)
    warm = FedITClientApp(app.slot, {f"warm_{w}": [t] for w, t in sorted(by_width.items())}, app.train_cfg,
                          seed=cfg.run.seed, pad_id=app.pad_id, device=app.device, amp=app.amp)
    for cid in warm.data:
        warm.fit(cid, FitIns(fed.initial, {"round": 0}))
    setup = peak_mb()
    sim = Simulator(fed.strategy(), app, list(fed.client_data),
                    SimulatorSettings(rounds=1, min_clients=1, progress=False))
    t0 = time.perf_counter()
    state = sim.run()
    shapes = {(len(t), sum(x != -100 for x in t.labels)) for rows in fed.client_data.values() for t in rows}
    return {"setup_mb": setup, "peak_mb": peak_mb(), "seconds": time.perf_counter() - t0,
            "clients_in_round": len(state.history[-1]["clients"]), "payload_bytes": nbytes(fed.initial),
            "distinct_row_shapes": len(shapes)}


def child_fedbpt(n: int, per_round: int) -> dict:
    from fedtune import config as C
    from fedtune.engines.simulator import Simulator, SimulatorSettings
    from fedtune.fedbpt.session import FedBPTSession as FedBPT, prepare_task

    # SST-2, 500 rows per class = 1,000 training rows for every client count (1,000 clients: 1 row each)
    cfg = C.load(None, ["run.algorithm='fedbpt'", f"task.train_path='{SST2}'", f"task.test_path='{SST2}'",
                        "task.k_shot=500", "task.dev_shots=2", "task.test_max_rows=2", "partition.method='iid'",
                        f"partition.num_clients={n}", "partition.min_client_size=1", "fedbpt.n_prompt_tokens=10",
                        "fedbpt.popsize=5", "fedbpt.local_iter=1", "fedbpt.perturb=false", "model.dtype='bfloat16'",
                        "run.progress=false", "run.rounds=1", f"server.clients_per_round={per_round}"])
    fed = FedBPT(cfg, prepare_task(cfg))
    setup = peak_mb()
    strategy = fed.strategy()
    sim = Simulator(strategy, fed.client_app(), list(fed.shards), SimulatorSettings(rounds=1, min_clients=1,
                                                                                      progress=False))
    t0 = time.perf_counter()
    state = sim.run()
    return {"setup_mb": setup, "peak_mb": peak_mb(), "seconds": time.perf_counter() - t0,
            "clients_in_round": len(state.history[-1]["clients"]),
            "payload_bytes": int(sum(v.nbytes for v in strategy.initial_arrays().values()))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="peak RSS of the simulator with 10, 100, 1,000 clients")
    ap.add_argument("--child", nargs=3, metavar=("ALGO", "N", "PER_ROUND"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--settings", default="fedit:all,fedit:10,fedbpt:all",
                    help="algorithm:per-round pairs; per-round 'all' = every client in the round")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.child:
        algo, n, per_round = args.child[0], int(args.child[1]), int(args.child[2])
        out = (child_fedit if algo == "fedit" else child_fedbpt)(n, per_round)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    results = {}
    sizes = [int(x) for x in args.sizes.split(",")]
    for setting in args.settings.split(","):
        algo, per = setting.split(":")
        if algo == "fedbpt" and not SST2.is_file():
            print(f"{setting}: skipped ({SST2} not found)")
            continue
        rows = []
        for n in sizes:
            per_round = 0 if per == "all" else min(int(per), n)
            p = subprocess.run([sys.executable, __file__, "--child", algo, str(n), str(per_round)],
                               capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{setting} with {n} clients failed (exit {p.returncode})")
            r = json.loads(line[7:])
            r["clients"] = n
            rows.append(r)
            widths = f" · {r['distinct_row_shapes']} row shape(s)" if "distinct_row_shapes" in r else ""
            print(f"  {setting:11} {n:5d} clients ({r['clients_in_round']} in the round): setup {r['setup_mb']:7.1f} MB · "
                  f"peak {r['peak_mb']:7.1f} MB · round {r['seconds']:6.1f} s{widths}", flush=True)
        results[setting] = rows
    print(f"\n{'setting':12} {'clients':>7} {'peak RSS MB':>12} {'vs 10 clients':>14} {'payload':>10} {'budget':>10}  verdict")
    for setting, rows in results.items():
        base = rows[0]["peak_mb"]
        payload = rows[0]["payload_bytes"] / 2**20
        budget = 2 * payload if setting.startswith("fedit") else 1024.0
        for r in rows:
            grow = r["peak_mb"] - base
            verdict = "" if r is rows[0] else ("within budget" if grow <= budget else "OVER budget")
            print(f"{setting:12} {r['clients']:7d} {r['peak_mb']:12.1f} {grow:+14.1f} {payload:9.2f}M "
                  f"{budget:9.2f}M  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
