import numpy as np

from fedtune.core.aggregate import weighted_mean
from fedtune.core.strategy import FitRes
from fedtune.fedit.strategy import FedAvgStrategy


def _rand(rng, shapes):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


SHAPES = {"x.lora_A.weight": (4, 16), "x.lora_B.weight": (16, 4), "y.lora_A.weight": (4, 8)}


def test_weighted_mean_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    ups = [_rand(rng, SHAPES) for _ in range(5)]
    w = [3, 10, 1, 7, 120]
    got = weighted_mean(list(zip(ups, w)))
    for k in SHAPES:
        oracle = np.average(np.stack([u[k] for u in ups]).astype(np.float64), axis=0, weights=w)
        assert got[k].dtype == np.float32
        np.testing.assert_allclose(got[k], oracle, atol=1e-6, rtol=0)


def test_fedavg_strategy_weights_by_examples_and_selects_all():
    rng = np.random.default_rng(1)
    g = _rand(rng, SHAPES)
    s = FedAvgStrategy(g, seed=0)
    plan = s.configure_fit(1, g, ["a", "b", "c"])
    assert list(plan) == ["a", "b", "c"] and plan["a"].config["round"] == 1
    ups = [_rand(rng, SHAPES) for _ in range(3)]
    res = [FitRes(c, u, n) for c, u, n in zip("abc", ups, [1, 2, 5])]
    new, _ = s.aggregate_fit(1, g, res)
    for k in SHAPES:
        oracle = (ups[0][k] * 1.0 + ups[1][k] * 2 + ups[2][k] * 5) / 8
        np.testing.assert_allclose(new[k], oracle, atol=1e-6)


def test_fedavgm_and_fedadam_match_numpy():
    rng = np.random.default_rng(2)
    g = _rand(rng, SHAPES)
    ups = [_rand(rng, SHAPES) for _ in range(2)]
    res = [FitRes(c, u, 1) for c, u in zip("ab", ups)]
    avg = {k: (ups[0][k].astype(np.float64) + ups[1][k]) / 2 for k in SHAPES}
    m = FedAvgStrategy(g, seed=0, aggregation="fedavgm", server_lr=0.5, momentum=0.9)
    new, _ = m.aggregate_fit(1, g, res)
    for k in SHAPES:
        np.testing.assert_allclose(new[k], g[k] + 0.5 * (avg[k] - g[k]), atol=1e-6)
    a = FedAvgStrategy(g, seed=0, aggregation="fedadam", server_lr=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    new, _ = a.aggregate_fit(1, g, res)
    for k in SHAPES:
        d = avg[k] - g[k]
        mm, vv = 0.1 * d, 0.99 * 1e-3**2 + 0.01 * d**2  # v starts at tau^2 (Reddi et al., Algorithm 2)
        np.testing.assert_allclose(new[k], g[k] + 0.1 * mm / (np.sqrt(vv) + 1e-3), atol=1e-5)
    # server state round-trips through plain arrays
    arrays, meta = a.state()
    b = FedAvgStrategy(g, seed=0, aggregation="fedadam")
    b.load_state(arrays, meta)
    assert b.steps == 1 and set(b.m) == set(SHAPES)


def test_selection_is_seeded_per_round_and_warns_on_single_client():
    import warnings

    from fedtune.core.selection import select_clients

    ids = [f"c{i}" for i in range(10)]
    a = select_clients(ids, 3, 42, fraction=0.3)
    assert a == select_clients(ids, 3, 42, fraction=0.3) and len(a) == 3
    assert any(select_clients(ids, r, 42, fraction=0.3) != a for r in range(4, 9))
    assert len(select_clients(ids, 1, 42, count=4)) == 4
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        select_clients(ids, 1, 42, fraction=0.1)
    assert any("only 1 of 10" in str(x.message) for x in w)
