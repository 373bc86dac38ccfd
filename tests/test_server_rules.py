"""The server rules researchers compare against, each against an independent numpy oracle
written from its paper: FedOpt (FedAvgM, FedAdagrad, FedAdam, FedYogi; Reddi et al. 2021,
Algorithm 2), Krum / Multi-Krum (Blanchard et al. 2017), Bulyan (El Mhamdi et al. 2018)."""

import math
import re

import numpy as np
import pytest

from fedtune import config as C
from fedtune.core.strategy import FitRes
from fedtune.errors import ConfigError
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"a": (3, 4), "b": (5,)}


def _arrays(rng, scale=1.0):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _oracle_fedopt(rule, x0, means, lr, b1, b2, tau):
    """Algorithm 2 of Reddi et al., coordinate by coordinate in plain Python floats."""
    out = []
    for k in SHAPES:
        flat_x = [float(v) for v in x0[k].ravel()]
        n = len(flat_x)
        m, v = [0.0] * n, [tau * tau] * n
        xs = []
        x = flat_x[:]
        for mean in means:
            mu = [float(t) for t in mean[k].ravel()]
            for i in range(n):
                d = mu[i] - x[i]
                if rule == "fedavgm":
                    m[i] = b1 * m[i] + d
                    x[i] = x[i] + lr * m[i]
                    continue
                m[i] = b1 * m[i] + (1 - b1) * d
                if rule == "fedadagrad":
                    v[i] = v[i] + d * d
                elif rule == "fedadam":
                    v[i] = b2 * v[i] + (1 - b2) * d * d
                else:  # fedyogi
                    v[i] = v[i] - (1 - b2) * d * d * math.copysign(1.0, v[i] - d * d) if v[i] != d * d else v[i]
                x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
            xs.append(np.array(x).reshape(SHAPES[k]))
        out.append(xs)
    return [{k: out[j][r] for j, k in enumerate(SHAPES)} for r in range(len(means))]


