"""Why the FedBPT client runs numpy's BLAS on one thread: a forward of the embedded model
alone, right after a numpy product of the size a client computes between forwards (the
projection of a population, 5 x 500 @ 500 x 5,760), and the same inside
`numpy_blas_single_threaded()`. A multi-threaded OpenBLAS keeps its threads spinning after
a call; on a small CPU they compete with torch's threads for the next forward.

Run:  .venv/bin/python benchmarks/blas_spin.py        (under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch

    from fedtune import config as C
    from fedtune.fedbpt.encoded import numpy_blas_single_threaded
    from fedtune.models import load_causal_lm

    lm = load_causal_lm(C.load(None, ["model.dtype='bfloat16'"]).model)
    body = lm.model.base_model
    x = torch.randn(args.rows, args.tokens, lm.model.config.hidden_size, dtype=torch.bfloat16)
    a, z = np.random.default_rng(0).standard_normal((500, 5760)), np.random.default_rng(1).standard_normal((5, 500))

    def forward_ms(numpy_first: bool, limit) -> float:
        times = []
        for _ in range(args.reps + 1):
            with limit():
                if numpy_first:
                    for _ in range(20):
                        z @ a
                t = time.perf_counter()
                with torch.inference_mode():
                    body(inputs_embeds=x, use_cache=False)
                times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times[1:])

    print(f"load average at start: {os.getloadavg()} · torch threads {torch.get_num_threads()} · "
          f"forward of {args.rows} x {args.tokens} tokens, medians of {args.reps}")
    out = {"alone_ms": forward_ms(False, nullcontext),
           "after_numpy_ms": forward_ms(True, nullcontext),
           "after_numpy_single_threaded_blas_ms": forward_ms(True, numpy_blas_single_threaded)}
    for k, v in out.items():
        print(f"  {k:38} {v:7.1f} ms")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
