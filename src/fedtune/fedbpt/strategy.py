"""FedBPT server step, in two modes.

`reference` reproduces NVIDIA FLARE's research/fed-bpt server (GlobalES) exactly, with the
same `cma` calls in the same order: a global CMA-ES whose population is the clients' final
means; each round sigma_g = sqrt(sum of the clients' squared local sigmas / (m * mu_local)),
then ask/tell on the client means ranked by their fitness (CMA weights, data size ignored),
and only the ratio of the step-size change is carried over to the next local sigma, with a
0.5 floor that the next line undoes. Every client gets the same ES seed each round, and the
covariance matrix crosses the wire (clients start from it, as `_copy_light` does).

`improved` (the default) fixes each defect behind its own switch (`Fixes`):
- only mean (float32) and sigma cross the wire; there is no server covariance to send;
- `distinct_seeds`: each client gets its own ES seed each round;
- `weight_by_size`: client means are averaged weighted by shard size (else CMA rank weights);
- `sigma_decay` / `sigma_min`: sigma anneals geometrically to a floor that holds
  (sigma_decay = 1 keeps it at sigma0: no annealing);
- `prompt_norm_max`: the global z is scaled back into a ball of radius
  prompt_norm_max * sqrt(d) (0 = off);
- `mean_lr`: the server's step: the global z moves this fraction of the way from where it was to
  the clients' weighted mean (1 = the mean itself, FedBPT's step);
- `select_on_dev` is applied by the recipe: the prompt kept is the best by dev metric.

The server's state is plain arrays and JSON (`state`/`load_state`); the reference mode's
`cma` object is rebuilt by replaying what it was told, never pickled.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.dp_fold import DPMeanFold
from fedtune.core.privacy import DPLedger, DPSettings
from fedtune.core.seeds import derive_seed
from fedtune.core.strategy import FitIns, FitRes, SelectingStrategy
from fedtune.fedbpt.es import es_options
from fedtune.errors import FedtuneError, UpdateRejected

ES_SEED_STREAM = 0xE5
REPLY_KEYS = ("fitness", "mean", "sigmas")


@dataclass(frozen=True)
class Fixes:
    """The improved mode's switches. `Fixes.none()` is the reference behaviour of each."""

    distinct_seeds: bool = True
    weight_by_size: bool = True
    sigma_decay: float = 0.9
    sigma_min: float = 0.05
    prompt_norm_max: float = 1.0
    select_on_dev: bool = True
    mean_lr: float = 1.0

    @classmethod
    def none(cls) -> "Fixes":
        return cls(distinct_seeds=False, weight_by_size=False, sigma_decay=1.0, sigma_min=0.0, prompt_norm_max=0.0,
                   select_on_dev=False)

    def to_json(self) -> dict:
        return asdict(self)


def rank_weights(k: int) -> np.ndarray:
    """The reference's recombination weights for k client means: cma's positive weights for
    a population of 2k (what CMA_mu = popsize = k gives), best first. For 10 clients:
    0.280, 0.197, 0.149, ..., 0.006."""
    from cma.recombination_weights import RecombinationWeights

    return np.array(RecombinationWeights(2 * k).positive_weights, dtype=np.float64)


def local_mu(popsize: int) -> int:
    """mu of a local CMA-ES with this population size (cma's default weights)."""
    from cma.recombination_weights import RecombinationWeights

    return int(RecombinationWeights(popsize).mu)


