"""Deep prompts in the one-generation mode (`fedbpt.deep = true`): one separable CMA-ES per
layer, optimized layer by layer as BBTv2 divides and conquers (layer 0, 1, ..., L-1, then again),
`fedbpt.deep_rounds_per_layer` rounds (generations) at a time (with `fedbpt.deep_layers` = k, only
layers 0 .. k-1 take turns and the others keep a zero offset); one round is one generation of the
active layer's ES across all selected clients, as in `generation.py`.

The whole deep prompt is L x d values (60 KB at d = 500 on a 30-layer model), too much for every
round. Clients keep the last deep prompt they were sent; the server sends the active layer's mean
and std (as in the plain mode), the rows of the other layers that changed since the client's last
successful round (after a layer switch: the layer just finished), and a digest of the whole
prompt, which the client checks after applying them. A client whose copy does not match (a
restarted site) fails that round, and the server then resends every changed layer to it.

With `fedbpt.deep_accept`, the prompt is the *accepted* one: a layer's CMA-ES mean enters it
only after it scored lower than the accepted prompt on the same rows. Each round the clients
score two more points after the candidates: the accepted prompt and the proposal (the accepted
prompt with the layer told last round set to its new mean). Within a layer's block the proposal
is the mean the message carries anyway; after a switch it travels as `deep/probe`. An accepted
proposal reaches a client that scored it as a one-entry `deep/accepted` list instead of its 2 KB
row (the client kept the proposal it scored); other clients get the row.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.strategy import FitIns, FitRes
from fedtune.errors import FedtuneError
from fedtune.fedbpt.generation import GenerationStrategy, candidates, es_settings

DEEP_STREAM = 0x44  # per-layer ES seeds


def digest(layers: np.ndarray) -> np.ndarray:
    """8 bytes of SHA-256 over the float32 deep prompt: what a client checks its copy against."""
    return np.frombuffer(hashlib.sha256(np.ascontiguousarray(layers, dtype=np.float32).tobytes()).digest()[:8],
                         dtype=np.uint8).copy()


def apply_update(cache: np.ndarray | None, ins_arrays: Arrays, n_layers: int, d: int,
                 last_probe: tuple[int, np.ndarray] | None = None) -> np.ndarray:
    """A client's deep prompt after this round's message: its copy with the sent rows and the
    active layer's mean written in (with acceptance: the proposal it scored last round, if the
    server accepted it, and no mean), checked against the server's digest."""
    z = np.zeros((n_layers, d), dtype=np.float32) if cache is None else cache.copy()
    if "deep/accepted" in ins_arrays and len(ins_arrays["deep/accepted"]):
        if last_probe is None or int(ins_arrays["deep/accepted"][0]) != last_probe[0]:
            raise FedtuneError("deep prompt: the server accepted a proposal this client did not score last round")
        z[last_probe[0]] = last_probe[1]
    idx = ins_arrays["deep/rows"].astype(np.int64)
    if len(idx):
        z[idx] = ins_arrays["deep/values"]
    if "deep/accepted" not in ins_arrays:
        z[int(ins_arrays["deep/layer"][0])] = ins_arrays["mean"]
    if not np.array_equal(digest(z), ins_arrays["deep/digest"]):
        raise FedtuneError("deep prompt: this client's copy does not match the server's digest (a restarted "
                           "site?); the server sends the whole prompt next round")
    return z


def probe_of(ins_arrays: Arrays) -> tuple[int, np.ndarray]:
    """(layer, value) of the proposal an acceptance-mode message asks its client to score."""
    if "deep/probe" in ins_arrays:
        return int(ins_arrays["deep/probe_layer"][0]), np.asarray(ins_arrays["deep/probe"], dtype=np.float32)
    return int(ins_arrays["deep/layer"][0]), np.asarray(ins_arrays["mean"], dtype=np.float32)


