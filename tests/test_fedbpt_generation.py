"""FedBPT's one-generation mode: through the real round driver and client app it is exactly
centralized CMA-ES on the pooled rows (the oracle runs `cma` itself, bit for bit); it
resumes by replay; replies are checked; a few kilobytes cross the wire; minibatches are the
same rows for every candidate of a generation."""

import warnings

import numpy as np
import pytest

from fedtune.core.strategy import FitIns, FitRes
from fedtune.engines.simulator import Simulator, SimulatorSettings
from fedtune.errors import UpdateRejected
from fedtune.fedbpt import objective as O
from fedtune.fedbpt.client import FedBPTClientApp, LocalSettings, Shard
from fedtune.fedbpt.encoded import Encoded
from fedtune.fedbpt.es import es_options
from fedtune.fedbpt.generation import GenerationStrategy, candidates
from fedtune.fedbpt.prompt import Projection, ProjectionSpec

D, N_TOK, H, C = 500, 4, 8, 2


class RowBox:
    """A stand-in black box whose logits for a row depend on that row alone (elementwise work
    only), so a row scores the same whichever rows share its forward."""

    pad_id = 0
    forward_calls = 0

    def logits(self, prompts, rows, label_ids, deep=None):
        assert deep is None
        self.forward_calls += 1
        w = np.stack([np.sin(np.arange(N_TOK * H * C) * 0.01 * (1 + r[0] % 7)) for r in rows.input_ids])
        p = prompts.reshape(len(prompts), 1, -1, 1)  # (P, 1, n*H, 1)
        return (p * w.reshape(1, len(rows), -1, C)).sum(axis=2)  # (P, B, C)

    def perturb(self, enc, rate, seed):
        raise AssertionError("not used")


def _shard(ids: list[int]) -> Shard:
    n = len(ids)
    enc = Encoded(np.array([[i, 1, 2] for i in ids], np.int64), np.ones((n, 3), np.int64), np.zeros(n, np.int64),
                  np.full(n, 2, np.int64), np.zeros((n, 3), bool))
    return Shard(enc, np.array([i % C for i in ids], np.int64))


SHARDS = {"c0": _shard([3, 4, 5, 6]), "c1": _shard([7, 8, 9, 10, 11, 12, 13]), "c2": _shard([14, 15])}


def _app(popsize=6, minibatch=0):
    proj = Projection(ProjectionSpec(7, D, N_TOK, H, 0.5))
    return FedBPTClientApp(RowBox(), proj, SHARDS, [0, 1], LocalSettings(popsize=popsize, perturb=False,
                                                                            minibatch=minibatch), seed=5), proj


def _run(rounds, popsize=6, state=None, strat=None):
    app, proj = _app(popsize)
    strat = strat or GenerationStrategy(intrinsic_dim=D, sigma0=0.8, seed=11, popsize=popsize, perturb=False)
    out = Simulator(strat, app, sorted(SHARDS), SimulatorSettings(rounds=rounds, progress=False)).run(state)
    return out, strat, proj


