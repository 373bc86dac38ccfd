"""FedBPT's one-generation mode (`fedbpt.mode = "generation"`): one round is one generation of
a single global CMA-ES across all selected clients, so the optimizer sees every client's rows.

Down: the mean and the per-coordinate standard deviation of the search distribution (float32,
d values each) and, in the round config, a seed. Each client draws the same `popsize`
candidates from them (`candidates`, numpy's PCG64 from the seed), scores every candidate on
the same rows of its own (all of them, or a fresh minibatch of `fedbpt.minibatch` rows, the
same for every candidate), and returns per-candidate loss sums and its row count: a few
hundred bytes. The server adds the sums over clients in client-id order, divides by the rows,
and tells CMA-ES. That is centralized CMA-ES on the union of the clients' rows, which
`tests/test_fedbpt_generation.py` checks bit for bit.

The covariance is diagonal (separable CMA-ES, `cma`'s `CMA_diagonal`, with cumulative step-size
adaptation): the clients must sample from it, and a full d x d matrix would not fit in a few
kilobytes. The server's ES is
rebuilt on resume by replaying each round's fitness values (never pickled).

Central DP (`privacy.mode = "central"`, client-level, the accountant of `fedtune.core.privacy`):
each client's contribution is its vector of per-candidate mean losses (sums / rows), centred
(CMA-ES ranks the candidates and the acceptance test compares two of them, so only differences
count, and the clip is not spent on the loss level), clipped to L2 norm C; the server adds the
clipped vectors, Gaussian noise of std z*C on every entry, and divides by the clients per round:
every client weighs the same, whatever its row count (`dp_fitness`, with the same fold as the
other algorithms' central DP). With `fedbpt.perturb` a client's vector is its own ratios of
clean to perturbed mean loss (without DP: the ratio of the sums over all clients). The noisy
fitness is what CMA-ES is told and what a resume replays.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.dp_fold import DPMeanFold
from fedtune.core.privacy import DPLedger, DPSettings
from fedtune.core.seeds import derive_seed
from fedtune.core.strategy import FitIns, FitRes, SelectingStrategy
from fedtune.errors import FedtuneError, UpdateRejected
from fedtune.fedbpt.es import es_options

GEN_STREAM = 0x6E  # seed stream of each round's candidates
MINIBATCH_STREAM = 0x4D  # seed stream of a client's minibatch, per round


def es_settings(seed: int, popsize: int, mean_lr: float = 1.0) -> dict:
    """The global ES's `cma` options. cma may add samples of its own to a generation: two line
    samples for its step-size rule for a diagonal ES (TPA; CSA needs none) and mirrored pairs
    for small populations. The clients score exactly the candidates `candidates` draws, so
    neither is used. `mean_lr` is cma's learning rate for the mean (`CMA_cmean`, 1 = standard)."""
    import cma

    return es_options(seed, popsize=popsize, CMA_diagonal=True, CMA_mirrors=0, verbose=-9,
                      AdaptSigma=cma.sigma_adaptation.CMAAdaptSigmaCSA, CMA_cmean=float(mean_lr))


def candidates(mean: np.ndarray, std: np.ndarray, seed: int, popsize: int) -> np.ndarray:
    """The generation's candidates, (popsize, d): mean + std * N(0, I) from PCG64(seed). The
    server and every client compute them from the same float32 arrays."""
    z = np.random.Generator(np.random.PCG64(int(seed))).standard_normal((popsize, mean.size))
    return mean.astype(np.float64) + std.astype(np.float64) * z


def fitness_of(results: list[FitRes], perturb: bool) -> tuple[np.ndarray, int]:
    """Per-candidate fitness over the union of the clients' rows (sums added in client-id order)."""
    total, total_p, rows = None, None, 0
    for r in sorted(results, key=lambda r: r.client_id):
        s = r.arrays["loss_sum"]
        total = s.copy() if total is None else total + s
        if perturb:
            p = r.arrays["loss_sum_perturbed"]
            total_p = p.copy() if total_p is None else total_p + p
        rows += int(r.arrays["rows"][0])
    f = total / rows
    if perturb:
        f = f / np.maximum(total_p / rows, 1e-12)
    return f, rows


class _Noisy:
    """The server step of the DP fold here: the noisy mean itself."""

    @staticmethod
    def server_step(global_arrays: Arrays, mean: Arrays) -> Arrays:
        return mean


def dp_fitness(results: list[FitRes], ledger: DPLedger, rnd: int) -> tuple[np.ndarray, dict]:
    """Per-candidate fitness under central DP: the noisy mean over the round's m clients of each
    client's centred, clipped per-candidate mean-loss vector; and the round's DP record."""
    n = len(results[0].arrays["loss_sum"])
    g = {"f": np.zeros(n, dtype=np.float64)}
    fold = DPMeanFold(_Noisy, g, ledger.accounting, rnd, ledger.rng, ["f"])
    for r in sorted(results, key=lambda r: r.client_id):
        v = r.arrays["loss_sum"] / float(r.arrays["rows"][0])
        if "loss_sum_perturbed" in r.arrays:  # fedbpt.perturb: the client's own ratio, clean / perturbed
            v = v / np.maximum(r.arrays["loss_sum_perturbed"] / float(r.arrays["rows"][0]), 1e-12)
        fold.add(FitRes(r.client_id, {"f": v - v.mean()}, 1))
    out, metrics = fold.result()
    return out["f"], metrics


