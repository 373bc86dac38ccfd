"""The starting-point search (fedbpt.search) measured as a run uses it: the choice is made on the
run's training and dev rows (k-shot + dev split drawn from the training file), then the zero
prompt of the task's own configuration and of the chosen one are scored on the test file, with
the majority-class baseline beside them. One row per seed (the seed draws the shots).

Run:  .venv/bin/python benchmarks/fedbpt_search.py --set task.dev_shots=100 --set task.test_max_rows=0 \
          --json docs/benchmarks/fedbpt_search_sst2.json
      .venv/bin/python benchmarks/fedbpt_search.py --config configs/fedbpt_agnews.toml \\
          --json docs/benchmarks/fedbpt_search_agnews.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "fedbpt_sst2_bbt.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seeds", default="1234")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from fedtune import config as C
    from fedtune.fedbpt.search import resolved, search, space_from_config
    from fedtune.fedbpt.session import FedBPTModel, encode_eval, prepare_task
    from fedtune.fedbpt.tasks import task_from_config

    rows, model = [], None
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = C.load(args.config, args.overrides + [f"run.seed={seed}"])
        for p in (cfg.task.train_path, cfg.task.test_path):
            if p and not p.startswith("hub:") and not Path(p).exists():
                print(f"skipped: {p} is absent (../shared/data holds the task files)", file=sys.stderr)
                return 0
        t0 = time.perf_counter()
        data = prepare_task(cfg)
        own = FedBPTModel(cfg, data.spec, box=model.box if model else None)
        model = own
        choice = search(own.box, own.spec, data.train + data.dev, space_from_config(own.spec, cfg.task, cfg.fedbpt))
        t_search = time.perf_counter() - t0
        chosen = FedBPTModel(resolved(cfg, choice), task_from_config(resolved(cfg, choice).task), box=own.box)
        test_own = own.evaluate(None, encode_eval(own.box, own.spec, data.test, cfg.eval.batch_size))
        test_chosen = chosen.evaluate(None, encode_eval(own.box, chosen.spec, data.test, cfg.eval.batch_size))
        counts = Counter(e.label for e in data.test)
        row = {"seed": seed, "search_rows": choice.rows, "test_rows": len(data.test),
               "majority": max(counts.values()) / len(data.test),
               "own": {"template": own.spec.template, "words": own.spec.words, "calibration": own.calibration,
                       "test": test_own},
               "chosen": {"template": choice.template, "words": list(choice.verbalizer.values()),
                          "calibration": choice.calibration, "search_score": choice.score, "test": test_chosen},
               "candidates": choice.scored, "search_seconds": round(t_search, 1),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "candidates"}), file=sys.stderr, flush=True)
    metric = rows[0]["own"]["test"]["metric"]
    lines = [f"| seed | majority | task's own zero prompt ({metric}) | chosen on train+dev | chosen zero prompt on test "
             f"({metric}) | search s |", "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        c = r["chosen"]
        lines.append(f"| {r['seed']} | {100 * r['majority']:.1f}% | {100 * r['own']['test']['score']:.1f}% | "
                     f"`{c['template']}` {' / '.join(c['words'])}, {c['calibration']} | "
                     f"{100 * c['test']['score']:.1f}% | {r['search_seconds']:.0f} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "table": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
