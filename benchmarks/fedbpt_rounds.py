"""Round by round, what FedBPT's global prompt does on the dev split, from finished run folders
(their metrics.jsonl and summary.json; trains nothing).

For each folder: the zero prompt's dev loss and accuracy (round 0), every round's, and the
test loss and accuracy of the zero prompt, the best-by-dev prompt and the final round's. It
shows whether a run's search moves the prompt downhill on rows it never ranked candidates on
(the dev split), or drifts.

    .venv/bin/python benchmarks/fedbpt_rounds.py runs/sst2_sig03/generation+search_seed1 \
        runs/bpt_accept/generation+search_seed1 --json docs/benchmarks/fedbpt_rounds_sst2_seed1.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedtune import config as C
from fedtune.fedbpt.es import initial_sigma
from fedtune.reporting import read_metrics


def read_run(folder: Path) -> dict:
    """The trajectory of one run folder; a clear error naming the file that is missing or short."""
    metrics, summary = folder / "metrics.jsonl", folder / "summary.json"
    for f in (metrics, summary, folder / "config.toml"):
        if not f.is_file():
            sys.exit(f"error: {f} not found (a finished FedBPT run folder holds metrics.jsonl, summary.json and "
                     "config.toml)")
    s = json.loads(summary.read_text())
    if s.get("algorithm") != "fedbpt":
        sys.exit(f"error: {summary}: algorithm is {s.get('algorithm')!r}, not 'fedbpt'")
    rounds = []
    for n, rec in enumerate(read_metrics(folder), 1):  # fedtune writes one record a line
        ev = rec.get("eval", {})
        if "dev_loss" not in ev:
            sys.exit(f"error: {metrics}, line {n}: no eval.dev_loss (the run evaluated no dev split that round)")
        rounds.append({"round": rec["round"], "dev_loss": ev["dev_loss"], "dev_accuracy": ev["dev_accuracy"],
                       "sigma": rec.get("aggregate", {}).get("sigma"),
                       "mean_norm": rec.get("aggregate", {}).get("mean_norm")})
    fb = C.load(folder / "config.toml").fedbpt  # the run's settings, with the documented defaults filled in
    zero, best, final = s["zero_prompt"], s["best"], s["final"]
    return {"folder": str(folder), "sigma0": initial_sigma(fb), "mean_lr": fb.mean_lr, "rounds": rounds,
            "zero_prompt": {"dev_loss": zero["dev"]["loss"], "dev_accuracy": zero["dev"]["accuracy"],
                            "test_loss": zero["test"]["loss"], "test_accuracy": zero["test"]["accuracy"]},
            "best": {"round": best["round"], "test_loss": best["test"]["loss"],
                     "test_accuracy": best["test"]["accuracy"]},
            "final": {"round": final["round"], "test_loss": final["test"]["loss"],
                      "test_accuracy": final["test"]["accuracy"]}}


def norm(rnd: dict) -> str:
    return "-" if rnd["mean_norm"] is None else f"{rnd['mean_norm']:.1f}"


def table(runs: list[dict]) -> str:
    lines = ["| run | sigma0 | mean_lr | dev loss: round 0 -> each round | dev loss, last - round 0 "
             "| lowest dev loss (round) | test loss zero / best / final | test accuracy zero / best (round) / final "
             "| mean's norm, round 1 -> last |", "|---|---:|---:|---|---:|---|---|---|---|"]
    for r in runs:
        z, b, f = r["zero_prompt"], r["best"], r["final"]
        path = " ".join(f"{x['dev_loss']:.3f}" for x in r["rounds"])
        low = min(r["rounds"], key=lambda x: x["dev_loss"])
        lines.append(f"| {r['folder']} | {r['sigma0']} | {r['mean_lr']} | {z['dev_loss']:.3f} -> {path} "
                     f"| {r['rounds'][-1]['dev_loss'] - z['dev_loss']:+.3f} | {low['dev_loss']:.3f} ({low['round']}) "
                     f"| {z['test_loss']:.3f} / {b['test_loss']:.3f} / {f['test_loss']:.3f} "
                     f"| {100 * z['test_accuracy']:.1f}% / {100 * b['test_accuracy']:.1f}% ({b['round']}) / "
                     f"{100 * f['test_accuracy']:.1f}% | {norm(r['rounds'][0])} -> {norm(r['rounds'][-1])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="finished FedBPT run folders")
    ap.add_argument("--json", type=Path, help="also write the trajectories here")
    args = ap.parse_args(argv)
    runs = [read_run(f) for f in args.folders]
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
