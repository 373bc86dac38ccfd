"""Round overhead: the share of a FedIT round's wall time not spent in local training steps.

10 clients of the embedded model train every round in the embedded simulator, as
`fedtune run` wires them (FedIT recipe objects, payloads packed to safetensors bytes and
back, a checkpoint and the round's adapter written after every round). Held-out
evaluation is switched off: it is work of its own, not overhead of a round.

Each client reports `compute_seconds`: the time inside its optimizer steps (collate,
forward, backward, clipping, AdamW step). The overhead is everything else in the wall
time of `Simulator.run`, split into:

- client setup: inside the client's `fit` but outside its steps (loading the global
  adapter into the model, a new optimizer, reading the adapter back);
- engine: packing and unpacking payloads, reply checks, aggregation, the progress bar;
- after the round: metrics.jsonl, the atomic checkpoint and the round's PEFT adapter.

Run:  .venv/bin/python benchmarks/round_overhead.py            (2-5 minutes on 2 shared cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="share of a round's wall time not spent in training steps")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=4, help="local optimizer steps per client per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from fedtune import config as C
    from fedtune.engines.simulator import Simulator, SimulatorSettings
    from fedtune.fedit.session import FedITSession as FedIT, prepare_data

    cfg = C.load(None, [f"partition.num_clients={args.clients}", f"train.max_steps={args.max_steps}",
                        f"train.batch_size={args.batch_size}", f"train.micro_batch_size={args.batch_size}",
                        f"run.rounds={args.rounds}", "run.progress=true", "eval.generate=false"])
    fed = FedIT(cfg, prepare_data(cfg))
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        sim = Simulator(fed.strategy(), fed.client_app(), list(fed.client_data),
                        SimulatorSettings(rounds=args.rounds, min_clients=1, progress=True),
                        on_round_end=lambda rnd, arrays, rec: fed.save(arrays, run_dir / "rounds" / f"round_{rnd:03d}"),
                        run_dir=run_dir)
        t0 = time.perf_counter()
        state = sim.run()
        wall = time.perf_counter() - t0
    clients = [c for r in state.history for c in r["clients"]]
    compute = sum(c["compute_seconds"] for c in clients)
    in_fit = sum(c["train_seconds"] for c in clients)  # the client's own timer around train_local
    engine_client = sum(c["seconds"] for c in clients)  # the engine's timer around fit()
    rounds = sum(r["round_seconds"] for r in state.history)
    tokens = sum(c["tokens"] for c in clients)
    parts = {
        "training steps (compute_seconds)": compute,
        "client setup (in fit, outside steps)": engine_client - compute,
        "engine (pack/unpack, checks, aggregation)": rounds - engine_client,
        "after the round (metrics, checkpoint, adapter)": wall - rounds,
    }
    print(f"\n{args.clients} clients x {args.rounds} rounds x {args.max_steps} steps of {args.batch_size} rows "
          f"(demo data, {tokens / len(clients) / args.max_steps / args.batch_size:.0f} tokens per row); "
          f"wall {wall:.1f} s; load average at end: {os.getloadavg()}")
    for name, sec in parts.items():
        print(f"  {name:48} {sec:8.2f} s  {100 * sec / wall:6.2f}%")
    overhead = 1 - compute / wall
    print(f"round overhead (share of wall time outside training steps): {100 * overhead:.2f}%  (target <= 3%)")
    print(f"  of which inside train_local but outside steps: {in_fit - compute:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "wall": wall, "parts": parts,
                                               "overhead": overhead}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
