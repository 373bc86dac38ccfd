"""Deep prompts in the one-generation mode (`fedbpt.deep = true`): one separable CMA-ES per
layer, optimized layer by layer as BBTv2 divides and conquers (layer 0, 1, ..., L-1, then again),
`fedbpt.deep_rounds_per_layer` rounds (generations) at a time; one round is one generation of the
active layer's ES across all selected clients, as in `generation.py`.

The whole deep prompt is L x d values (60 KB at d = 500 on a 30-layer model), too much for every
round. Clients keep the last deep prompt they were sent; the server sends the active layer's mean
and std (as in the plain mode), the rows of the other layers that changed since the client's last
successful round (after a layer switch: the layer just finished), and a digest of the whole
prompt, which the client checks after applying them. A client whose copy does not match (a
restarted site) fails that round, and the server then resends every changed layer to it.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.strategy import FitIns, FitRes
from fedtune.errors import FedtuneError
from fedtune.fedbpt.generation import GenerationStrategy, candidates, es_settings, fitness_of

DEEP_STREAM = 0x44  # per-layer ES seeds


def digest(layers: np.ndarray) -> np.ndarray:
    """8 bytes of SHA-256 over the float32 deep prompt: what a client checks its copy against."""
    return np.frombuffer(hashlib.sha256(np.ascontiguousarray(layers, dtype=np.float32).tobytes()).digest()[:8],
                         dtype=np.uint8).copy()


def apply_update(cache: np.ndarray | None, ins_arrays: Arrays, n_layers: int, d: int) -> np.ndarray:
    """A client's deep prompt after this round's message: its copy with the sent rows and the
    active layer's mean written in, checked against the server's digest."""
    z = np.zeros((n_layers, d), dtype=np.float32) if cache is None else cache.copy()
    idx = ins_arrays["deep/rows"].astype(np.int64)
    if len(idx):
        z[idx] = ins_arrays["deep/values"]
    z[int(ins_arrays["deep/layer"][0])] = ins_arrays["mean"]
    if not np.array_equal(digest(z), ins_arrays["deep/digest"]):
        raise FedtuneError("deep prompt: this client's copy does not match the server's digest (a restarted "
                           "site?); the server sends the whole prompt next round")
    return z


class DeepGenerationStrategy(GenerationStrategy):
    def __init__(self, *, n_layers: int, rounds_per_layer: int, **kw):
        self.n_layers, self.rounds_per_layer = int(n_layers), int(rounds_per_layer)
        super().__init__(**kw)
        self.mode = "generation-deep"

    def _reset(self) -> None:
        self.ess: dict[int, object] = {}  # per layer, created when it is first active
        self.z = np.zeros((self.n_layers, self.d), dtype=np.float32)
        self.changed = np.zeros(self.n_layers, dtype=np.int64)  # the last round that changed each layer
        self.synced: dict[str, int] = {}  # client -> the round of its last successful reply
        self.sent: set[str] = set()
        self.log: list[np.ndarray] = []

    def active(self, rnd: int) -> int:
        return ((max(rnd, 1) - 1) // self.rounds_per_layer) % self.n_layers

    def _es(self, layer: int):
        import cma

        if layer not in self.ess:
            self.ess[layer] = cma.CMAEvolutionStrategy(np.zeros(self.d), self.sigma0,
                                                       inopts=es_settings(self.seed + DEEP_STREAM * layer, self.popsize))
        return self.ess[layer]

    def _global_for(self, rnd: int) -> Arrays:
        es = self._es(self.active(rnd))
        return {"mean": np.asarray(es.mean, dtype=np.float32), "std": np.asarray(es.stds, dtype=np.float32),
                "layers": self.z.copy()}

    def initial_arrays(self) -> Arrays:
        return self._global_for(1)

    def configure_fit(self, rnd: int, global_arrays: Arrays, client_ids: list[str]) -> dict[str, FitIns]:
        layer = self.active(rnd)
        z = global_arrays["layers"].copy()
        z[layer] = global_arrays["mean"]
        cfg = {"round": rnd, "gen_seed": self.round_seed(rnd), "popsize": self.popsize, "deep_layers": self.n_layers}
        out = {}
        for cid in self.select(rnd, client_ids):
            rows = [i for i in range(self.n_layers) if i != layer and self.changed[i] >= self.synced.get(cid, 1)]
            out[cid] = FitIns({"mean": global_arrays["mean"], "std": global_arrays["std"],
                               "deep/layer": np.array([layer], dtype=np.int64),
                               "deep/rows": np.array(rows, dtype=np.int32),
                               "deep/values": z[rows].astype(np.float32), "deep/digest": digest(z)}, dict(cfg))
        self.sent = set(out)
        return out

    def _tell_layer(self, rnd: int, f: np.ndarray) -> None:
        layer = self.active(rnd)
        es = self._es(layer)
        mean, std = np.asarray(es.mean, dtype=np.float32), np.asarray(es.stds, dtype=np.float32)
        x = candidates(mean, std, self.round_seed(rnd), self.popsize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            es.inject(list(x), force=True)
            es.tell(es.ask(), [float(v) for v in f])
        self.z[layer] = np.asarray(es.mean, dtype=np.float32)
        self.changed[layer] = rnd
        self.log.append(np.asarray(f, dtype=np.float64))

    def aggregate_fit(self, rnd: int, global_arrays: Arrays, results: list[FitRes]) -> tuple[Arrays, dict]:
        f, rows = fitness_of(results, self.perturb)
        layer = self.active(rnd)
        self._tell_layer(rnd, f)
        replied = {r.client_id for r in results}
        for cid in self.sent:  # a client that failed may hold a stale copy: send it everything next time
            self.synced[cid] = rnd if cid in replied else 1
        out = self._global_for(rnd + 1)
        return out, {"fitness_best": float(f.min()), "fitness_mean": float(f.mean()), "rows": rows, "layer": layer,
                     "sigma": float(self.ess[layer].sigma), "mean_norm": float(np.linalg.norm(self.z))}

    def state(self) -> tuple[Arrays, dict]:
        arrays = {"deep/z": self.z.copy()}
        if self.log:
            arrays["log/fitness"] = np.stack(self.log)
        return arrays, {"mode": self.mode, "rounds": len(self.log), "layers": self.n_layers,
                        "rounds_per_layer": self.rounds_per_layer}

    def load_state(self, arrays: Arrays, meta: dict) -> None:
        if meta.get("mode") != self.mode or meta.get("layers") != self.n_layers \
                or meta.get("rounds_per_layer") != self.rounds_per_layer:
            raise FedtuneError(f"checkpoint was written with fedbpt mode {meta.get('mode')!r}, {meta.get('layers')} "
                               f"layers, {meta.get('rounds_per_layer')} rounds per layer; this run is {self.mode!r}, "
                               f"{self.n_layers}, {self.rounds_per_layer}")
        self._reset()
        for rnd, f in enumerate(arrays.get("log/fitness", np.zeros((0, self.popsize))), start=1):
            self._tell_layer(rnd, f)
        if not np.allclose(self.z, arrays["deep/z"], rtol=1e-6, atol=1e-7) or not math.isfinite(float(self.z.sum())):
            raise FedtuneError("deep generation-mode checkpoint: replaying the per-layer CMA-ES did not reproduce "
                               "the saved deep prompt (a different cma version?)")
