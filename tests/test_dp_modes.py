"""Distributed DP (client-side clipping and noise shares under secure aggregation), adaptive
clipping, DP for FedBPT and the ledger across rounds with different noise: each against
dp-accounting's own composition or a numpy oracle written from the papers' formulas."""

import math

import numpy as np
import pytest

from fedtune import config as C
from fedtune.core import privacy as P
from fedtune.core.dp_client import DistributedDPClient
from fedtune.core.secagg import SecAggFailed, SecAggSettings
from fedtune.core.secagg_client import SecAggClient
from fedtune.core.strategy import FitIns, FitRes
from fedtune.engines.simulator import Simulator, SimulatorSettings
from fedtune.errors import ConfigError, UpdateRejected
from fedtune.fedbpt.strategy import FedBPTStrategy, Fixes
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"x.lora_A.weight": (2, 3), "x.lora_B.weight": (3, 2)}


def _g(shapes=SHAPES):
    return {k: np.zeros(s, np.float32) for k, s in shapes.items()}


class Offsets:
    """Client i returns global + a fixed offset of its own (norm grows with i)."""

    def fit(self, cid, ins):
        i = int(cid[1:])
        rng = np.random.default_rng(i)
        return FitRes(cid, {k: v + (i + 1) * rng.standard_normal(v.shape).astype(np.float32)
                            for k, v in ins.arrays.items()}, 5 + i, {"train_loss": 0.0})


class OnesNoise:
    """A stand-in generator whose normal(0, std, shape) is std everywhere: what each client
    adds becomes visible in the sum (and each std it was asked for is recorded)."""

    def __init__(self):
        self.stds = []

    def normal(self, loc, scale, size=None):
        self.stds.append(scale)
        return np.full(size if size is not None else (), scale, dtype=np.float64)


# ----------------------------------------------------------------------------- the ledger


