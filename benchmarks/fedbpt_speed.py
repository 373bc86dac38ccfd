"""FedBPT: candidate evaluations per second, batched vs one at a time, and bytes per client
per round in both server modes.

Speed: the same client, the same shard, the same CMA-ES candidates, evaluated through the
black box with one batched forward per population (`fedbpt.batch_population = true`,
fedtune's default) or one forward per candidate (how the reference evaluates), alternating
in this process, `--reps` times; medians. Measured at two population sizes and three shard
sizes (the 32 rows of 16-shot SST-2 split over 10, 3 and 1 clients), with two templates:
BBT's, the prompt first (`prompt-first`), where batching can only amortize the fixed cost of
a forward until the model's saturated tokens/s; and one with the sentence before the prompt
(`text-first`), where a causal LM runs each sentence once for the whole population and every
candidate attends to its cached keys/values (`fedbpt.share_context`), so batching also cuts
the work. The table prints the tokens/s of both paths to show where the ceiling is.

Bytes: one simulator round with 3 clients in each server mode; the simulator counts the
safetensors bytes of what each client receives and sends (`improved`: mean + sigma down,
mean + fitness + step sizes up; `reference`: the CMA-ES covariance travels too).

Run:  .venv/bin/python benchmarks/fedbpt_speed.py        (a few minutes on 2 shared cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "glue_sst2"


def config(extra: list[str], overrides: list[str] = ()):
    """The benchmark's SST-2 configuration, then `extra`, then the user's --set `overrides`."""
    from fedtune import config as C

    return C.load(None, ["run.algorithm='fedbpt'", f"task.train_path='{SST2 / 'train.tsv'}'",
                         f"task.test_path='{SST2 / 'dev.tsv'}'", "task.k_shot=16", "task.dev_shots=4",
                         "task.test_max_rows=8", "partition.method='iid'",
                         "fedbpt.n_prompt_tokens=10", "fedbpt.perturb=false", "model.dtype='bfloat16'",
                         "run.progress=false", *extra, *overrides])


def time_population(app, z: np.ndarray, shard, reps: int) -> tuple[float, float]:
    """Median seconds to evaluate the candidates z on the shard: (batched, one at a time),
    alternating `reps` times after a warm-up; leaves the client batching again."""
    app.evaluate(z, shard, None)  # warm-up
    times = {True: [], False: []}
    for _ in range(reps):
        for batched in (True, False):
            app.s.batch_population = batched
            t = time.perf_counter()
            app.evaluate(z, shard, None)
            times[batched].append(time.perf_counter() - t)
    app.s.batch_population = True
    return statistics.median(times[True]), statistics.median(times[False])


# SST-2 templates: BBT's (the prompt first, as the reference) and one with the text before the
# prompt, whose text a causal LM runs once for the whole population (fedbpt.share_context)
TEMPLATES = {"prompt-first": "<P> . {sentence} . It was <mask> .", "text-first": "{sentence} . <P> . It was <mask> ."}


def candidate_speed(popsize: int, clients: int, reps: int, template: str = "prompt-first",
                    overrides: list[str] = ()) -> dict:
    from fedtune.fedbpt.session import FedBPTSession as FedBPT, prepare_task

    cfg = config([f"fedbpt.popsize={popsize}", f"partition.num_clients={clients}", f"task.template={TEMPLATES[template]!r}"],
                 overrides)
    fed = FedBPT(cfg, prepare_task(cfg))
    app = fed.client_app()
    shard = fed.shards["client_000"]
    z = np.random.default_rng(0).standard_normal((popsize, cfg.fedbpt.intrinsic_dim))
    b, s = time_population(app, z, shard, reps)
    return {"template": template, "popsize": popsize, "clients": clients, "rows": len(shard),
            "tokens_per_row": float(shard.enc.attention_mask.sum(1).mean()),
            "batched_per_s": popsize / b, "one_at_a_time_per_s": popsize / s, "ratio": s / b}


def padding_of_test_rows(overrides: list[str] = (), rows: int = 300) -> dict:
    """Padded tokens of one pass over SST-2 dev rows: forwards planned by length (the black
    box's plan) vs every row padded to the longest. No forward runs: the plan is arithmetic."""
    from fedtune.core.batching import plan_forwards
    from fedtune.fedbpt.session import FedBPTSession as FedBPT, prepare_task

    cfg = config([f"task.test_max_rows={rows}", "partition.num_clients=1"], overrides)
    task = prepare_task(cfg)
    box = FedBPT(cfg, task).model.box
    lengths = box.encode_texts(task.spec, [e.texts for e in task.test]).attention_mask.sum(1)
    plan = plan_forwards(lengths, 1, box.max_forward_rows, box.forward_overhead_tokens)
    return {"rows": len(lengths), "real_tokens": int(lengths.sum()), "planned_forwards": len(plan),
            "planned_padded": int(sum(len(r) * w for r, w in plan)), "longest_padded": int(len(lengths) * lengths.max())}


def bytes_per_round(mode: str, overrides: list[str] = ()) -> dict:
    from fedtune.engines.simulator import Simulator, SimulatorSettings
    from fedtune.fedbpt.session import FedBPTSession as FedBPT, prepare_task

    cfg = config([f"fedbpt.mode='{mode}'", "fedbpt.popsize=5", "fedbpt.local_iter=1", "run.rounds=1",
                  "partition.num_clients=3"], overrides)
    fed = FedBPT(cfg, prepare_task(cfg))
    state = Simulator(fed.strategy(), fed.client_app(), list(fed.shards),
                      SimulatorSettings(rounds=1, progress=False)).run()
    cl = state.history[-1]["clients"]
    return {"mode": mode, "down": max(c["bytes_down"] for c in cl), "up": max(c["bytes_up"] for c in cl),
            "intrinsic_dim": cfg.fedbpt.intrinsic_dim}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="FedBPT candidate evaluations per second and bytes per round")
    ap.add_argument("--popsizes", default="5,20")
    ap.add_argument("--clients", default="10,3,1",
                    help="split the 32 training rows (16-shot) over this many clients: shard sizes of about 3, 11, 32 rows")
    ap.add_argument("--templates", default="prompt-first,text-first",
                    help=f"SST-2 templates to time: {', '.join(f'{k} = {v!r}' for k, v in TEMPLATES.items())}")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. fedbpt.forward_overhead_tokens=128")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not (SST2 / "train.tsv").is_file():
        print(f"skipped: {SST2} not found")
        return 0
    print(f"load average at start: {os.getloadavg()}", flush=True)
    speeds = [candidate_speed(int(p), int(c), args.reps, t, args.overrides) for t in args.templates.split(",")
              for c in args.clients.split(",") for p in args.popsizes.split(",")]
    sizes = [bytes_per_round(m, args.overrides) for m in ("improved", "reference")]
    pad = padding_of_test_rows(args.overrides)
    print(f"\ncandidate evaluations per second (SST-2, one client's shard, medians of {args.reps}):")
    print(f"{'template':>12} {'clients':>7} {'popsize':>7} {'rows':>5} {'tokens/row':>10} {'batched':>9} {'one at a time':>14} {'ratio':>6} {'tok/s batched':>14} {'tok/s one':>10}")
    for s in speeds:
        print(f"{s['template']:>12} {s['clients']:7d} {s['popsize']:7d} {s['rows']:5d} {s['tokens_per_row']:10.1f} {s['batched_per_s']:9.2f} "
              f"{s['one_at_a_time_per_s']:14.2f} {s['ratio']:5.2f}x "
              f"{s['batched_per_s'] * s['rows'] * s['tokens_per_row']:14.0f} "
              f"{s['one_at_a_time_per_s'] * s['rows'] * s['tokens_per_row']:10.0f}")
    print(f"\npadding, one pass over {pad['rows']} SST-2 dev rows ({pad['real_tokens']:,} real tokens): planned by length "
          f"{pad['planned_padded']:,} padded tokens in {pad['planned_forwards']} forwards; padded to the longest row "
          f"{pad['longest_padded']:,}")
    print(f"\nbytes per client per round (d = {sizes[0]['intrinsic_dim']}, safetensors payloads):")
    for s in sizes:
        print(f"  {s['mode']:9}: {s['down']:>9,} down · {s['up']:>7,} up")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": args.overrides, "speed": speeds, "bytes": sizes, "padding": pad},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
