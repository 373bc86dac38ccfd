"""Client-level DP-FedAvg: the accountant agrees with dp-accounting's own computation,
calibration meets the target, clipping and noise are applied exactly as configured (numpy
oracle with a seeded generator), and the budget stops a run before the round that would
exceed it, resumably."""

import numpy as np
import pytest

from fedtune import config as C
from fedtune.core import privacy as P
from fedtune.core.strategy import FitRes
from fedtune.errors import ConfigError
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"x.lora_A.weight": (2, 3), "x.lora_B.weight": (3, 2)}


def test_epsilon_is_dp_accountings_own_for_the_same_mechanism():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    for n, m, z, rounds in [(100, 10, 1.0, 12), (40, 4, 0.8, 8), (10, 10, 2.0, 5)]:
        acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2))
        for _ in range(rounds):
            acc.compose(event)  # one round at a time, as a reader of the definition would
        assert P.epsilon(n, m, z, rounds, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert P.epsilon(100, 10, 1.0, 0, 1e-5) == 0.0
    assert P.epsilon(100, 10, 1.0, 10, 1e-5) < P.epsilon(100, 10, 1.0, 20, 1e-5)  # spends more each round


def test_calibration_reaches_the_target_and_no_lower_noise_does():
    z = P.calibrate(200, 20, 30, 3.0, 1e-5)
    assert P.epsilon(200, 20, z, 30, 1e-5) <= 3.0 + 1e-6
    assert P.epsilon(200, 20, 0.97 * z, 30, 1e-5) > 3.0


def _updates(rng, g, n):
    return [{k: g[k] + rng.standard_normal(v.shape).astype(np.float32) * (i + 1) for k, v in g.items()}
            for i in range(n)]


def test_clipping_and_noise_are_exactly_as_configured():
    rng = np.random.default_rng(0)
    g = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    ups = _updates(rng, g, 4)
    strat = FedAvgStrategy(g, seed=0, clients_per_round=4,
                           dp=P.DPSettings(clip=0.5, noise_multiplier=1.3, delta=1e-5))
    strat.dp.rng = np.random.default_rng(123)
    ids = [f"c{i}" for i in range(10)]
    plan = strat.configure_fit(1, g, ids)
    res = [FitRes(cid, u, 1000 * (i + 1)) for i, (cid, u) in enumerate(zip(plan, ups))]  # counts are ignored
    new, metrics = strat.aggregate_fit(1, g, res)
    # numpy oracle: clip each delta to norm 0.5, sum, add N(0, (1.3 * 0.5)^2) drawn in key order, divide by m = 4
    noise_rng = np.random.default_rng(123)
    total = {k: np.zeros(s) for k, s in SHAPES.items()}
    for u in ups:
        delta = {k: u[k].astype(np.float64) - g[k] for k in SHAPES}
        norm = np.sqrt(sum(np.sum(d**2) for d in delta.values()))
        for k in SHAPES:
            total[k] += delta[k] * min(1.0, 0.5 / norm)
    for k in SHAPES:
        want = g[k] + (total[k] + noise_rng.normal(0.0, 0.65, SHAPES[k])) / 4
        np.testing.assert_allclose(new[k], want.astype(np.float32), rtol=1e-6, atol=1e-6)
    dp = metrics["dp"]
    assert dp["noise_multiplier"] == 1.3 and dp["clients"] == 10 and dp["clients_per_round"] == 4
    assert dp["epsilon"] == pytest.approx(P.epsilon(10, 4, 1.3, 1, 1e-5))
    assert sorted(metrics["clipped"]) == sorted(plan)  # every update here is longer than 0.5


def test_the_noise_is_not_the_run_seed():
    g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    outs = []
    for _ in range(2):
        strat = FedAvgStrategy(g, seed=0, dp=P.DPSettings(clip=1.0, noise_multiplier=1.0, delta=1e-5))
        strat.configure_fit(1, g, ["a", "b"])
        outs.append(strat.aggregate_fit(1, g, [FitRes("a", g, 1), FitRes("b", g, 1)])[0])
    assert not np.array_equal(outs[0]["x.lora_A.weight"], outs[1]["x.lora_A.weight"])


def test_a_budget_stops_before_the_round_that_would_exceed_it_and_resume_keeps_the_noise(tmp_path):
    from fedtune.core.checkpoint import load as load_checkpoint
    from fedtune.engines.simulator import Simulator, SimulatorSettings

    g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}

    class Clients:
        def fit(self, cid, ins):
            return FitRes(cid, {k: v + 0.1 for k, v in ins.arrays.items()}, 1, {"train_loss": 0.0})

    ids = [f"c{i}" for i in range(20)]
    dp = P.DPSettings(clip=1.0, noise_multiplier=0.0, delta=1e-5, target_epsilon=5.0, rounds=3)
    strat = FedAvgStrategy(g, seed=0, clients_per_round=5, dp=dp)
    state = Simulator(strat, Clients(), ids, SimulatorSettings(rounds=3, progress=False), run_dir=tmp_path).run()
    eps = [r["aggregate"]["dp"]["epsilon"] for r in state.history]
    assert eps == sorted(eps) and eps[-1] <= 5.0 + 1e-6  # calibrated: three rounds fit the budget
    z = state.history[0]["aggregate"]["dp"]["noise_multiplier"]
    # resumed with more rounds: the same z (never recalibrated mid-run), and a clean stop at the budget
    again = FedAvgStrategy(g, seed=0, clients_per_round=5,
                           dp=P.DPSettings(clip=1.0, noise_multiplier=0.0, delta=1e-5, target_epsilon=5.0, rounds=10))
    resumed = load_checkpoint(tmp_path, again)
    with pytest.raises(P.BudgetExhausted, match=r"round 4 would spend epsilon = .* > privacy.target_epsilon = 5"):
        Simulator(again, Clients(), ids, SimulatorSettings(rounds=10, progress=False), run_dir=tmp_path).run(resumed)
    assert again.dp.accounting.z == z
    assert load_checkpoint(tmp_path, FedAvgStrategy(g, seed=0, clients_per_round=5, dp=dp)).round == 3


def test_a_noise_multiplier_that_overspends_the_plan_refuses_to_start():
    g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strat = FedAvgStrategy(g, seed=0, clients_per_round=5,
                           dp=P.DPSettings(clip=1.0, noise_multiplier=0.3, delta=1e-5, target_epsilon=1.0, rounds=50))
    with pytest.raises(P.BudgetExhausted, match="more than privacy.target_epsilon = 1"):
        strat.configure_fit(1, g, [f"c{i}" for i in range(20)])


def test_privacy_config_is_checked():
    with pytest.raises(ConfigError, match="needs privacy.noise_multiplier > 0 or privacy.target_epsilon > 0"):
        C.load(None, ["privacy.mode='central'"])
    with pytest.raises(ConfigError, match="goes with a mean rule"):
        C.load(None, ["privacy.mode='central'", "privacy.noise_multiplier=1.0", "server.aggregation='median'"])
    cfg = C.load(None, ["privacy.mode='central'", "privacy.target_epsilon=8"])
    assert cfg.privacy.delta == 1e-5
