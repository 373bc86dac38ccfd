"""FedBPT on SST-2 with the embedded model: reference vs improved (same data, seeds and
budget), the zero-prompt baseline, and batched vs one-at-a-time population evaluation.

    .venv/bin/python benchmarks/fedbpt_sst2.py            # settings of configs/fedbpt_sst2_bbt.toml
    .venv/bin/python benchmarks/fedbpt_sst2.py --rounds 3 --audit-rows 0   # a quick look

Writes runs under --work (default runs/bench_fedbpt/), and docs/fedbpt_sst2.json and
docs/fedbpt_sst2.png. The test split (SST-2 dev.tsv) is never used for selection: each run
picks its prompt on its dev split; the per-round test curve (--audit-rows) is an audit
after the fact, on a fixed subset, from the prompts saved each round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedtune import config as C  # noqa: E402
from fedtune.data import partition as P  # noqa: E402
from fedtune import runner as recipe  # noqa: E402
from fedtune.fedbpt import session as bpt  # noqa: E402
from fedtune.fedbpt.prompt import load_prompt  # noqa: E402
from fedbpt_speed import time_population  # noqa: E402  (benchmarks/ is on sys.path: this script's folder)


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "fedbpt_sst2_bbt.toml"))
    p.add_argument("--rounds", type=int, help="override run.rounds")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--audit-rows", type=int, default=100, help="per-round test audit on this many rows (0 = off)")
    p.add_argument("--speed-reps", type=int, default=5, help="repetitions of the batched / one-at-a-time timing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine more threads spin against other jobs)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_fedbpt"))
    p.add_argument("--out", default=str(ROOT / "docs" / "fedbpt_sst2"), help="writes OUT.json and OUT.png")
    return p.parse_args()


def run_mode(cfg, mode: str, work: Path) -> dict:
    import shutil

    cfg = C.from_dict({**cfg.to_dict(), "fedbpt": {**cfg.to_dict()["fedbpt"], "mode": mode}}, "benchmark")
    run_dir = work / mode
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    C.save(cfg, run_dir / "config.toml")
    t = time.perf_counter()
    summary = recipe.run(cfg, run_dir, console=_Console())
    summary["wall_seconds"] = round(time.perf_counter() - t, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "history": history, "run_dir": str(run_dir)}


class _Console:
    def print(self, msg):
        print(msg, flush=True)


def speed(fed, reps: int) -> dict:
    """Candidates per second, one batched forward per population vs one forward per candidate,
    on the same rows and the same candidates, interleaved, in this process."""
    app = fed.client_app()
    popsize = fed.cfg.fedbpt.popsize
    z = np.random.default_rng(0).standard_normal((popsize, fed.cfg.fedbpt.intrinsic_dim))
    out = {}
    shards = {"one client's shard": fed.shards["client_000"]}
    # every training row in one shard: what a client with more data (or the reference's 40 rows) sees
    from fedtune.fedbpt.client import Shard

    all_rows = fed.data.train
    shards["all training rows"] = Shard(fed.model.box.encode_texts(fed.spec, [e.texts for e in all_rows]),
                                        np.array([e.label for e in all_rows]))
    for name, shard in shards.items():
        b, s = time_population(app, z, shard, reps)
        out[name] = {"rows": len(shard), "tokens_per_candidate": int(shard.enc.attention_mask.sum()),
                     "batched_candidates_per_s": popsize / b, "one_at_a_time_candidates_per_s": popsize / s,
                     "speedup": s / b, "reps": reps}
        print(f"speed [{name}, {len(shard)} rows]: batched {popsize / b:.2f} cand/s, one at a time "
              f"{popsize / s:.2f} cand/s, x{s / b:.2f}", flush=True)
    return out


def audit(fed, runs: dict, rows: int) -> dict:
    """Test metric of every round's global prompt on a fixed subset (after the fact; not used)."""
    test = P.stratified_subset(fed.data.test, [str(e.label) for e in fed.data.test], rows)
    ev = bpt.encode_eval(fed.model.box, fed.spec, test, fed.cfg.eval.batch_size)
    out = {"rows": len(test), "zero": fed.model.evaluate(None, ev)["score"]}
    for mode, r in runs.items():
        curve = []
        for rec in r["history"]:
            z, _, _ = load_prompt(Path(r["run_dir"]) / "rounds" / f"round_{rec['round']:03d}")
            curve.append(fed.model.evaluate(z, ev)["score"])
        out[mode] = curve
        print(f"audit {mode}: " + " ".join(f"{x:.3f}" for x in curve), flush=True)
    return out