def test_one_generation_per_round_is_centralized_cma_es_on_the_pooled_rows_bit_for_bit():
    import cma

    state, strat, proj = _run(5)
    # oracle: cma by hand on the pooled rows of every client; the loss is summed client by client, as
    # floating-point addition over the union of the clients' rows must be grouped one way or another
    box = RowBox()
    # cma's own options: a diagonal covariance, CSA step sizes, no mirrored samples (none it would add itself)
    es = cma.CMAEvolutionStrategy(np.zeros(D), 0.8, es_options(11, popsize=6, CMA_diagonal=True, CMA_mirrors=0,
                                                                verbose=-9,
                                                                AdaptSigma=cma.sigma_adaptation.CMAAdaptSigmaCSA))
    for rnd in range(1, 6):
        mean32, std32 = np.asarray(es.mean, np.float32), np.asarray(es.stds, np.float32)
        x = candidates(mean32, std32, strat.round_seed(rnd), 6)
        prompts = proj(x)
        total, n = np.zeros(6), 0
        for cid in sorted(SHARDS):
            sh = SHARDS[cid]
            total = total + O.ce_rows(box.logits(prompts, sh.enc, [0, 1]), sh.labels).sum(axis=1)
            n += len(sh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            es.inject(list(x), force=True)
            es.tell(es.ask(), list(total / n))
    assert np.array_equal(np.asarray(es.mean, np.float32), state.global_arrays["mean"])
    assert np.array_equal(np.asarray(es.mean), np.asarray(strat.es.mean))
    rec = state.history[-1]
    assert rec["aggregate"]["rows"] == 13 and len(rec["clients"]) == 3
    # the wire: mean and std down (float32), per-candidate sums and a count up
    assert max(c["bytes_down"] for c in rec["clients"]) < 8 * 1024
    assert max(c["bytes_up"] for c in rec["clients"]) < 1024


def test_a_resumed_generation_run_replays_to_the_same_search():
    full, _, _ = _run(4)
    part, strat, _ = _run(2)
    arrays, meta = strat.state()
    again = GenerationStrategy(intrinsic_dim=D, sigma0=0.8, seed=11, popsize=6, perturb=False)
    again.load_state(arrays, meta)
    assert np.array_equal(np.asarray(again.es.mean), np.asarray(strat.es.mean))
    resumed, _, _ = _run(4, state=part, strat=again)
    assert np.array_equal(resumed.global_arrays["mean"], full.global_arrays["mean"])


def test_replies_are_checked():
    strat = GenerationStrategy(intrinsic_dim=D, sigma0=0.8, seed=1, popsize=4, perturb=False)
    ins = FitIns(strat.initial_arrays(), {})
    good = {"loss_sum": np.ones(4), "rows": np.array([3], np.int64)}
    strat.check_reply(ins, FitRes("a", good, 3))
    for bad, why in [({**good, "rows": np.array([9], np.int64)}, "between 1 and the client's 3"),
                     ({**good, "loss_sum": np.ones(5)}, r"expected finite float64\[4\]"),
                     ({**good, "loss_sum": np.array([1, np.nan, 1, 1.0])}, "finite"),
                     ({"loss_sum": np.ones(4)}, "reply keys")]:
        with pytest.raises(UpdateRejected, match=why):
            strat.check_reply(ins, FitRes("a", bad, 3))


def test_a_minibatch_is_the_same_rows_for_every_candidate_and_fresh_each_round():
    app, _ = _app(popsize=4, minibatch=3)
    strat = GenerationStrategy(intrinsic_dim=D, sigma0=0.8, seed=1, popsize=4, perturb=False)
    g = strat.initial_arrays()
    seen = []
    app.box.logits = (lambda f: lambda p, rows, ids, deep: (seen.append(rows.input_ids[:, 0].tolist()), f(p, rows, ids))[1])(
        app.box.logits)
    for rnd in (1, 2):
        res = app.fit("c1", FitIns(g, {"round": rnd, "gen_seed": strat.round_seed(rnd), "popsize": 4}))
        assert res.arrays["rows"][0] == 3 and res.num_examples == 7
    assert len(seen) == 2 and all(len(r) == 3 for r in seen)  # one forward for all 4 candidates, on 3 rows
    assert seen[0] != seen[1]


def test_the_mean_learning_rate_scales_the_first_step_and_reaches_cma():
    """From a zero mean, one generation moves the mean to mean_lr times the recombination of the
    best candidates (linearity: the same candidates and fitness at mean_lr 1 give the full step)."""
    full, strat_full, _ = _run(1)
    quarter = GenerationStrategy(intrinsic_dim=D, sigma0=0.8, seed=11, popsize=6, perturb=False, mean_lr=0.25)
    part, strat_part, _ = _run(1, strat=quarter)
    np.testing.assert_allclose(np.asarray(strat_part.es.mean), 0.25 * np.asarray(strat_full.es.mean), rtol=1e-12)
    assert np.linalg.norm(strat_full.es.mean) > 1.0  # a real step, not a zero mean both ways
    assert strat_part.es.opts["CMA_cmean"] == 0.25


def test_mean_lr_is_checked_in_config():
    from fedtune import config as C
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"fedbpt.mean_lr must be in \(0, 1\]"):
        C.load(None, ["run.algorithm='fedbpt'", "fedbpt.mode='generation'", "fedbpt.mean_lr=0"])
    with pytest.raises(ConfigError, match="reference mode keeps FedBPT's step"):
        C.load(None, ["run.algorithm='fedbpt'", "fedbpt.mode='reference'", "fedbpt.mean_lr=0.5"])
    from fedtune.fedbpt.session import build_strategy

    cfg = C.load(None, ["run.algorithm='fedbpt'", "fedbpt.mode='generation'", "fedbpt.mean_lr=0.5"])
    assert build_strategy(cfg, 3).es.opts["CMA_cmean"] == 0.5  # the config reaches the server's cma
