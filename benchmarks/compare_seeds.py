"""The gap between federated and centralized over several `fedtune compare` folders (one per seed).

Reads each folder's `compare.json` (and, for a variant a folder lacks, the `summary.json` of a
`fedtune run` of the same config given with --extra NAME=RUN_DIR), and prints per variant the
held-out loss, ROUGE-L and exact match of every seed, their mean, and the mean gap in exact-match
points below the centralized variant of the same seed. No training: it only reads results.

    .venv/bin/python benchmarks/compare_seeds.py runs/cmp_s17 runs/cmp_s17_seed1 \
        --extra "runs/cmp_s17:federated fedavg=runs/demo_s16" --json docs/benchmarks/compare_seeds.json

One seed may be several folders joined by "+" (the same seed run at other settings, such as another
`train.lr`); `--tag FOLDER=SUFFIX` appends SUFFIX to that folder's variant names. Each variant's gap is
then measured against the centralized variant of its own folder (the same settings), and also
against the centralized setting with the best mean exact match over the seeds (each side at its best
setting, chosen once for all seeds):

    .venv/bin/python benchmarks/compare_seeds.py runs/cmp_s17+runs/cmp_lr4 --tag "runs/cmp_lr4= @lr4e-3"
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


def read_seed(spec: str, tags: dict[str, str]) -> tuple[dict[str, dict], dict[str, str]]:
    """One seed: variant name -> metrics over its folders ('+'-joined), and variant -> its folder's centralized."""
    merged: dict[str, dict] = {}
    own: dict[str, str] = {}
    for part in spec.split("+"):
        tag = tags.get(part, "")
        for name, metrics in read_folder(Path(part)).items():
            if name + tag in merged:
                raise SystemExit(f"{spec}: variant {name + tag!r} is in two of its folders; name them apart with "
                                 f"--tag {part}=SUFFIX")
            merged[name + tag] = metrics
            own[name + tag] = "centralized" + tag
    return merged, own


def gap(seed: dict[str, dict], against: str | None, name: str) -> float | None:
    if against is None or against not in seed:
        return None
    return 100 * (seed[against]["exact_match"] - seed[name]["exact_match"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="compare folders, one per seed (A+B: one seed's folders)")
    ap.add_argument("--extra", action="append", default=[],
                    help="FOLDER:VARIANT=RUN_DIR: the variant of that folder's seed, from a `fedtune run` folder")
    ap.add_argument("--tag", action="append", default=[],
                    help="FOLDER=SUFFIX: append SUFFIX to the variant names of that folder")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    tags = {}
    for spec in args.tag:
        folder, sep, suffix = spec.partition("=")
        if not sep or not suffix:
            raise SystemExit(f"--tag {spec!r}: expected FOLDER=SUFFIX")
        tags[folder] = suffix
    unknown = set(tags) - {p for f in args.folders for p in f.split("+")}
    if unknown:
        raise SystemExit(f"--tag names folders that are not given: {sorted(unknown)}")
    seeds, own = {}, {}
    for spec in args.folders:
        seeds[spec], own[spec] = read_seed(spec, tags)
    for spec in args.extra:
        head, _, run = spec.partition("=")
        folder, _, variant = head.partition(":")
        if folder not in seeds or not variant or not run:
            raise SystemExit(f"--extra {spec!r}: expected FOLDER:VARIANT=RUN_DIR with FOLDER one of {list(seeds)}")
        seeds[folder][variant] = read_run(Path(run))
        own[folder][variant] = "centralized"
    for folder, variants in seeds.items():
        if not any(n in own[folder].values() for n in variants):
            raise SystemExit(f"{folder}: no centralized variant to measure the gap against")
    merged = any("+" in f for f in seeds)
    # centralized at its best setting: the centralized variant of every seed with the highest mean exact match
    # (one setting for all seeds, as a user would pick it, not the best of each seed)
    central = [n for n in seeds[next(iter(seeds))] if all(n in own[f].values() and n in seeds[f] for f in seeds)]
    best_name = max(central, key=lambda n: statistics.fmean(seeds[f][n]["exact_match"] for f in seeds), default=None)
    if merged and best_name is None:
        raise SystemExit("no centralized variant is in every seed: the best centralized setting cannot be chosen")

    names = sorted({n for v in seeds.values() for n in v}, key=lambda n: (not n.startswith("centralized"), n))
    rows = []
    head = f"{'variant':34s} {'seeds':>5s} {'loss':>8s} {'ROUGE-L':>8s} {'EM':>7s} {'EM per seed':>24s} {'gap':>6s}"
    print(head + (f"  gap to {best_name} (best centralized setting)" if merged else ""))
    for name in names:
        runs = {f: v[name] for f, v in seeds.items() if name in v}
        em = [r["exact_match"] for r in runs.values()]
        central = all(own[f][name] == name for f in runs)
        gaps = [gap(seeds[f], own[f][name], name) for f in runs]
        gaps = None if central or None in gaps else gaps
        row = {"variant": name, "seeds": list(runs), "per_seed": runs,
               "mean": {m: statistics.fmean(r[m] for r in runs.values()) for m in METRICS},
               "gap_points_mean": statistics.fmean(gaps) if gaps else None, "gap_points_per_seed": gaps}
        if merged:
            best_gaps = [gap(seeds[f], best_name, name) for f in runs]
            row["best_centralized"] = best_name
            row["gap_to_best_centralized_mean"] = statistics.fmean(best_gaps)
            row["gap_to_best_centralized_per_seed"] = best_gaps
        rows.append(row)
        per = " / ".join(f"{100 * e:.1f}" for e in em)
        shown = f"{row['gap_points_mean']:6.1f}" if gaps else "      "
        extra = f" {row['gap_to_best_centralized_mean']:24.1f}" if merged else ""
        print(f"{name:34s} {len(runs):5d} {row['mean']['loss']:8.4f} {100 * row['mean']['rouge_l']:7.1f}% "
              f"{100 * row['mean']['exact_match']:6.1f}% {per:>24s} {shown}{extra}")
    if args.json:
        out = {"folders": list(seeds), "extra": args.extra, "tags": tags, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
