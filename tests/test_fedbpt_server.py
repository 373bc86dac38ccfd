"""FedBPT server step against numpy oracles; checkpoint state round trips; reply checks;
the wire budget. No model is loaded."""

import math

import numpy as np
import pytest

from fedtune.core.arrays import pack
from fedtune.core.strategy import FitIns, FitRes
from fedtune.errors import FedtuneError, UpdateRejected
from fedtune.fedbpt import objective as O
from fedtune.fedbpt.strategy import FedBPTStrategy, Fixes, improved_step, local_mu, rank_weights


def _strategy(mode, d=40, clients=10, fixes=None, **kw):
    args = dict(mode=mode, intrinsic_dim=d, sigma0=1.0, seed=1234, rounds=50, num_clients=clients, popsize=5,
                local_iter=8, fixes=fixes)
    args.update(kw)
    return FedBPTStrategy(**args)


def _results(rng, global_mean, k, d, step=0.05, sizes=None, dtype=np.float64, n_sigmas=8):
    out = []
    for i in range(k):
        mean = (global_mean + step * rng.standard_normal(d)).astype(dtype)
        sig = np.abs(1.0 + 0.1 * rng.standard_normal(n_sigmas))
        out.append(FitRes(f"c{i}", {"mean": mean, "fitness": np.array([rng.random()]), "sigmas": sig},
                          sizes[i] if sizes else 4))
    return out


def test_rank_weights_are_the_references():
    w = rank_weights(10)
    assert w.shape == (10,) and abs(w.sum() - 1) < 1e-12 and np.all(np.diff(w) < 0)
    np.testing.assert_allclose(w[[0, 1, 2, -1]], [0.2796, 0.1972, 0.1490, 0.0058], atol=1e-4)
    assert local_mu(5) == 2 and local_mu(20) == 10


def test_reference_step_matches_the_numpy_oracle():
    """One reference round, recomputed by hand: sigma_g from the clients' sigmas, the new mean
    = rank-weighted client means (small steps: cma does not repair them), C on the wire."""
    d, k = 40, 10
    rng = np.random.default_rng(0)
    s = _strategy("reference", d=d, clients=k)
    g = s.initial_arrays()
    assert set(g) == {"mean", "sigma", "C"} and g["mean"].dtype == np.float64 and g["C"].shape == (d, d)
    res = _results(rng, g["mean"], k, d)
    new, metrics = s.aggregate_fit(1, g, res)
    sq = sum(float(np.sum(r.arrays["sigmas"] ** 2)) for r in res)
    assert metrics["global_sigma"] == pytest.approx(math.sqrt(sq / k / local_mu(5)), rel=1e-12)
    fit = np.array([r.arrays["fitness"][0] for r in res])
    order = np.argsort(fit)
    oracle = sum(w * res[i].arrays["mean"] for w, i in zip(rank_weights(k), order))
    np.testing.assert_allclose(new["mean"], oracle, atol=1e-12)
    assert np.allclose(new["C"], np.eye(d), atol=0.02)  # covariance learning rates are small: C stays ~ I


def test_reference_sigma_floor_never_holds():
    """FedBPT's 0.5 floor is undone by the next line: once the carried sigma falls below 0.5 it
    stays there (we drive it down with client sigmas far below the current one)."""
    d, k = 40, 10
    rng = np.random.default_rng(1)
    s = _strategy("reference", d=d, clients=k)
    g = s.initial_arrays()
    sent = []
    for rnd in range(1, 30):
        res = _results(rng, g["mean"], k, d, step=1e-4, n_sigmas=8)
        g, _ = s.aggregate_fit(rnd, g, res)
        sent.append(float(g["sigma"][0]))
    assert min(sent) < 0.5  # no floor


def test_improved_step_oracle():
    rng = np.random.default_rng(2)
    means = rng.standard_normal((4, 30))
    fit = np.array([0.3, 0.1, 0.4, 0.2])
    sizes = np.array([1.0, 2.0, 3.0, 4.0])
    off = Fixes(weight_by_size=True, sigma_decay=0.5, sigma_min=0.2, prompt_norm_max=0.0)
    mean, sigma, w = improved_step(means, fit, sizes, 1.0, off)
    np.testing.assert_allclose(mean, (sizes / sizes.sum()) @ means, atol=1e-12)
    assert sigma == 0.5 and improved_step(means, fit, sizes, 0.3, off)[1] == 0.2  # anneals, the floor holds
    # rank weights: best fitness gets the largest weight
    mean, _, w = improved_step(means, fit, sizes, 1.0, Fixes(weight_by_size=False, prompt_norm_max=0.0))
    np.testing.assert_allclose(w[[1, 3, 0, 2]], rank_weights(4))
    # the norm ball: radius prompt_norm_max * sqrt(d)
    big = means * 100
    mean, _, _ = improved_step(big, fit, sizes, 1.0, Fixes(prompt_norm_max=0.5))
    assert np.linalg.norm(mean) == pytest.approx(0.5 * math.sqrt(30))
    # sigma_decay = 1: no annealing
    assert improved_step(means, fit, sizes, 0.7, Fixes(sigma_decay=1.0))[1] == 0.7


