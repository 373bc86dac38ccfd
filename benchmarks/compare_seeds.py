"""The gap between federated and centralized over several `fedtune compare` folders (one per seed).

Reads each folder's `compare.json` (and, for a variant a folder lacks, the `summary.json` of a
`fedtune run` of the same config given with --extra NAME=RUN_DIR), and prints per variant the
held-out loss, ROUGE-L and exact match of every seed, their mean, and the mean gap in exact-match
points below the centralized variant of the same seed. No training: it only reads results.

    .venv/bin/python benchmarks/compare_seeds.py runs/cmp_s17 runs/cmp_s17_seed1 \
        --extra "runs/cmp_s17:federated fedavg=runs/demo_s16" --json docs/benchmarks/compare_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

METRICS = ("loss", "rouge_l", "exact_match")


def read_folder(folder: Path) -> dict[str, dict]:
    """variant name -> its final held-out metrics, from one compare folder."""
    path = folder / "compare.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (a finished `fedtune compare --out {folder}` writes it)")
    data = json.loads(path.read_text())
    return {name: {m: v["final"][m] for m in METRICS} for name, v in data["variants"].items()}


def read_run(run: Path) -> dict:
    path = run / "summary.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found")
    final = json.loads(path.read_text())["final"]
    return {m: final[m] for m in METRICS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="compare folders, one per seed")
    ap.add_argument("--extra", action="append", default=[],
                    help="FOLDER:VARIANT=RUN_DIR: the variant of that folder's seed, from a `fedtune run` folder")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    seeds = {str(f): read_folder(f) for f in args.folders}
    for spec in args.extra:
        head, _, run = spec.partition("=")
        folder, _, variant = head.partition(":")
        if folder not in seeds or not variant or not run:
            raise SystemExit(f"--extra {spec!r}: expected FOLDER:VARIANT=RUN_DIR with FOLDER one of {list(seeds)}")
        seeds[folder][variant] = read_run(Path(run))
    for folder, variants in seeds.items():
        if "centralized" not in variants:
            raise SystemExit(f"{folder}: no centralized variant to measure the gap against")

    names = sorted({n for v in seeds.values() for n in v}, key=lambda n: (n != "centralized", n))
    rows = []
    print(f"{'variant':34s} {'seeds':>5s} {'loss':>8s} {'ROUGE-L':>8s} {'EM':>7s} {'EM per seed':>24s} {'gap':>6s}")
    for name in names:
        runs = {f: v[name] for f, v in seeds.items() if name in v}
        em = [r["exact_match"] for r in runs.values()]
        gaps = [100 * (seeds[f]["centralized"]["exact_match"] - r["exact_match"]) for f, r in runs.items()]
        row = {"variant": name, "seeds": list(runs), "per_seed": runs,
               "mean": {m: statistics.fmean(r[m] for r in runs.values()) for m in METRICS},
               "gap_points_mean": statistics.fmean(gaps) if name != "centralized" else None,
               "gap_points_per_seed": gaps if name != "centralized" else None}
        rows.append(row)
        per = " / ".join(f"{100 * e:.1f}" for e in em)
        gap = f"{row['gap_points_mean']:6.1f}" if name != "centralized" else "      "
        print(f"{name:34s} {len(runs):5d} {row['mean']['loss']:8.4f} {100 * row['mean']['rouge_l']:7.1f}% "
              f"{100 * row['mean']['exact_match']:6.1f}% {per:>24s} {gap}")
    if args.json:
        Path(args.json).write_text(json.dumps({"folders": list(seeds), "extra": args.extra, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