class DeepGenerationStrategy(GenerationStrategy):
    def __init__(self, *, n_layers: int, rounds_per_layer: int, accept: bool = False, tuned_layers: int = 0, **kw):
        self.n_layers, self.rounds_per_layer, self.accept = int(n_layers), int(rounds_per_layer), bool(accept)
        self.tuned = int(tuned_layers) or self.n_layers  # layers 0 .. tuned-1 take turns; the rest stay zero
        super().__init__(**kw)
        self.mode = "generation-deep-accept" if self.accept else "generation-deep"

    def _reset(self) -> None:
        self.ess: dict[int, object] = {}  # per layer, created when it is first active
        self.z = np.zeros((self.n_layers, self.d), dtype=np.float32)
        self.changed = np.zeros(self.n_layers, dtype=np.int64)  # the last round that changed each layer
        self.synced: dict[str, int] = {}  # client -> the round of its last successful reply
        self.sent: set[str] = set()
        self.log: list[np.ndarray] = []
        self.probe = (0, np.zeros(self.d, dtype=np.float32))  # acceptance: the proposal scored next round
        self.accepted_in, self.last_accepted_layer = 0, 0  # the round whose proposal was last accepted, its layer

    def reply_size(self, ins: FitIns) -> int:
        return self.popsize + (2 if "deep/accepted" in ins.arrays else 0)

    def active(self, rnd: int) -> int:
        return ((max(rnd, 1) - 1) // self.rounds_per_layer) % self.tuned

    def _es(self, layer: int):
        import cma

        if layer not in self.ess:
            self.ess[layer] = cma.CMAEvolutionStrategy(np.zeros(self.d), self.sigma0,
                                                       inopts=es_settings(self.seed + DEEP_STREAM * layer, self.popsize,
                                                                          self.mean_lr))
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
        if not self.accept:
            z[layer] = global_arrays["mean"]
        cfg = {"round": rnd, "gen_seed": self.round_seed(rnd), "popsize": self.popsize, "deep_layers": self.n_layers}
        out = {}
        for cid in self.select(rnd, client_ids):
            rows = [i for i in range(self.n_layers) if (self.accept or i != layer)
                    and self.changed[i] >= self.synced.get(cid, 1)]
            arrays = {"mean": global_arrays["mean"], "std": global_arrays["std"],
                      "deep/layer": np.array([layer], dtype=np.int64)}
            if self.accept:
                # a client that scored last round's accepted proposal applies it from its own copy
                mine = self.accepted_in == rnd - 1 and self.synced.get(cid, 0) == rnd - 1 and rnd > 1
                p = self.last_accepted_layer
                rows = [i for i in rows if not (mine and i == p)]
                arrays["deep/accepted"] = np.array([p] if mine else [], dtype=np.int64)
                if self.probe[0] != layer:  # after a switch the proposal is not this round's mean
                    arrays["deep/probe_layer"] = np.array([self.probe[0]], dtype=np.int64)
                    arrays["deep/probe"] = self.probe[1].copy()
            arrays.update({"deep/rows": np.array(rows, dtype=np.int32), "deep/values": z[rows].astype(np.float32),
                           "deep/digest": digest(z)})
            out[cid] = FitIns(arrays, dict(cfg))
        self.sent = set(out)
        return out

    def _tell_layer(self, rnd: int, f: np.ndarray) -> dict:
        """Tell the active layer's ES the candidates' fitness (f's first popsize values); with
        acceptance, f's last two values are the accepted prompt's and the proposal's."""
        layer = self.active(rnd)
        es = self._es(layer)
        mean, std = np.asarray(es.mean, dtype=np.float32), np.asarray(es.stds, dtype=np.float32)
        x = candidates(mean, std, self.round_seed(rnd), self.popsize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            es.inject(list(x), force=True)
            es.tell(es.ask(), [float(v) for v in f[:self.popsize]])
        self.log.append(np.asarray(f, dtype=np.float64))
        new = np.asarray(es.mean, dtype=np.float32)
        if not self.accept:
            self.z[layer] = new
            self.changed[layer] = rnd
            return {}
        f_accepted, f_proposal = float(f[self.popsize]), float(f[self.popsize + 1])
        # a proposal equal to the accepted row (the first round's) is not a change, whatever noise says
        taken = f_proposal < f_accepted and not np.array_equal(self.probe[1], self.z[self.probe[0]])
        if taken:
            p = self.probe[0]
            self.z[p] = self.probe[1]
            self.changed[p], self.accepted_in, self.last_accepted_layer = rnd, rnd, p
        self.probe = (layer, new)
        return {"fitness_accepted": min(f_accepted, f_proposal), "proposal_accepted": taken}

    def aggregate_fit(self, rnd: int, global_arrays: Arrays, results: list[FitRes]) -> tuple[Arrays, dict]:
        f, record = self.fitness(rnd, results)
        layer = self.active(rnd)
        extra = self._tell_layer(rnd, f)
        f = f[:self.popsize]
        replied = {r.client_id for r in results}
        for cid in self.sent:  # a client that failed may hold a stale copy: send it everything next time
            self.synced[cid] = rnd if cid in replied else 1
        out = self._global_for(rnd + 1)
        return out, {"fitness_best": float(f.min()), "fitness_mean": float(f.mean()), **record, "layer": layer,
                     "sigma": float(self.ess[layer].sigma), "mean_norm": float(np.linalg.norm(self.z)), **extra}

    def state(self) -> tuple[Arrays, dict]:
        arrays = {"deep/z": self.z.copy()}
        if self.log:
            arrays["log/fitness"] = np.stack(self.log)
        return arrays, {"mode": self.mode, "rounds": len(self.log), "layers": self.n_layers, "tuned_layers": self.tuned,
                        "rounds_per_layer": self.rounds_per_layer, **self.dp.state()}

    def load_state(self, arrays: Arrays, meta: dict) -> None:
        tuned = meta.get("tuned_layers", meta.get("layers"))  # checkpoints from before deep_layers tuned every layer
        if meta.get("mode") != self.mode or meta.get("layers") != self.n_layers or tuned != self.tuned \
                or meta.get("rounds_per_layer") != self.rounds_per_layer:
            raise FedtuneError(f"checkpoint was written with fedbpt mode {meta.get('mode')!r}, {meta.get('layers')} "
                               f"layers ({tuned} tuned), {meta.get('rounds_per_layer')} rounds per layer; this run is "
                               f"{self.mode!r}, {self.n_layers} ({self.tuned}), {self.rounds_per_layer}")
        self._reset()
        self.dp.load_state(meta)
        width = self.popsize + (2 if self.accept else 0)
        for rnd, f in enumerate(arrays.get("log/fitness", np.zeros((0, width))), start=1):
            self._tell_layer(rnd, f)
        if not np.allclose(self.z, arrays["deep/z"], rtol=1e-6, atol=1e-7) or not math.isfinite(float(self.z.sum())):
            raise FedtuneError("deep generation-mode checkpoint: replaying the per-layer CMA-ES did not reproduce "
                               "the saved deep prompt (a different cma version?)")