def test_rounds_with_different_noise_compose_as_dp_accounting_composes_them():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    n, m, zs = 100, 10, (1.0, 1.0, 0.7, 1.2, 1.2)
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for z in zs:
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2)))
    assert P.epsilon_of(n, m, zs, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_adaptive_clipping_noise_split_is_one_gaussian_of_the_planned_multiplier():
    """Andrew et al.: the update at z_update (sensitivity 2C) and the count at count_std
    (sensitivity 1) together are a Gaussian mechanism of multiplier z; checked with dp-accounting."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    z, count_std = 1.1, 0.9
    z_up = P.update_noise_multiplier(z, count_std)
    assert z_up == pytest.approx((1 / z**2 - 1 / (2 * count_std) ** 2) ** -0.5) and z_up > z
    both, one = (RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE) for _ in range(2))
    both.compose(dp_accounting.GaussianDpEvent(z_up / 2)).compose(dp_accounting.GaussianDpEvent(count_std))
    one.compose(dp_accounting.GaussianDpEvent(z / 2))
    assert both.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-6)
    with pytest.raises(Exception, match="raise privacy.count_noise"):
        P.update_noise_multiplier(1.0, 0.5)


# ----------------------------------------------------------------------------- adaptive clipping, central


def test_adaptive_clipping_noises_the_count_and_moves_the_clip_geometrically():
    g = _g()
    dp = P.DPSettings(clip=2.0, noise_multiplier=1.0, delta=1e-5, adaptive_clip=True, target_quantile=0.5,
                      clip_lr=0.2, count_noise=2.0)
    strat = FedAvgStrategy(g, seed=0, clients_per_round=4, dp=dp)
    strat.dp.rng = np.random.default_rng(7)
    ids = [f"c{i}" for i in range(8)]
    plan = strat.configure_fit(1, g, ids)
    res = [Offsets().fit(cid, FitIns(g, {})) for cid in plan]
    new, metrics = strat.aggregate_fit(1, g, res)
    # oracle: norms against C = 2, sum of clipped deltas, update noise at z_update * C, then the count's noise
    z_up = (1 / 1.0**2 - 1 / (2 * 2.0) ** 2) ** -0.5
    norms = [math.sqrt(sum(float(np.sum(r.arrays[k].astype(np.float64) ** 2)) for k in SHAPES)) for r in res]
    rng = np.random.default_rng(7)
    for k in SHAPES:
        total = sum(r.arrays[k].astype(np.float64) * min(1.0, 2.0 / n) for r, n in zip(res, norms))
        want = (total + rng.normal(0.0, z_up * 2.0, SHAPES[k])) / 4
        np.testing.assert_allclose(new[k], want.astype(np.float32), rtol=1e-6, atol=1e-6)
    within = sum(n <= 2.0 for n in norms) + rng.normal(0.0, 2.0)
    rec = metrics["dp"]
    assert rec["within_clip"] == pytest.approx(within / 4, abs=1e-4)
    assert rec["next_clip"] == pytest.approx(2.0 * math.exp(-0.2 * (within / 4 - 0.5)))
    assert rec["update_noise_multiplier"] == pytest.approx(z_up) and rec["clip"] == 2.0
    assert strat.dp.accounting.clip == pytest.approx(rec["next_clip"])  # the next round clips there
    assert rec["epsilon"] == pytest.approx(P.epsilon(8, 4, 1.0, 1, 1e-5))  # accounted at z, as planned


def test_a_resumed_run_keeps_the_adapted_clip_and_every_rounds_noise(tmp_path):
    from fedtune.core.checkpoint import load as load_checkpoint

    ids = [f"c{i}" for i in range(10)]
    dp = P.DPSettings(clip=0.5, noise_multiplier=1.0, delta=1e-5, adaptive_clip=True, rounds=2)

    def run(rounds, state=None):
        strat = FedAvgStrategy(_g(), seed=0, clients_per_round=5, dp=dp)
        if state == "resume":
            state = load_checkpoint(tmp_path, strat)
        out = Simulator(strat, Offsets(), ids, SimulatorSettings(rounds=rounds, progress=False),
                        run_dir=tmp_path).run(state)
        return strat, out

    first, s1 = run(2)
    clip_after = first.dp.accounting.clip
    again, s2 = run(3, "resume")
    r3 = s2.history[-1]["aggregate"]["dp"]
    assert r3["clip"] == pytest.approx(clip_after)  # round 3 clipped where round 2 left the clip
    assert r3["epsilon"] == pytest.approx(P.epsilon(10, 5, 1.0, 3, 1e-5))
    assert again.dp.accounting.round_z == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- distributed DP under secure aggregation


def _distributed(n, per_round, z=1.0, clip=1.0, shares=0, rng=None, drop=None, unit_weight=True, min_z=0.0):
    ids = [f"c{i:02d}" for i in range(n)]
    dp = P.DPSettings(clip=clip, noise_multiplier=z, delta=1e-5, mode="distributed", noise_shares=shares)
    strat = FedAvgStrategy(_g(), seed=1, clients_per_round=per_round, dp=dp, secagg=SecAggSettings())
    inner = DistributedDPClient(Offsets(), min_noise_multiplier=min_z, rng=rng)

    class Client(SecAggClient):
        def fit(self, cid, ins):
            if (drop or {}).get(cid) == ins.config.get("secagg_phase"):
                raise ConnectionError("lost")
            return super().fit(cid, ins)

    state = Simulator(strat, Client(inner, unit_weight=unit_weight), ids,
                      SimulatorSettings(rounds=1, progress=False, round_retries=0)).run()
    return state, strat


def test_each_client_clips_and_adds_its_share_and_the_server_sees_only_the_noisy_sum():
    noise = OnesNoise()
    state, strat = _distributed(6, 4, z=1.5, clip=1.0, rng=noise)
    rec = state.history[0]
    picked = rec["selected"]
    share = 1.5 * 1.0 / math.sqrt(4)
    assert noise.stds == [share] * (4 * len(SHAPES))  # every client, every array: std z C / sqrt(m)
    # oracle: each selected client's offset clipped to 1, plus its share (std everywhere), averaged over the 4
    for k, shape in SHAPES.items():
        total = np.zeros(shape)
        for cid in picked:
            res = Offsets().fit(cid, FitIns(_g(), {}))
            norm = math.sqrt(sum(float(np.sum(res.arrays[j].astype(np.float64) ** 2)) for j in SHAPES))
            total += res.arrays[k] * min(1.0, 1.0 / norm) + share
        np.testing.assert_allclose(state.global_arrays[k], total / 4, rtol=0, atol=1e-6)
    dp = rec["aggregate"]["dp"]
    assert dp["mode"] == "distributed" and dp["noise_shares"] == 4 and dp["round_noise_multiplier"] == 1.5
    assert dp["epsilon"] == pytest.approx(P.epsilon(6, 4, 1.5, 1, 1e-5))
    assert rec["aggregate"]["secagg"]["weight_sum"] == 4.0  # every client weighs 1, whatever its example count


def test_the_noise_in_the_sum_has_the_calibrated_total_std():
    shapes = {"w.lora_B.weight": (200, 100)}
    ids = [f"c{i}" for i in range(5)]
    dp = P.DPSettings(clip=1.0, noise_multiplier=2.0, delta=1e-5, mode="distributed")
    strat = FedAvgStrategy(_g(shapes), seed=1, clients_per_round=5, dp=dp, secagg=SecAggSettings())

    class Still:  # no update: what arrives is the noise alone
        def fit(self, cid, ins):
            return FitRes(cid, {k: v.copy() for k, v in ins.arrays.items()}, 3, {})

    state = Simulator(strat, SecAggClient(DistributedDPClient(Still()), unit_weight=True), ids,
                      SimulatorSettings(rounds=1, progress=False)).run()
    mean = state.global_arrays["w.lora_B.weight"].astype(np.float64)
    # the sum carries N(0, (z C)^2) per coordinate; the mean divides it by the 5 clients
    assert mean.std() == pytest.approx(2.0 / 5, rel=0.03) and abs(mean.mean()) < 0.01


def test_a_round_summed_from_fewer_shares_is_accounted_with_the_noise_it_had():
    state, strat = _distributed(6, 5, z=1.0, rng=OnesNoise())
    full = state.history[0]["aggregate"]["dp"]
    assert full["noise_shares"] == 5
    # one selected client lost after sharing its keys, before its masked input: 4 shares in the sum
    plan = FedAvgStrategy(_g(), seed=1, clients_per_round=5).select(1, [f"c{i:02d}" for i in range(6)])
    state, strat = _distributed(6, 5, z=1.0, rng=OnesNoise(), drop={plan[0]: 2})
    dp = state.history[0]["aggregate"]["dp"]
    assert dp["noise_shares"] == 4 and dp["round_noise_multiplier"] == pytest.approx(math.sqrt(4 / 5))
    assert dp["epsilon"] == pytest.approx(P.epsilon_of(6, 5, (math.sqrt(4 / 5),), 1e-5))
    assert dp["epsilon"] > full["epsilon"]


def test_a_client_refuses_a_server_that_turns_the_noise_down():
    client = DistributedDPClient(Offsets(), min_noise_multiplier=1.0)
    ins = FitIns(_g(), {"round": 1, "dp_clip": 1.0, "dp_share_std": 0.1, "dp_shares": 4, "dp_count_share_std": 0.0})
    with pytest.raises(UpdateRejected, match="noise multiplier 0.2, below this client's privacy.noise_multiplier = 1"):
        client.fit("c1", ins)
    with pytest.raises(UpdateRejected, match="lacks"):
        client.fit("c1", FitIns(_g(), {"round": 1}))


def test_a_client_that_claims_more_than_weight_one_fails_the_round():
    with pytest.raises(SecAggFailed, match="weights sum to"):
        _distributed(4, 4, unit_weight=False)


# ----------------------------------------------------------------------------- FedBPT


def test_fedbpt_central_dp_clips_noises_and_averages_the_prompt_means():
    d, m = 6, 3
    fixes = Fixes(prompt_norm_max=0.0, sigma_decay=0.9, sigma_min=0.05)
    dp = P.DPSettings(clip=0.5, noise_multiplier=0.8, delta=1e-5)
    strat = FedBPTStrategy(mode="improved", intrinsic_dim=d, sigma0=1.0, seed=0, rounds=3, num_clients=5,
                           popsize=4, local_iter=2, fixes=fixes, clients_per_round=m, dp=dp)
    strat.dp.rng = np.random.default_rng(11)
    g = strat.initial_arrays()
    plan = strat.configure_fit(1, g, [f"c{i}" for i in range(5)])
    rng = np.random.default_rng(0)
    means = [rng.standard_normal(d).astype(np.float32) * (i + 1) for i in range(m)]
    res = [FitRes(cid, {"mean": mu, "fitness": np.array([0.1 * i]), "sigmas": np.array([1.0])}, 10 * (i + 1))
           for i, (cid, mu) in enumerate(zip(plan, means))]
    for r in res:
        strat.check_reply(plan[r.client_id], r)
    new, metrics = strat.aggregate_fit(1, g, res)
    noise = np.random.default_rng(11).normal(0.0, 0.8 * 0.5, d)
    want = (sum(mu.astype(np.float64) * min(1.0, 0.5 / np.linalg.norm(mu.astype(np.float64))) for mu in means)
            + noise) / m  # sizes ignored: every client weighs the same
    np.testing.assert_allclose(new["mean"], want.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert new["sigma"][0] == pytest.approx(0.9)
    assert metrics["dp"]["epsilon"] == pytest.approx(P.epsilon(5, m, 0.8, 1, 1e-5))
    assert "fitness_best" not in metrics  # the clients' own fitness is not used, nor published


# ----------------------------------------------------------------------------- config


def test_privacy_modes_are_checked_by_the_config():
    with pytest.raises(ConfigError, match="set secagg.enabled = true"):
        C.load(None, ["privacy.mode='distributed'", "privacy.noise_multiplier=1.0"])
    cfg = C.load(None, ["privacy.mode='distributed'", "privacy.noise_multiplier=1.0", "secagg.enabled=true"])
    assert cfg.privacy.noise_shares == 0
    with pytest.raises(ConfigError, match="need each client's update"):
        C.load(None, ["privacy.mode='central'", "privacy.noise_multiplier=1.0", "secagg.enabled=true"])
    fedbpt = ["run.algorithm='fedbpt'", "privacy.noise_multiplier=1.0"]
    assert C.load(None, fedbpt + ["privacy.mode='central'"]).privacy.mode == "central"
    with pytest.raises(ConfigError, match="fedbpt.mode = 'improved'"):
        C.load(None, fedbpt + ["privacy.mode='central'", "fedbpt.mode='reference'"])
    with pytest.raises(ConfigError, match="FedBPT does not have"):
        C.load(None, fedbpt + ["privacy.mode='distributed'"])
    with pytest.raises(ConfigError, match="privacy.target_quantile"):
        C.load(None, ["privacy.mode='central'", "privacy.noise_multiplier=1.0", "privacy.target_quantile=1.5"])


def _gen_replies(plan, n, rows_of, perturb, seed=0):
    """Per-candidate loss sums (n per client) and row counts, client i with rows_of(i) rows."""
    rng = np.random.default_rng(seed)
    out = []
    for i, cid in enumerate(sorted(plan)):
        rows = rows_of(i)
        arrays = {"loss_sum": rows * (2.0 + (i + 1) * rng.standard_normal(n)), "rows": np.array([rows], np.int64)}
        if perturb:
            arrays["loss_sum_perturbed"] = rows * (3.0 + rng.random(n))
        out.append(FitRes(cid, arrays, rows))
    return out


@pytest.mark.parametrize("deep,perturb", [(False, False), (True, False), (False, True)],
                         ids=["generation", "deep-accept", "generation-perturb"])
def test_fedbpt_one_generation_central_dp_clips_centred_loss_vectors_and_weighs_clients_equally(deep, perturb):
    from fedtune.fedbpt.deep_strategy import DeepGenerationStrategy
    from fedtune.fedbpt.generation import GenerationStrategy

    d, m, popsize, clip, z = 5, 3, 4, 0.7, 0.9
    dp = P.DPSettings(clip=clip, noise_multiplier=z, delta=1e-5)
    kw = dict(intrinsic_dim=d, sigma0=0.5, seed=3, popsize=popsize, perturb=perturb, clients_per_round=m,
              dp=dp)
    def make():
        return DeepGenerationStrategy(n_layers=2, rounds_per_layer=1, accept=True, **kw) if deep \
            else GenerationStrategy(**kw)

    strat = make()
    strat.dp.rng = np.random.default_rng(11)
    g = strat.initial_arrays()
    plan = strat.configure_fit(1, g, [f"c{i}" for i in range(5)])
    n = strat.reply_size(next(iter(plan.values())))
    assert n == popsize + (2 if deep else 0)
    res = _gen_replies(plan, n, lambda i: 3 + 4 * i, perturb)
    for r in res:
        strat.check_reply(plan[r.client_id], r)
    _, metrics = strat.aggregate_fit(1, g, res)
    # the oracle: each client's mean losses, centred, clipped to the clip; summed; noise z*C; / m
    want = np.zeros(n)
    for r in res:
        v = r.arrays["loss_sum"] / r.arrays["rows"][0]
        if perturb:  # the client's own clean / perturbed ratio
            v = v / (r.arrays["loss_sum_perturbed"] / r.arrays["rows"][0])
        v = v - v.mean()
        want += v * min(1.0, clip / np.linalg.norm(v))
    want = (want + np.random.default_rng(11).normal(0.0, z * clip, n)) / m
    np.testing.assert_allclose(strat.log[-1], want, rtol=1e-12, atol=1e-12)
    assert metrics["dp"]["epsilon"] == pytest.approx(P.epsilon(5, m, z, 1, 1e-5))
    assert "rows" not in metrics  # the clients' row counts are not noised: not published
    # a client's weight is not its row count: the same mean losses from 10x the rows change nothing
    again = make()
    again.dp.rng = np.random.default_rng(11)
    plan2 = again.configure_fit(1, again.initial_arrays(), [f"c{i}" for i in range(5)])
    big = [FitRes(r.client_id, {k: v * 10 for k, v in r.arrays.items()}, r.num_examples * 10) for r in res]
    assert sorted(plan2) == sorted(plan)
    again.aggregate_fit(1, again.initial_arrays(), big)
    np.testing.assert_allclose(again.log[-1], strat.log[-1], rtol=1e-12, atol=1e-12)
    # a resumed strategy keeps the ledger: the next round's epsilon composes on the first
    arrays, meta = strat.state()
    resumed = make()
    resumed.load_state(arrays, meta)
    resumed.configure_fit(2, resumed.initial_arrays(), [f"c{i}" for i in range(5)])
    assert resumed.dp.accounting.round_z == strat.dp.accounting.round_z == [z]


def test_fedbpt_dp_modes_in_the_config():
    fedbpt = ["run.algorithm='fedbpt'", "privacy.mode='central'", "privacy.noise_multiplier=1.0"]
    assert C.load(None, fedbpt + ["fedbpt.mode='generation'", "fedbpt.deep=true"]).privacy.mode == "central"
    assert C.load(None, fedbpt + ["fedbpt.mode='generation'"]).fedbpt.perturb  # perturb's ratio: per client
    with pytest.raises(ConfigError, match="not 'reference'"):
        C.load(None, fedbpt + ["fedbpt.mode='reference'"])