class GenerationStrategy(SelectingStrategy):
    def __init__(self, *, intrinsic_dim: int, sigma0: float, seed: int, popsize: int, perturb: bool,
                 fraction: float = 1.0, clients_per_round: int = 0, dp: DPSettings | None = None,
                 mean_lr: float = 1.0):
        super().__init__(seed, fraction, clients_per_round)
        self.d, self.sigma0, self.popsize, self.perturb = intrinsic_dim, float(sigma0), popsize, perturb
        self.mean_lr = float(mean_lr)
        if dp is not None and dp.mode != "central":
            raise ValueError("the one-generation mode with DP: central DP")
        self.dp = DPLedger(dp)
        self.mode = "generation"
        self._reset()

    def select(self, rnd: int, client_ids: list[str]) -> list[str]:
        selected = super().select(rnd, client_ids)
        if self.dp:  # no round past the budget
            self.dp.start_round(rnd, len(client_ids), len(selected))
        return selected

    def fitness(self, rnd: int, results: list[FitRes]) -> tuple[np.ndarray, dict]:
        """The round's per-candidate fitness and what the round's record says about it: the
        rows behind it, or under DP the DP record instead (the clients' row counts are not
        noised, so they are not published)."""
        if not self.dp:
            f, rows = fitness_of(results, self.perturb)
            return f, {"rows": rows}
        return dp_fitness(results, self.dp, rnd)

    def _reset(self) -> None:
        import cma

        self.es = cma.CMAEvolutionStrategy(np.zeros(self.d), self.sigma0,
                                           inopts=es_settings(self.seed, self.popsize, self.mean_lr))
        self.log: list[np.ndarray] = []  # each round's fitness values, what a resume replays

    def _global(self) -> Arrays:
        return {"mean": np.asarray(self.es.mean, dtype=np.float32), "std": np.asarray(self.es.stds, dtype=np.float32)}

    def initial_arrays(self) -> Arrays:
        return self._global()

    def round_seed(self, rnd: int) -> int:
        return derive_seed(self.seed, rnd, 0, GEN_STREAM) or 1

    def configure_fit(self, rnd: int, global_arrays: Arrays, client_ids: list[str]) -> dict[str, FitIns]:
        cfg = {"round": rnd, "gen_seed": self.round_seed(rnd), "popsize": self.popsize}
        return {cid: FitIns(global_arrays, dict(cfg)) for cid in self.select(rnd, client_ids)}

    def reply_size(self, ins: FitIns) -> int:
        """How many loss sums a reply to `ins` holds: one per candidate."""
        return self.popsize

    def check_reply(self, ins: FitIns, res: FitRes) -> None:
        """loss_sum (and loss_sum_perturbed) float64[reply_size], finite; rows int64[1], between 1
        and the client's example count."""
        want = ["loss_sum", "rows"] + (["loss_sum_perturbed"] if self.perturb else [])
        n = self.reply_size(ins)
        if sorted(res.arrays) != sorted(want):
            raise UpdateRejected(f"reply keys {sorted(res.arrays)}, expected {sorted(want)}")
        for k in (k for k in want if k != "rows"):
            v = res.arrays[k]
            if v.dtype != np.float64 or v.shape != (n,) or not np.all(np.isfinite(v)):
                raise UpdateRejected(f"'{k}': {v.dtype}{list(v.shape)}, expected finite float64[{n}]")
        rows = res.arrays["rows"]
        if rows.dtype != np.int64 or rows.shape != (1,) or not 1 <= int(rows[0]) <= res.num_examples:
            raise UpdateRejected(f"'rows' = {rows.tolist()}: expected int64[1] between 1 and the client's "
                                 f"{res.num_examples} examples")

    def _tell(self, rnd: int, global_arrays: Arrays, f: np.ndarray) -> None:
        x = candidates(global_arrays["mean"], global_arrays["std"], self.round_seed(rnd), self.popsize)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es.inject(list(x), force=True)  # cma samples exactly the candidates the clients scored
            asked = self.es.ask()
            self.es.tell(asked, [float(v) for v in f])
        self.log.append(np.asarray(f, dtype=np.float64))

    def aggregate_fit(self, rnd: int, global_arrays: Arrays, results: list[FitRes]) -> tuple[Arrays, dict]:
        f, record = self.fitness(rnd, results)
        self._tell(rnd, global_arrays, f)
        out = self._global()
        return out, {"fitness_best": float(f.min()), "fitness_mean": float(f.mean()), **record,
                     "sigma": float(self.es.sigma), "mean_norm": float(np.linalg.norm(out["mean"]))}

    def state(self) -> tuple[Arrays, dict]:
        arrays = {"es/mean": np.asarray(self.es.mean, dtype=np.float64)}
        if self.log:
            arrays["log/fitness"] = np.stack(self.log)
        return arrays, {"mode": "generation", "sigma": float(self.es.sigma), "rounds": len(self.log), **self.dp.state()}

    def load_state(self, arrays: Arrays, meta: dict) -> None:
        if meta.get("mode") != "generation":
            raise FedtuneError(f"checkpoint was written in fedbpt.mode = '{meta.get('mode')}', this run is 'generation'")
        self._reset()
        self.dp.load_state(meta)
        for rnd, f in enumerate(arrays.get("log/fitness", np.zeros((0, self.popsize))), start=1):
            self._tell(rnd, self._global(), f)
        if not (np.allclose(np.asarray(self.es.mean), arrays["es/mean"], rtol=1e-7, atol=1e-9)
                and math.isclose(float(self.es.sigma), meta["sigma"], rel_tol=1e-7)):
            raise FedtuneError("generation-mode checkpoint: replaying the global CMA-ES did not reproduce its saved "
                               "mean and sigma (a different cma version?)")