def test_improved_mean_lr_steps_part_of_the_way_from_the_last_global_mean():
    """Oracle: z_new = z_prev + lr * (sum_k n_k z_k / sum_k n_k - z_prev), then the norm ball; the
    config key reaches the strategy, and two rounds through aggregate_fit follow the formula."""
    from fedtune import config as C
    from fedtune.fedbpt.session import build_strategy

    rng = np.random.default_rng(5)
    means, prev = rng.standard_normal((3, 20)), rng.standard_normal(20)
    fit, sizes = np.array([0.3, 0.1, 0.2]), np.array([2.0, 5.0, 3.0])
    mean, _, _ = improved_step(means, fit, sizes, 1.0, Fixes(prompt_norm_max=0.0, mean_lr=0.25), prev)
    np.testing.assert_allclose(mean, prev + 0.25 * ((sizes[0] * means[0] + sizes[1] * means[1] + sizes[2] * means[2])
                                                    / 10.0 - prev), atol=1e-12)
    with pytest.raises(ValueError, match="previous global mean"):
        improved_step(means, fit, sizes, 1.0, Fixes(mean_lr=0.5))
    cfg = C.load(None, ["run.algorithm='fedbpt'", "fedbpt.mode='improved'", "fedbpt.mean_lr=0.5",
                        "fedbpt.intrinsic_dim=20", "fedbpt.prompt_norm_max=0.0"])
    s = build_strategy(cfg, 3)
    assert s.fixes.mean_lr == 0.5
    z = np.zeros(20)
    g = s.initial_arrays()
    for rnd in (1, 2):
        locals_ = [g["mean"] + rng.standard_normal(20).astype(np.float32) for _ in range(3)]
        res = [FitRes(f"c{i}", {"mean": m, "fitness": np.array([0.5]), "sigmas": np.array([0.3])}, n)
               for i, (m, n) in enumerate(zip(locals_, (1, 1, 2)))]
        g, _ = s.aggregate_fit(rnd, g, res)
        avg = (np.float64(locals_[0]) + locals_[1] + 2.0 * np.float64(locals_[2])) / 4.0
        z = z + 0.5 * (avg - z)
        np.testing.assert_allclose(s.mean, z, rtol=1e-12, atol=1e-12)


def test_seeds_same_for_all_in_reference_distinct_in_improved():
    ids = [f"client_{i:03d}" for i in range(5)]
    ref = _strategy("reference", clients=5)
    imp = _strategy("improved", clients=5)
    r1 = ref.configure_fit(1, ref.initial_arrays(), ids)
    assert {ins.config["es_seed"] for ins in r1.values()} == {1234}
    seeds = [ins.config["es_seed"] for rnd in (1, 2) for ins in imp.configure_fit(rnd, imp.initial_arrays(), ids).values()]
    assert len(set(seeds)) == 10


@pytest.mark.parametrize("mode", ["reference", "improved"])
def test_state_round_trip_continues_bit_for_bit(mode):
    d, k = 30, 6
    a = _strategy(mode, d=d, clients=k)
    rng = np.random.default_rng(3)
    g = a.initial_arrays()
    replies = [_results(rng, np.zeros(d), k, d, step=0.3, dtype=g["mean"].dtype) for _ in range(6)]
    for rnd in range(1, 4):
        g, _ = a.aggregate_fit(rnd, g, replies[rnd - 1])
    arrays, meta = a.state()
    arrays = {key: np.array(v) for key, v in arrays.items()}
    import json

    b = _strategy(mode, d=d, clients=k)
    b.load_state(arrays, json.loads(json.dumps(meta)))  # through JSON, as a checkpoint stores it
    ga, gb = g, {key: v.copy() for key, v in g.items()}
    for rnd in range(4, 7):
        ga, _ = a.aggregate_fit(rnd, ga, replies[rnd - 1])
        gb, _ = b.aggregate_fit(rnd, gb, replies[rnd - 1])
        for key in ga:
            assert np.array_equal(ga[key], gb[key]), (rnd, key)


def test_checkpoint_of_another_mode_is_refused():
    a = _strategy("improved")
    arrays, meta = a.state()
    with pytest.raises(FedtuneError, match="mode"):
        _strategy("reference").load_state(arrays, meta)


def test_reference_needs_all_clients():
    s = _strategy("reference", d=20, clients=10)
    res = _results(np.random.default_rng(0), np.zeros(20), 7, 20)
    with pytest.raises(FedtuneError, match="needs all 10"):
        s.aggregate_fit(1, s.initial_arrays(), res)