@pytest.mark.parametrize("rule", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_one_fedopt_step_on_float32_adapters_matches_the_paper(rule):
    """Example-weighted mean of float32 updates, then one step of the rule; cast back to float32."""
    rng = np.random.default_rng(7)
    x0 = _arrays(rng)
    strat = FedAvgStrategy(x0, seed=0, aggregation=rule, server_lr=0.3, momentum=0.9, beta2=0.99, tau=1e-3)
    ups = [{k: x0[k] + _arrays(rng, 0.5)[k] for k in SHAPES} for _ in range(3)]
    res = [FitRes(f"c{i}", u, n) for i, (u, n) in enumerate(zip(ups, (1, 2, 5)))]
    mean = {k: sum(n * u[k].astype(np.float64) for u, n in zip(ups, (1, 2, 5))) / 8 for k in SHAPES}
    g, _ = strat.aggregate_fit(1, x0, res)
    want = _oracle_fedopt(rule, x0, [mean], 0.3, 0.9, 0.99, 1e-3)[-1]
    for k in SHAPES:
        assert g[k].dtype == np.float32
        np.testing.assert_allclose(g[k], want[k], rtol=1e-6, atol=1e-6, err_msg=f"{rule} {k}")


@pytest.mark.parametrize("rule", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_fedopt_state_carries_over_rounds_as_the_equations_say(rule):
    """Three rounds, the oracle in float64 end to end: globals stay float64 in both."""
    rng = np.random.default_rng(11)
    x0 = {k: rng.standard_normal(s) for k, s in SHAPES.items()}  # float64 globals
    strat = FedAvgStrategy(x0, seed=0, aggregation=rule, server_lr=0.1, momentum=0.8, beta2=0.95, tau=1e-2)
    g, means = x0, []
    for rnd in range(1, 4):
        ups = [{k: g[k] + 0.3 * rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(2)]
        means.append({k: (ups[0][k] + ups[1][k]) / 2 for k in SHAPES})
        g, _ = strat.aggregate_fit(rnd, g, [FitRes("a", ups[0], 4), FitRes("b", ups[1], 4)])
        want = _oracle_fedopt(rule, x0, means, 0.1, 0.8, 0.95, 1e-2)[-1]
        for k in SHAPES:
            np.testing.assert_allclose(g[k], want[k], rtol=1e-12, atol=1e-12, err_msg=f"{rule} round {rnd} {k}")
    arrays, meta = strat.state()  # and the state survives a checkpoint: the next round is the same
    again = FedAvgStrategy(x0, seed=0, aggregation=rule, server_lr=0.1, momentum=0.8, beta2=0.95, tau=1e-2)
    again.load_state({k: np.array(v) for k, v in arrays.items()}, meta)
    ups = [{k: g[k] + 0.3 * rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(2)]
    a, _ = strat.aggregate_fit(4, g, [FitRes("a", ups[0], 1), FitRes("b", ups[1], 1)])
    b, _ = again.aggregate_fit(4, g, [FitRes("a", ups[0], 1), FitRes("b", ups[1], 1)])
    assert all(np.array_equal(a[k], b[k]) for k in SHAPES)


def test_yogi_grows_v_more_slowly_than_adagrad():
    rng = np.random.default_rng(0)
    x0 = {"a": np.zeros(4)}
    big = {"a": np.full(4, 3.0)}
    y = FedAvgStrategy(x0, seed=0, aggregation="fedyogi", beta2=0.9)
    a = FedAvgStrategy(x0, seed=0, aggregation="fedadagrad")
    for rnd in range(1, 4):
        y.aggregate_fit(rnd, x0, [FitRes("c", big, 1)])
        a.aggregate_fit(rnd, x0, [FitRes("c", big, 1)])
    assert np.all(y.v["a"] < a.v["a"])


# ----------------------------------------------------------------------------- Krum family


def _krum_oracle_scores(vecs, f):
    n = len(vecs)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((vecs[i] - vecs[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return scores


def _vec(u):
    return np.concatenate([u[k].astype(np.float64).ravel() for k in sorted(u)])


def _honest_and_bad(n_honest, n_bad, seed=3):
    rng = np.random.default_rng(seed)
    center = _arrays(rng)
    honest = [{k: center[k] + 0.1 * _arrays(rng)[k] for k in SHAPES} for _ in range(n_honest)]
    bad = [{k: center[k] + 50.0 + 0.1 * _arrays(rng)[k] for k in SHAPES} for _ in range(n_bad)]
    return honest + bad, center


@pytest.mark.parametrize("f,m", [(1, 1), (2, 1), (1, 3), (2, 0)])
def test_krum_and_multi_krum_match_a_brute_force_oracle(f, m):
    ups, _ = _honest_and_bad(7, f)
    rule = "krum" if m == 1 else "multi_krum"
    strat = FedAvgStrategy(ups[0], seed=0, aggregation=rule, byzantine=f, krum_select=m)
    res = [FitRes(f"c{i}", u, 100 if i >= 7 else 1) for i, u in enumerate(ups)]  # weights are ignored
    agg, metrics = strat.aggregate_fit(1, ups[0], res)
    scores = _krum_oracle_scores([_vec(u) for u in ups], f)
    k = 1 if m == 1 else (m or len(ups) - f)
    chosen = sorted(range(len(ups)), key=lambda i: (scores[i], i))[:k]
    want = np.mean([_vec(ups[i]) for i in chosen], axis=0)
    np.testing.assert_allclose(_vec(agg), want, rtol=1e-6, atol=1e-6)
    assert metrics["selected"] == [f"c{i}" for i in chosen]
    assert not any(i >= 7 for i in chosen)  # the far-away updates are never picked


def test_bulyan_matches_its_definition_and_resists_outliers():
    f = 1
    ups, center = _honest_and_bad(6, f)  # n = 7 = 4f + 3
    strat = FedAvgStrategy(ups[0], seed=0, aggregation="bulyan", byzantine=f)
    agg, metrics = strat.aggregate_fit(1, ups[0], [FitRes(f"c{i}", u, 1) for i, u in enumerate(ups)])
    # oracle: theta = n - 2f picks by iterated Krum, then per coordinate the beta = theta - 2f values nearest the median
    vecs = [_vec(u) for u in ups]
    pool, picked = list(range(len(vecs))), []
    for _ in range(len(vecs) - 2 * f):
        sub = [vecs[i] for i in pool]
        sc = _krum_oracle_scores(sub, f) if len(sub) >= 2 * f + 3 else [0.0] * len(sub)
        best = pool[min(range(len(pool)), key=lambda j: (sc[j], j))]
        picked.append(best)
        pool.remove(best)
    sel = np.array([vecs[i] for i in picked])
    beta = len(picked) - 2 * f
    want = np.empty(sel.shape[1])
    for c in range(sel.shape[1]):
        col = sel[:, c]
        med = float(np.median(col))
        near = sorted(range(len(col)), key=lambda j: (abs(col[j] - med), j))[:beta]
        want[c] = np.mean(col[near])
    np.testing.assert_allclose(_vec(agg), want, rtol=1e-6, atol=1e-6)
    assert "c6" not in metrics["selected"] and np.max(np.abs(_vec(agg) - _vec(center))) < 1.0


def test_distance_rules_need_enough_clients():
    with pytest.raises(ConfigError, match=r"'krum' with server.byzantine = 2 needs at least 7 clients per round"):
        C.load(None, ["server.aggregation='krum'", "server.byzantine=2", "server.min_clients=6"])
    with pytest.raises(ConfigError, match=r"set server.min_clients >= 5"):
        C.load(None, ["server.aggregation='krum'"])
    C.load(None, ["server.aggregation='krum'", "server.min_clients=5"])
    with pytest.raises(ConfigError, match="'bulyan' .* needs at least 7 clients per round"):
        C.load(None, ["server.aggregation='bulyan'", "server.min_clients=6"])


def _oracle_fedexp(x0, ups, counts, eps):
    """FedExP, Algorithm 1 of Jhunjhunwala et al. (ICLR 2023), on one flat float64 vector per party."""
    flat = lambda a: np.concatenate([a[k].astype(np.float64).ravel() for k in SHAPES])  # noqa: E731
    x, deltas = flat(x0), [flat(u) - flat(x0) for u in ups]
    p = np.array(counts, dtype=np.float64) / sum(counts)
    mean = sum(pi * d for pi, d in zip(p, deltas))
    eta = max(1.0, sum(pi * float(d @ d) for pi, d in zip(p, deltas)) / (2 * (float(mean @ mean) + eps)))
    new, out, at = x + eta * mean, {}, 0
    for k, s in SHAPES.items():
        out[k] = new[at:at + math.prod(s)].reshape(s)
        at += math.prod(s)
    return out, eta


def test_fedexp_extrapolates_as_the_paper_says():
    """Diverse updates: the server step grows past FedAvg's by the ratio of the clients' mean squared
    update norm to twice the squared norm of their mean; the step is reported in the round's metrics."""
    rng = np.random.default_rng(3)
    x0 = _arrays(rng)
    counts = (1, 2, 2, 3, 3, 5)
    ups = [{k: x0[k] + _arrays(rng, 0.5)[k] for k in SHAPES} for _ in counts]
    strat = FedAvgStrategy(x0, seed=0, aggregation="fedexp", fedexp_epsilon=1e-3)
    g, metrics = strat.aggregate_fit(1, x0, [FitRes(f"c{i}", u, n) for i, (u, n) in enumerate(zip(ups, counts))])
    want, eta = _oracle_fedexp(x0, ups, counts, 1e-3)
    assert eta > 2.0 and metrics["server_lr"] == pytest.approx(eta, rel=1e-6)  # the mean is float32, as the adapter
    assert metrics["fedexp_ratio"] == metrics["server_lr"]
    for k in SHAPES:
        assert g[k].dtype == np.float32
        np.testing.assert_allclose(g[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # a larger epsilon damps the step towards FedAvg's, never below it
    big = FedAvgStrategy(x0, seed=0, aggregation="fedexp", fedexp_epsilon=1e6)
    g1, m1 = big.aggregate_fit(1, x0, [FitRes(f"c{i}", u, n) for i, (u, n) in enumerate(zip(ups, counts))])
    mean = {k: sum(n * u[k].astype(np.float64) for u, n in zip(ups, counts)) / sum(counts) for k in SHAPES}
    assert m1["server_lr"] == 1.0 and 0 < m1["fedexp_ratio"] < 1e-5
    for k in SHAPES:
        np.testing.assert_allclose(g1[k], mean[k], rtol=1e-6, atol=1e-6)


def test_fedexp_with_agreeing_clients_is_fedavg():
    """Identical updates: Σ p_i ||Δ_i||² = ||Δ||², so η = max(1, 1/2) = 1, the plain mean."""
    rng = np.random.default_rng(5)
    x0 = _arrays(rng)
    u = {k: x0[k] + _arrays(rng, 0.2)[k] for k in SHAPES}
    strat = FedAvgStrategy(x0, seed=0, aggregation="fedexp", fedexp_epsilon=0.0)
    g, metrics = strat.aggregate_fit(1, x0, [FitRes("a", u, 3), FitRes("b", dict(u), 7)])
    assert metrics["server_lr"] == 1.0 and metrics["fedexp_ratio"] == pytest.approx(0.5, rel=1e-6)
    assert all(np.array_equal(g[k], u[k]) for k in SHAPES)


def test_fedexp_needs_each_update_so_the_config_refuses_secagg_dp_and_ranks():
    for extra, what in ((["secagg.enabled=true"], "secagg.enabled"), (["privacy.mode='central'",
                        "privacy.noise_multiplier=1.0"], "privacy.mode = 'central'"),
                        (["lora.client_ranks=[4, 8]"], "lora.client_ranks")):
        with pytest.raises(ConfigError, match=re.escape(what)):
            C.load(None, ["server.aggregation='fedexp'", *extra])
    with pytest.raises(ConfigError, match="server.fedexp_epsilon must be >= 0"):
        C.load(None, ["server.aggregation='fedexp'", "server.fedexp_epsilon=-1.0"])
    assert C.load(None, ["server.aggregation='fedexp'"]).server.fedexp_epsilon == 1e-3