def improved_step(means: np.ndarray, fitness: np.ndarray, sizes: np.ndarray, sigma: float, fixes: Fixes,
                  prev: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """The improved server step as a pure function: (new mean, next sigma, weights). `prev` is the
    global mean the clients started from (needed when fixes.mean_lr < 1)."""
    k, d = means.shape
    if fixes.weight_by_size:
        w = sizes.astype(np.float64) / float(np.sum(sizes))
    else:
        w = np.zeros(k)
        w[np.argsort(fitness, kind="stable")] = rank_weights(k)
    mean, sigma = project_and_anneal(w @ means.astype(np.float64), sigma, fixes, prev)
    return mean, sigma, w


def project_and_anneal(mean: np.ndarray, sigma: float, fixes: Fixes, prev: np.ndarray | None = None,
                       ) -> tuple[np.ndarray, float]:
    """The improved step after the clients' mean: a `mean_lr` step from `prev` towards it, back
    into the prompt-norm ball, sigma annealed."""
    if fixes.mean_lr != 1.0:
        if prev is None:
            raise ValueError("fixes.mean_lr < 1 needs the previous global mean")
        mean = prev + fixes.mean_lr * (mean - prev)
    if fixes.prompt_norm_max > 0:
        radius = fixes.prompt_norm_max * math.sqrt(mean.shape[0])
        norm = float(np.linalg.norm(mean))
        if norm > radius:
            mean = mean * (radius / norm)
    if fixes.sigma_decay < 1.0:
        sigma = max(fixes.sigma_min, sigma * fixes.sigma_decay)
    return mean, float(sigma)


class FedBPTStrategy(SelectingStrategy):
    def __init__(self, *, mode: str, intrinsic_dim: int, sigma0: float, seed: int, rounds: int, num_clients: int,
                 popsize: int, local_iter: int, fixes: Fixes | None = None, fraction: float = 1.0,
                 clients_per_round: int = 0, bound: float = 0.0, max_update_norm: float = 0.0,
                 dp: DPSettings | None = None):
        super().__init__(seed, fraction, clients_per_round, max_update_norm)
        if mode not in ("reference", "improved"):
            raise ValueError(f"unknown mode {mode!r}")
        if dp is not None and (mode != "improved" or dp.mode != "central"):
            raise ValueError("FedBPT with DP: central DP in improved mode")
        self.dp = DPLedger(dp)
        self.mode = mode
        self.d = intrinsic_dim
        self.sigma0 = float(sigma0)
        self.rounds = rounds
        self.popsize = popsize
        self.local_iter = local_iter
        self.bound = bound
        self.fixes = Fixes.none() if mode == "reference" else (fixes or Fixes())
        self.m = len(self.select(1, [str(i) for i in range(num_clients)]))  # clients per round
        self.local_mu = local_mu(popsize)
        if mode == "reference":
            self._reset_reference()
        else:
            self.mean = np.zeros(intrinsic_dim, dtype=np.float64)
            self.sigma = self.sigma0
            self.steps = 0

    # ------------------------------------------------------------------ what clients receive

    def _global(self) -> Arrays:
        if self.mode == "reference":
            return {"mean": np.array(self.es.mean, dtype=np.float64), "sigma": np.array([self.es.sigma]),
                    "C": np.array(self.es.sm.C, dtype=np.float64)}
        return {"mean": self.mean.astype(np.float32), "sigma": np.array([self.sigma], dtype=np.float32)}

    def initial_arrays(self) -> Arrays:
        return self._global()

    def es_seed(self, rnd: int, client_index: int) -> int:
        if self.fixes.distinct_seeds:
            return derive_seed(self.seed, rnd, client_index, ES_SEED_STREAM) or 1
        return self.seed  # the reference: every client, every round

    def configure_fit(self, rnd: int, global_arrays: Arrays, client_ids: list[str]) -> dict[str, FitIns]:
        index = {cid: i for i, cid in enumerate(sorted(client_ids))}
        selected = self.select(rnd, client_ids)
        if self.dp:  # no round past the budget
            self.dp.start_round(rnd, len(client_ids), len(selected))
        return {cid: FitIns(global_arrays, {"round": rnd, "es_seed": self.es_seed(rnd, index[cid])})
                for cid in selected}

    def check_reply(self, ins: FitIns, res: FitRes) -> None:
        """A reply holds exactly mean (d, dtype as sent), fitness (1,) and sigmas (1..local_iter),
        float64, all finite, sigmas positive; and mean lies within max_update_norm (if set)."""
        if res.num_examples <= 0:
            raise UpdateRejected(f"num_examples = {res.num_examples}")
        got = sorted(res.arrays)
        if got != sorted(REPLY_KEYS):
            raise UpdateRejected(f"reply keys {got}, expected {sorted(REPLY_KEYS)}")
        mean, fit, sig = res.arrays["mean"], res.arrays["fitness"], res.arrays["sigmas"]
        sent = ins.arrays["mean"]
        if mean.shape != sent.shape or mean.dtype != sent.dtype:
            raise UpdateRejected(f"'mean': {mean.dtype}{list(mean.shape)}, expected {sent.dtype}{list(sent.shape)}")
        if fit.shape != (1,) or fit.dtype != np.float64:
            raise UpdateRejected(f"'fitness': {fit.dtype}{list(fit.shape)}, expected float64[1]")
        if sig.ndim != 1 or not 1 <= len(sig) <= self.local_iter or sig.dtype != np.float64:
            raise UpdateRejected(f"'sigmas': {sig.dtype}{list(sig.shape)}, expected float64[1..{self.local_iter}]")
        for k, v in res.arrays.items():
            if not np.all(np.isfinite(v)):
                raise UpdateRejected(f"'{k}': holds NaN or Inf")
        if np.any(sig <= 0):
            raise UpdateRejected("'sigmas': a step size is not positive")
        if self.max_update_norm > 0:
            dist = float(np.linalg.norm(mean.astype(np.float64) - sent))
            if dist > self.max_update_norm:
                raise UpdateRejected(f"mean moved {dist:.4g} from the global mean, over the bound {self.max_update_norm:.4g}")

    # ------------------------------------------------------------------ the server step

    def aggregator(self, rnd: int, global_arrays: Arrays):
        if self.dp:  # the clipped, noised mean of the clients' prompt means (each client weighs the same)
            return _DPRound(self, global_arrays, self.dp.accounting, rnd, self.dp.rng, ["mean"])
        return super().aggregator(rnd, global_arrays)

    def server_step(self, global_arrays: Arrays, avg: Arrays) -> Arrays:
        """The improved step from a mean of the client means computed elsewhere (central DP)."""
        self.mean, self.sigma = project_and_anneal(avg["mean"].astype(np.float64), self.sigma, self.fixes, self.mean)
        self.steps += 1
        return self._global()

    def _round_metrics(self, out: Arrays) -> dict:
        return {"sigma": float(out["sigma"][0]), "mean_norm": float(np.linalg.norm(out["mean"]))}

    def aggregate_fit(self, rnd: int, global_arrays: Arrays, results: list[FitRes]) -> tuple[Arrays, dict]:
        if self.dp:  # the same arithmetic as folding them one at a time
            fold = self.aggregator(rnd, global_arrays)
            for r in results:
                fold.add(r)
            return fold.result()
        means = np.stack([r.arrays["mean"].astype(np.float64) for r in results])
        fitness = np.array([float(r.arrays["fitness"][0]) for r in results])
        if self.mode == "reference":
            sq = [float(np.sum(r.arrays["sigmas"] ** 2)) for r in results]
            global_sigma = math.sqrt(sum(sq) / self.m / self.local_mu)
            self._reference_tell(global_sigma, means, fitness)
            self.log.append((global_sigma, means, fitness))
            metrics = {"global_sigma": global_sigma}
        else:
            sizes = np.array([r.num_examples for r in results], dtype=np.float64)
            self.mean, self.sigma, w = improved_step(means, fitness, sizes, self.sigma, self.fixes, self.mean)
            self.steps += 1
            metrics = {"weights": [round(float(x), 4) for x in w]}
        out = self._global()
        metrics.update(self._round_metrics(out))
        metrics.update({"fitness_best": float(fitness.min()), "fitness_mean": float(fitness.mean())})
        return out, metrics

    # ------------------------------------------------------------------ the reference's global ES

    def _reset_reference(self) -> None:
        import cma

        opts = es_options(self.seed, popsize=self.m, maxiter=self.rounds, verbose=-9, CMA_mu=self.m)
        if self.bound > 0:
            opts["bounds"] = [-self.bound, self.bound]
        self.es = cma.CMAEvolutionStrategy(self.d * [0], self.sigma0, inopts=opts)
        self.local_sigma_current = self.es.sigma
        self.log: list[tuple[float, np.ndarray, np.ndarray]] = []

    def _reference_tell(self, global_sigma: float, means: np.ndarray, fitness: np.ndarray) -> None:
        """GlobalES.run's round body, call for call."""
        es = self.es
        if len(means) < es.sp.weights.mu:
            raise FedtuneError(f"reference mode: {len(means)} client means arrived, but its global CMA-ES needs all "
                               f"{self.m} (cma's tell takes at least mu = {es.sp.weights.mu}); a dropped client "
                               "stops a reference run, as in FedBPT. Use fedbpt.mode = 'improved' to tolerate drops")
        es.sigma = global_sigma
        sigma_old = es.sigma
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cma warns that the client means were not sampled by ask()
            es.ask()
            es.tell(list(means), list(fitness))
        sigma_new = es.sigma
        es.sigma = sigma_new / sigma_old * self.local_sigma_current
        self.local_sigma_current = es.sigma
        if es.sigma < 0.5:
            es.sigma = 0.5
        if es.sigma > self.local_sigma_current:  # always true right after the floor: the floor never holds
            es.sigma = self.local_sigma_current

    # ------------------------------------------------------------------ checkpoints: arrays + JSON

    def state(self) -> tuple[Arrays, dict]:
        if self.mode == "improved":
            return {"mean": self.mean.copy()}, {"mode": "improved", "sigma": self.sigma, "steps": self.steps,
                                                **self.dp.state()}
        counts = np.array([len(m) for _, m, _ in self.log], dtype=np.int64)
        arrays = {"log/counts": counts, "es/mean": np.array(self.es.mean, dtype=np.float64)}
        if self.log:
            arrays["log/means"] = np.concatenate([m for _, m, _ in self.log])
            arrays["log/fitness"] = np.concatenate([f for _, _, f in self.log])
        return arrays, {"mode": "reference", "global_sigma": [g for g, _, _ in self.log], "sigma": float(self.es.sigma)}

    def load_state(self, arrays: Arrays, meta: dict) -> None:
        if meta.get("mode") != self.mode:
            raise FedtuneError(f"checkpoint was written in fedbpt.mode = '{meta.get('mode')}', this run is '{self.mode}'")
        if self.mode == "improved":
            self.mean = np.array(arrays["mean"], dtype=np.float64)
            self.sigma = float(meta["sigma"])
            self.steps = int(meta.get("steps", 0))
            self.dp.load_state(meta)
            return
        # rebuild the cma object by replaying every round it was told, then check it landed where it was
        self._reset_reference()
        counts = arrays["log/counts"]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for i, g in enumerate(meta["global_sigma"]):
            means = arrays["log/means"][offsets[i]:offsets[i + 1]]
            fitness = arrays["log/fitness"][offsets[i]:offsets[i + 1]]
            self._reference_tell(float(g), means, fitness)
            self.log.append((float(g), means, fitness))
        # replayed arithmetic may differ in the last bits under another BLAS or thread count: compare with a tolerance
        if not (np.allclose(np.asarray(self.es.mean), arrays["es/mean"], rtol=1e-7, atol=1e-9)
                and math.isclose(float(self.es.sigma), meta["sigma"], rel_tol=1e-7)):
            raise FedtuneError("reference-mode checkpoint: replaying the global CMA-ES did not reproduce its saved "
                               "mean and sigma (a different cma version?)")


class _DPRound(DPMeanFold):
    def result(self) -> tuple[Arrays, dict]:
        out, metrics = super().result()
        return out, {**metrics, **self.strategy._round_metrics(out)}