def test_check_reply_rejects_bad_replies():
    s = _strategy("improved", d=10)
    ins = FitIns(s.initial_arrays(), {})
    good = {"mean": np.zeros(10, np.float32), "fitness": np.array([0.5]), "sigmas": np.ones(3)}
    s.check_reply(ins, FitRes("c", good, 3))
    bad_cases = {
        "keys": {**good, "extra": np.zeros(1)},
        "shape": {**good, "mean": np.zeros(11, np.float32)},
        "dtype": {**good, "mean": np.zeros(10, np.float64)},
        "nan": {**good, "mean": np.full(10, np.nan, np.float32)},
        "sigmas": {**good, "sigmas": np.ones(9)},
        "negative": {**good, "sigmas": -np.ones(2)},
        "fitness": {**good, "fitness": np.array([1.0, 2.0])},
    }
    for name, arrays in bad_cases.items():
        with pytest.raises(UpdateRejected):
            s.check_reply(ins, FitRes("c", arrays, 3))
    with pytest.raises(UpdateRejected, match="num_examples"):
        s.check_reply(ins, FitRes("c", good, 0))


def test_improved_wire_is_under_8_kb_each_way_at_d_500():
    s = _strategy("improved", d=500)
    down = len(pack(s.initial_arrays()))
    up = len(pack({"mean": np.zeros(500, np.float32), "fitness": np.zeros(1), "sigmas": np.ones(8)}))
    assert down <= 8192 and up <= 8192, (down, up)
    ref = _strategy("reference", d=500)
    assert len(pack(ref.initial_arrays())) > 1_000_000  # the reference ships its covariance matrix


