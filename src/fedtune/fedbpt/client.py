"""FedBPT client: local CMA-ES in the intrinsic space, evaluated through the black box only.

Each round a client starts a CMA-ES (the `cma` library) at the global mean with the global
step size (and the global covariance, when the server sends one), runs up to `local_iter`
generations of `popsize` candidates on its own rows, and replies with the final local mean,
that mean's fitness, and the step sizes it used. A whole generation is evaluated in one
batched forward pass through the black box (the clean rows and the perturbed copy
together): candidates x rows in, verbalizer logits out.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from fedtune.core.seeds import derive_seed
from fedtune.core.strategy import FitIns, FitRes
from fedtune.fedbpt import objective as O
from fedtune.fedbpt.es import es_options
from fedtune.fedbpt.calibration import calibrate
from fedtune.fedbpt.deep_strategy import apply_update, probe_of
from fedtune.fedbpt.encoded import Encoded, concat, numpy_blas_single_threaded, take
from fedtune.fedbpt.generation import MINIBATCH_STREAM, candidates
from fedtune.fedbpt.prompt import Projection

PERTURB_STREAM = 0x9E  # seed stream of a client's perturbed copy, per round


@dataclass
class Shard:
    enc: Encoded
    labels: np.ndarray  # (B,) class indices

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LocalSettings:
    popsize: int = 5
    local_iter: int = 8
    loss: str = "ce"
    perturb: bool = True
    perturb_rate: float = 0.5
    batch_population: bool = True
    bound: float = 0.0
    separable: bool = False  # diagonal covariance (cma's CMA_diagonal)
    calibration: str = "none"  # none | batch | content_free, applied to the scores inside the fitness
    minibatch: int = 0  # rows per generation, the same for every candidate (0 = all of the client's)


def make_local_es(mean: np.ndarray, sigma: float, seed: int, s: LocalSettings, covariance: np.ndarray | None = None):
    """The client's CMA-ES, with the options the reference gives it (`_copy_light` of the
    global ES with seed, popsize and maxiter replaced, CMA_mu reset)."""
    import cma

    opts = es_options(seed, popsize=s.popsize, maxiter=s.local_iter, verbose=-9, CMA_mu=None)
    if s.separable:
        opts["CMA_diagonal"] = True
    if s.bound > 0:
        opts["bounds"] = [-s.bound, s.bound]
    es = cma.CMAEvolutionStrategy(np.asarray(mean, dtype=np.float64), float(sigma), opts)
    if covariance is not None:  # as cma's _set_C_from: take C, then make B and D consistent with it
        es.sm.C = np.array(covariance, dtype=np.float64)
        es.sm.update_now(-1)
        es._updateBDfromSM()
    return es


class FedBPTClientApp:
    def __init__(self, box, projection: Projection, shards: dict[str, Shard], label_ids: list[int],
                 settings: LocalSettings, *, seed: int, content_free: Encoded | None = None):
        self.box = box  # the black box: encode / perturb / logits, nothing else
        self.projection = projection
        self.shards = shards
        self.label_ids = list(label_ids)
        self.s = settings
        self.seed = seed
        self.client_index = {cid: i for i, cid in enumerate(sorted(shards))}
        self.content_free = content_free  # content-free rows in the task's template (calibration)
        self.deep_cache: dict[str, np.ndarray] = {}  # deep prompts: each client's copy of the whole prompt
        self.deep_probe: dict[str, tuple[int, np.ndarray]] = {}  # deep_accept: the proposal each client scored last
        if settings.calibration == "content_free" and content_free is None:
            raise ValueError("content_free calibration needs the content-free rows")

    # ------------------------------------------------------------------ evaluating candidates

    def evaluate(self, z: np.ndarray, shard: Shard, perturbed: Encoded | None) -> np.ndarray:
        """Fitness of each row of z (P, d) on the shard: one forward for the whole population
        (batch_population), or one forward per candidate."""
        with numpy_blas_single_threaded():
            return self._evaluate(z, shard, perturbed)

    def _evaluate(self, z: np.ndarray, shard: Shard, perturbed: Encoded | None) -> np.ndarray:
        clean, pert = self._logits(z, shard, perturbed)
        return O.fitness(self.s.loss, clean, shard.labels, pert)

    def _logits(self, z: np.ndarray, shard: Shard, perturbed: Encoded | None):
        """Verbalizer logits of each candidate on the clean rows (P, B, C) and on the perturbed copy;
        z (P, d), or (P, L, d) for deep prompts (then the projection is a DeepProjection)."""
        prompts, deep = self.projection(z) if z.ndim == 3 else (self.projection(z), None)  # (P, n, H), offsets
        rows = shard.enc if perturbed is None else concat(shard.enc, perturbed, self.box.pad_id)
        cal = self.s.calibration
        if cal == "content_free":  # the same forward scores the content-free rows
            rows = concat(rows, self.content_free, self.box.pad_id)
        b = len(shard)
        if self.s.batch_population:
            logits = self.box.logits(prompts, rows, self.label_ids, deep)  # (P, B or 2B, C)
        else:
            logits = np.concatenate([self.box.logits(p[None], rows, self.label_ids, None if deep is None else deep[i:i + 1])
                                     for i, p in enumerate(prompts)])
        clean, pert = logits[:, :b], (logits[:, b:2 * b] if perturbed is not None else None)
        if cal != "none":
            cf = logits[:, len(rows) - len(self.content_free):] if cal == "content_free" else None
            clean = calibrate(cal, clean, cf)
            pert = None if pert is None else calibrate(cal, pert, cf)
        return clean, pert

    def _minibatch(self, client_id: str, rnd: int, n: int, draw: int = 0) -> np.ndarray | None:
        """The rows of one generation (None: all of them), seeded by (run seed, round, client, draw)."""
        if not self.s.minibatch or self.s.minibatch >= n:
            return None
        rng = np.random.default_rng([self.seed, rnd, self.client_index[client_id], MINIBATCH_STREAM, draw])
        return np.sort(rng.choice(n, size=self.s.minibatch, replace=False))

    # ------------------------------------------------------------------ one round

    def fit(self, client_id: str, ins: FitIns) -> FitRes:
        with numpy_blas_single_threaded():  # CMA-ES algebra between forwards: see the helper
            return self._fit(client_id, ins)

    def _fit(self, client_id: str, ins: FitIns) -> FitRes:
        shard = self.shards.get(client_id)
        if shard is None:
            raise KeyError(f"client '{client_id}' holds no data in this process")
        rnd = int(ins.config.get("round", 0))
        if "gen_seed" in ins.config:  # one generation of the server's global CMA-ES: score its candidates
            return self._score(client_id, shard, rnd, ins)
        mean = ins.arrays["mean"]
        sigma = float(ins.arrays["sigma"][0])
        es_seed = int(ins.config["es_seed"])
        perturbed = None
        if self.s.perturb:
            perturbed = self.box.perturb(shard.enc, self.s.perturb_rate,
                                         derive_seed(self.seed, rnd, self.client_index[client_id], PERTURB_STREAM))
        t0 = time.perf_counter()
        calls0 = self.box.forward_calls
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cma's notes on injected solutions and flat fitness
            es = make_local_es(mean, sigma, es_seed, self.s, ins.arrays.get("C"))
            sigmas, evals, t_eval = [], 0, 0.0
            while not es.stop():
                sigmas.append(float(es.sigma))
                z = np.array(es.ask())  # (popsize, d)
                t1 = time.perf_counter()
                rows = self._minibatch(client_id, rnd, len(shard), draw=len(sigmas))
                if rows is None:
                    f = self._evaluate(z, shard, perturbed)
                else:  # the same rows for every candidate of this generation
                    f = self._evaluate(z, Shard(take(shard.enc, rows), shard.labels[rows]),
                                       None if perturbed is None else take(perturbed, rows))
                t_eval += time.perf_counter() - t1
                evals += len(z)
                es.tell(list(z), f.tolist())
            final = np.array(es.mean, dtype=np.float64)
        f_final = float(self._evaluate(final[None], shard, perturbed)[0])
        seconds = time.perf_counter() - t0
        reply = {"mean": final.astype(mean.dtype), "fitness": np.array([f_final], dtype=np.float64),
                 "sigmas": np.array(sigmas, dtype=np.float64)}
        return FitRes(client_id, reply, len(shard), {
            "train_loss": f_final, "generations": len(sigmas), "candidates": evals,
            "forward_calls": self.box.forward_calls - calls0, "candidates_per_s": round(evals / max(t_eval, 1e-9), 3),
            "local_sigma_last": float(es.sigma), "mean_norm": float(np.linalg.norm(final)),
            "compute_seconds": round(seconds, 3),
        })

    def _score(self, client_id: str, shard: Shard, rnd: int, ins: FitIns) -> FitRes:
        """Per-candidate loss sums of the server's generation on this client's rows (or minibatch)."""
        t0, calls0 = time.perf_counter(), self.box.forward_calls
        popsize = int(ins.config["popsize"])
        z = candidates(ins.arrays["mean"], ins.arrays["std"], int(ins.config["gen_seed"]), popsize)
        if "deep/layer" in ins.arrays:  # deep prompts: this layer's candidates, the other layers as last sent
            full = apply_update(self.deep_cache.pop(client_id, None), ins.arrays, int(ins.config["deep_layers"]),
                                z.shape[1], self.deep_probe.pop(client_id, None))
            self.deep_cache[client_id] = full  # kept only once it matched the server's digest
            zz = np.repeat(full[None].astype(np.float64), popsize, axis=0)
            zz[:, int(ins.arrays["deep/layer"][0])] = z
            if "deep/accepted" in ins.arrays:  # acceptance: then the accepted prompt and the proposal
                layer, value = probe_of(ins.arrays)
                proposal = full.astype(np.float64)
                proposal[layer] = value
                zz = np.concatenate([zz, full[None].astype(np.float64), proposal[None]])
                self.deep_probe[client_id] = (layer, value)
            z = zz
        rows = self._minibatch(client_id, rnd, len(shard))
        sub = shard if rows is None else Shard(take(shard.enc, rows), shard.labels[rows])
        perturbed = None
        if self.s.perturb:
            perturbed = self.box.perturb(sub.enc, self.s.perturb_rate,
                                         derive_seed(self.seed, rnd, self.client_index[client_id], PERTURB_STREAM))
        clean, pert = self._logits(z, sub, perturbed)
        reply = {"loss_sum": O.row_losses(self.s.loss, clean, sub.labels).sum(axis=1),
                 "rows": np.array([len(sub)], dtype=np.int64)}
        if pert is not None:
            reply["loss_sum_perturbed"] = O.row_losses(self.s.loss, pert, sub.labels).sum(axis=1)
        seconds = time.perf_counter() - t0
        return FitRes(client_id, reply, len(shard), {
            "train_loss": float(reply["loss_sum"].min() / len(sub)), "candidates": popsize, "rows_scored": len(sub),
            "forward_calls": self.box.forward_calls - calls0,
            "candidates_per_s": round(popsize / max(seconds, 1e-9), 3), "compute_seconds": round(seconds, 3)})
