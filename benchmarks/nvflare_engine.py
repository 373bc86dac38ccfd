"""The same config on the embedded simulator and on NVIDIA FLARE's simulator: wall time,
time per round, and the largest difference between the two global results.

    .venv/bin/python benchmarks/nvflare_engine.py CONFIG [--set KEY=VALUE ...] [--out DIR]

Prints one JSON object: for each engine the run's wall time (data, model, rounds, evaluation)
and the server-side round times from metrics.jsonl; and max |embedded - FLARE| over the
final global arrays (FedIT: the adapter; FedBPT: the prompt mean and sigma).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedtune import config as C
from fedtune.core import arrays as A


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", help="keep both run folders here (default: a temporary folder)")
    args = ap.parse_args()
    from fedtune import runner

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nvflare-bench-"))
    overrides = args.overrides + ["run.progress=false"]
    report = {"config": args.config, "overrides": args.overrides}
    finals = {}
    for engine in ("simulator", "nvflare"):
        cfg = C.load(args.config, overrides + [f"run.engine='{engine}'"])
        run_dir = out / engine
        run_dir.mkdir(parents=True, exist_ok=False)
        t0 = time.perf_counter()
        summary = runner.run(cfg, run_dir)  # the same driver; the engine supplies the transport
        if engine == "nvflare":
            finals[engine] = A.unpack((Path(summary["nvflare"]["results"]) / "global.safetensors").read_bytes())
        else:
            finals[engine] = A.unpack((run_dir / "checkpoint" / "global.safetensors").read_bytes())
        wall = time.perf_counter() - t0
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        report[engine] = {"wall_seconds": round(wall, 1), "round_seconds": [r["round_seconds"] for r in recs],
                          "clients_per_round": [len(r["clients"]) for r in recs]}
        print(f"{engine}: {wall:.1f}s", file=sys.stderr)
    a, b = finals["simulator"], finals["nvflare"]
    report["max_abs_diff"] = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    report["keys"] = len(a)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