def test_losses_against_torch():
    import torch

    rng = np.random.default_rng(4)
    logits = rng.standard_normal((3, 7, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 7)
    for p in range(3):
        t, y = torch.tensor(logits[p]), torch.tensor(labels)
        assert O.ce_loss(logits, labels)[p] == pytest.approx(float(torch.nn.functional.cross_entropy(t, y)), rel=1e-5)
        assert O.hinge_loss(logits, labels)[p] == pytest.approx(
            float(torch.nn.functional.multi_margin_loss(t, y, margin=2.0)), rel=1e-5)
        assert O.loss("perf", logits, labels)[p] == pytest.approx(-float((t.argmax(1) == y).float().mean()))
    f = O.fitness("ce", logits, labels, logits[::-1].copy())
    np.testing.assert_allclose(f, O.ce_loss(logits, labels) / O.ce_loss(logits[::-1], labels))


def test_f1_binary_and_macro():
    labels = np.array([1, 1, 0, 0, 1])
    logits = np.zeros((1, 5, 2))
    logits[0, [0, 2, 3], 1] = 1.0  # predict 1 on rows 0, 2, 3
    # tp = 1 (row 0), fp = 2 (rows 2, 3), fn = 2 (rows 1, 4): F1 = 2 / (2 + 2 + 2)
    assert O.f1(logits, labels)[0] == pytest.approx(2 / 6)


def test_pair_tasks_report_accuracy_and_f1():
    """RTE (accuracy) and MRPC (F1) both get accuracy and F1; a one-text task gets no F1."""
    labels = np.array([1, 1, 0, 0, 1, 0])
    logits = np.zeros((1, 6, 2))
    logits[0, [0, 2, 3, 4], 1] = 1.0  # predict 1 on rows 0, 2, 3, 4: tp 2, fp 2, fn 1, right on rows 0, 4, 5
    rte = O.scores("accuracy", True, logits, labels)
    assert rte["accuracy"] == pytest.approx(3 / 6) and rte["f1"] == pytest.approx(4 / 7) and rte["score"] == rte["accuracy"]
    mrpc = O.scores("f1", True, logits, labels)
    assert mrpc["score"] == mrpc["f1"] == pytest.approx(4 / 7) and mrpc["accuracy"] == pytest.approx(0.5)
    assert "f1" not in O.scores("accuracy", False, logits, labels) and rte["rows"] == 6


def test_rank_weights_follow_hansens_formula():
    """Independent oracle: cma's default positive weights for a population of lam are
    w_i ∝ ln((lam + 1) / 2) - ln(i) for i = 1..mu, mu = lam // 2, normalized to sum 1
    (Hansen, The CMA Evolution Strategy: A Tutorial, eq. 49)."""
    for k in (2, 3, 4, 10, 17):
        lam = 2 * k
        mu = lam // 2
        raw = np.array([math.log((lam + 1) / 2) - math.log(i) for i in range(1, mu + 1)])
        np.testing.assert_allclose(rank_weights(k), raw / raw.sum(), rtol=1e-12)
    for popsize in (5, 8, 20):
        assert local_mu(popsize) == popsize // 2


def test_cma_draws_from_a_private_generator():
    """Another draw from numpy's global random state between two local searches changes
    nothing, and a search leaves the global state where it was."""
    from fedtune.fedbpt.client import LocalSettings, make_local_es

    def run(disturb):
        es = make_local_es(np.zeros(6), 0.5, 11, LocalSettings(popsize=4, local_iter=3))
        out = []
        for _ in range(3):
            if disturb:
                np.random.seed(disturb)
                np.random.standard_normal(100)
            z = np.array(es.ask())
            out.append(z)
            es.tell(list(z), [float(np.sum(x**2)) for x in z])
        return np.concatenate(out)

    assert np.array_equal(run(0), run(123))
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    run(0)
    assert np.array_equal(np.random.get_state()[1], before)
    # the same stream cma would have drawn after np.random.seed(11): the reference's mechanics are kept
    import cma

    ref = cma.CMAEvolutionStrategy(np.zeros(6), 1.0, {"seed": 11, "popsize": 4, "maxiter": 3, "verbose": -9,
                                                       "CMA_mu": None})
    es = make_local_es(np.zeros(6), 1.0, 11, LocalSettings(popsize=4, local_iter=3))
    assert np.array_equal(np.array(es.ask()), np.array(ref.ask()))


def test_reference_resume_tolerates_last_bit_differences_in_the_replayed_search():
    d, k = 12, 4
    a = _strategy("reference", d=d, clients=k)
    rng = np.random.default_rng(3)
    g = a.initial_arrays()
    for rnd in range(1, 4):
        g, _ = a.aggregate_fit(rnd, g, _results(rng, np.zeros(d), k, d, step=0.3, dtype=g["mean"].dtype))
    arrays, meta = a.state()
    arrays = {key: np.array(v) for key, v in arrays.items()}
    arrays["es/mean"] = arrays["es/mean"] * (1 + 1e-12)  # as another BLAS thread count may leave it
    meta = dict(meta, sigma=meta["sigma"] * (1 + 1e-12))
    b = _strategy("reference", d=d, clients=k)
    b.load_state(arrays, meta)  # accepted
    arrays["es/mean"] = arrays["es/mean"] + 1e-3  # a real mismatch is still refused
    with pytest.raises(FedtuneError, match="did not reproduce"):
        _strategy("reference", d=d, clients=k).load_state(arrays, meta)


def test_the_console_table_shows_a_pair_tasks_second_metric():
    from rich.console import Console

    from fedtune.summary_console import print_summary

    def summary(metric, test):
        return {"algorithm": "fedbpt", "metric": metric, "mode": "generation", "task": "rte", "rounds": 2,
                "selected": "best", "seconds": 1.0, **{k: {"round": 0, "dev": {"score": 0.5, "loss": 0.7},
                                                          "test": dict(test)} for k in ("zero_prompt", "best", "final")}}
    for metric, test, want in (("accuracy", {"score": 0.625, "accuracy": 0.625, "f1": 0.4, "loss": 0.69}, "test f1"),
                               ("f1", {"score": 0.4, "accuracy": 0.625, "f1": 0.4, "loss": 0.69}, "test accuracy")):
        console = Console(record=True, width=200)
        print_summary(summary(metric, test), console)
        text = console.export_text()
        assert want in text and "40.0%" in text and "62.5%" in text, text
    console = Console(record=True, width=200)  # a one-text task: no second column
    print_summary(summary("accuracy", {"score": 0.625, "accuracy": 0.625, "loss": 0.69}), console)
    assert "test f1" not in console.export_text()


@pytest.mark.parametrize("mode,explicit,want", [("reference", None, 1.0), ("improved", None, 0.3),
                                                ("generation", None, 0.3), ("reference", 0.5, 0.5),
                                                ("improved", 1.0, 1.0)])
def test_the_servers_first_step_is_the_modes_default_unless_set(mode, explicit, want):
    """fedbpt.sigma0 left at 0: FedBPT's 1.0 in reference mode, 0.3 in the others; a set value wins.
    The search is on by default (a config that holds a search's choice sets it false)."""
    from fedtune import config as C
    from fedtune.fedbpt.session import build_strategy

    cfg = C.load(None, ["run.algorithm='fedbpt'", f"fedbpt.mode='{mode}'", "fedbpt.intrinsic_dim=6",
                        *([f"fedbpt.sigma0={explicit}"] if explicit is not None else [])])
    assert cfg.fedbpt.search is True
    strat = build_strategy(cfg, num_clients=10)
    assert strat.sigma0 == want
    if mode != "generation":  # the step the first round sends
        assert strat.es.sigma == want if mode == "reference" else strat.sigma == want