def plot(runs: dict, aud: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 4 if aud else 3
    fig, ax = plt.subplots(1, n, figsize=(4.2 * n, 3.6))
    for mode, r in runs.items():
        s, h = r["summary"], r["history"]
        rounds = [0] + [x["round"] for x in h]
        ax[0].plot(rounds, [s["zero_prompt"]["dev"]["score"]] + [x["eval"]["dev_score"] for x in h], marker=".", label=mode)
        ax[1].plot([x["round"] for x in h], [x["aggregate"]["sigma"] for x in h], marker=".", label=mode)
        ax[2].plot([x["round"] for x in h], [x["aggregate"]["mean_norm"] for x in h], marker=".", label=mode)
        if aud:
            ax[3].plot(rounds, [aud["zero"]] + aud[mode], marker=".", label=mode)
    ax[0].set(title="global prompt: dev accuracy", xlabel="round")
    ax[1].set(title="sigma sent to clients", xlabel="round")
    ax[2].set(title="|z| (global mean)", xlabel="round")
    if aud:
        ax[3].set(title=f"audit: test accuracy ({aud['rows']} rows)", xlabel="round")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    args = parse()
    import torch

    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the config's data paths are relative to the repository root
    overrides = list(args.overrides) + ([f"run.rounds={args.rounds}"] if args.rounds else [])
    overrides += ["run.progress=false", "run.save_every_round=true"]
    cfg = C.load(args.config, overrides)
    work = Path(args.work)
    t0 = time.perf_counter()
    runs = {mode: run_mode(cfg, mode, work) for mode in ("reference", "improved")}
    fed = bpt.FedBPTSession(cfg, bpt.prepare_task(cfg))  # the same model, data and seeds, for timing and the audit
    sp = speed(fed, args.speed_reps)
    aud = audit(fed, runs, args.audit_rows) if args.audit_rows else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, aud, out.with_suffix(".png"))
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/fedbpt_sst2.py", *sys.argv[1:]]),
        "config": cfg.to_dict(),
        "modes": {m: {k: r["summary"][k] for k in ("zero_prompt", "best", "final", "communication", "selected",
                                                   "wall_seconds", "client_sizes", "dev_rows", "test_rows")}
                  for m, r in runs.items()},
        "per_round": {m: [{"round": x["round"], "dev_accuracy": x["eval"]["dev_accuracy"], "dev_loss": x["eval"]["dev_loss"],
                           "sigma": x["aggregate"]["sigma"], "mean_norm": x["aggregate"]["mean_norm"],
                           "seconds": x["round_seconds"]} for x in r["history"]] for m, r in runs.items()},
        "speed": sp, "audit": aud, "seconds": round(time.perf_counter() - t0, 1), "torch_threads": args.threads,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


def table(res: dict) -> str:
    lines = ["| mode | zero prompt test | best-by-dev round | best-by-dev test | final-round test | final - best | "
             "bytes down / up per client-round |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m, r in res["modes"].items():
        b, f, c = r["best"], r["final"], r["communication"]
        lines.append(f"| {m} | {100 * r['zero_prompt']['test']['score']:.1f}% | {b['round']} | "
                     f"{100 * b['test']['score']:.1f}% | {100 * f['test']['score']:.1f}% | "
                     f"{100 * (f['test']['score'] - b['test']['score']):+.1f} | "
                     f"{c['bytes_down_per_client_round_max']:,} / {c['bytes_up_per_client_round_max']:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
