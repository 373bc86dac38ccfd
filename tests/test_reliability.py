"""Failing clients, update validation and robust aggregation, through the real Simulator and
FedAvgStrategy with numpy-only clients (fast: no model)."""

import importlib.util
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from fedtune.core import robust
from fedtune.core.aggregate import weighted_mean
from fedtune.core.strategy import FitRes
from fedtune.engines.faults import ClientTimeout, FaultInjector, call_with_time_limit
from fedtune.engines.simulator import RoundFailed, Simulator, SimulatorSettings
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"x.lora_A.weight": (2, 4), "x.lora_B.weight": (4, 2)}


def _initial():
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


class OffsetClients:
    """Client i returns global + 0.01 * (i + 1) on every array; `hooks[cid]` may replace the reply."""

    def __init__(self, n, hooks=None):
        self.ids = [f"c{i:02d}" for i in range(n)]
        self.sizes = {cid: 10 + 5 * i for i, cid in enumerate(self.ids)}
        self.hooks = hooks or {}
        self.calls = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def fit(self, cid, ins):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.calls.append((ins.config["round"], cid))
            i = self.ids.index(cid)
            out = {k: v + np.float32(0.01 * (i + 1)) for k, v in ins.arrays.items()}
            res = FitRes(cid, out, self.sizes[cid], {"train_loss": float(i)})
            hook = self.hooks.get(cid)
            return hook(ins, res) if hook else res
        finally:
            with self.lock:
                self.active -= 1


def _sim(clients, strategy=None, **settings):
    settings.setdefault("progress", False)
    faults = settings.pop("faults", None)
    run_dir = settings.pop("run_dir", None)
    globals_ = {}
    sim = Simulator(strategy or FedAvgStrategy(_initial(), seed=0), clients, clients.ids, SimulatorSettings(**settings),
                    run_dir=run_dir, faults=faults,
                    on_round_end=lambda rnd, arrays, rec: globals_.__setitem__(rnd, arrays))
    return sim, globals_


# ---------------------------------------------------------------------------- robust rules: numpy oracles


def _updates(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


@pytest.mark.parametrize("n", [1, 4, 5])
def test_coordinate_median_matches_numpy(n):
    ups = _updates(n)
    before = [{k: v.copy() for k, v in u.items()} for u in ups]
    med = robust.coordinate_median(ups)
    for k in SHAPES:
        oracle = np.median(np.stack([u[k].astype(np.float64) for u in ups]), axis=0)
        np.testing.assert_allclose(med[k], oracle, rtol=0, atol=1e-7)
        assert med[k].dtype == np.float32
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(ups, before) for k in SHAPES)  # inputs untouched


@pytest.mark.parametrize("n,trim", [(5, 0.2), (10, 0.2), (7, 0.3), (4, 0.0)])
def test_trimmed_mean_matches_a_sort_and_slice_oracle(n, trim):
    ups = _updates(n, seed=n)
    got = robust.trimmed_mean(ups, trim)
    cut = int(np.floor(trim * n))
    for k, shape in SHAPES.items():
        oracle = np.zeros(shape)
        for idx in np.ndindex(shape):  # one coordinate at a time, the plain definition
            vals = sorted(float(u[k][idx]) for u in ups)
            kept = vals[cut:n - cut]
            oracle[idx] = sum(kept) / len(kept)
        np.testing.assert_allclose(got[k], oracle, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="trim_fraction"):
        robust.trimmed_mean(ups, 0.5)


def test_clip_to_norm_bounds_the_distance_and_keeps_the_direction():
    g = _initial()
    u = {k: v + np.float32(3.0) for k, v in g.items()}
    norm = robust.update_norm(g, u)
    clipped, before = robust.clip_to_norm(g, u, 1.0)
    assert before == pytest.approx(norm) and norm > 1
    assert robust.update_norm(g, clipped) == pytest.approx(1.0, rel=1e-5)
    for k in g:  # same direction: the clipped delta is the original delta scaled by 1 / norm
        np.testing.assert_allclose(clipped[k] - g[k], (u[k] - g[k]) / norm, rtol=1e-5, atol=1e-6)
    same, _ = robust.clip_to_norm(g, u, 2 * norm)  # within the bound: unchanged, but a copy
    assert all(np.array_equal(same[k], u[k]) and same[k] is not u[k] for k in g)


def test_strategy_clips_before_the_rule_and_reports_who_was_clipped():
    g = _initial()
    results = [FitRes("a", {k: v + np.float32(0.1) for k, v in g.items()}, 1),
               FitRes("b", {k: v + np.float32(100.0) for k, v in g.items()}, 1)]
    new, metrics = FedAvgStrategy(g, seed=0, clip_norm=1.0).aggregate_fit(1, g, results)
    assert metrics["clipped"] == ["b"]
    clipped_b, _ = robust.clip_to_norm(g, results[1].arrays, 1.0)
    oracle = weighted_mean([(results[0].arrays, 1), (clipped_b, 1)])
    assert all(np.allclose(new[k], oracle[k], atol=1e-6) for k in g)
    with pytest.raises(ValueError, match="unknown aggregation"):
        FedAvgStrategy(g, seed=0, aggregation="kurm")


# ---------------------------------------------------------------------------- fault injection


def test_fault_draws_are_seeded_and_close_to_the_probability():
    f = FaultInjector(0.3, seed=5)
    draws = [f.draw(r, a, f"c{i}") for r in range(1, 41) for a in range(3) for i in range(20)]
    assert draws == [f.draw(r, a, f"c{i}") for r in range(1, 41) for a in range(3) for i in range(20)]
    rate = sum(d is not None for d in draws) / len(draws)
    assert 0.26 < rate < 0.34, rate
    assert {d for d in draws if d} == {"raise", "timeout", "disappear"}
    other = FaultInjector(0.3, seed=6)
    assert draws != [other.draw(r, a, f"c{i}") for r in range(1, 41) for a in range(3) for i in range(20)]
    assert FaultInjector(0.0).draw(1, 0, "c0") is None


def _run_with_faults(tmp_path, name):
    clients = OffsetClients(10)
    sim, globals_ = _sim(clients, rounds=6, min_clients=8, round_retries=5, client_timeout=0.05,
                         faults=FaultInjector(0.3, seed=3), run_dir=tmp_path / name)
    (tmp_path / name).mkdir()
    return sim.run(), globals_, clients


def test_thirty_percent_of_client_calls_fail_and_the_run_finishes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="fedtune.simulator")
    state, globals_, clients = _run_with_faults(tmp_path, "a")
    assert state.round == 6
    recs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == list(range(1, 7))  # each round once

    calls = sum(len(r["clients"]) + len(r["dropped"]) for r in recs)
    drops = [d for r in recs for d in r["dropped"]]
    assert 0.15 < len(drops) / calls < 0.45, (len(drops), calls)
    assert {d["cause"] for d in drops} == {"error", "timeout", "disappeared"}
    assert all(d["injected"] and d["reason"] for d in drops)
    assert any(r["attempts"] > 1 for r in recs), "expected at least one round below min_clients to be retried"
    for r in recs:
        assert len(r["clients"]) >= 8
        got = {c["id"] for c in r["clients"]}
        assert not got & {d["id"] for d in r["dropped"] if d["attempt"] == r["attempts"]}
    # every drop was logged with its reason
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert logged.count("dropped") == len(drops)
    assert "timeout: no reply within the time limit" in logged and "disappeared:" in logged
    # the global is exactly the FedAvg of the clients that reported, in plan order
    g = _initial()
    for r in recs:
        ups = [({k: v + np.float32(0.01 * (clients.ids.index(c["id"]) + 1)) for k, v in g.items()}, c["examples"])
               for c in r["clients"]]
        g = weighted_mean(ups)
        assert all(np.array_equal(globals_[r["round"]][k], g[k]) for k in g)
    # and the same seed gives the same faults and the same result
    state2, _, _ = _run_with_faults(tmp_path, "b")
    assert [[(d["id"], d["attempt"], d["cause"]) for d in r["dropped"]] for r in state.history] == \
           [[(d["id"], d["attempt"], d["cause"]) for d in r["dropped"]] for r in state2.history]
    assert all(np.array_equal(state.global_arrays[k], state2.global_arrays[k]) for k in SHAPES)


def test_a_round_below_min_clients_is_retried():
    first_try = set()

    def flaky(ins, res):  # in round 2 every client fails its first call
        if ins.config["round"] == 2 and res.client_id not in first_try:
            first_try.add(res.client_id)
            raise ConnectionError("connection reset")
        return res

    clients = OffsetClients(3)
    clients.hooks = {cid: flaky for cid in clients.ids}
    sim, _ = _sim(clients, rounds=3, min_clients=2, round_retries=1)
    state = sim.run()
    r2 = state.history[1]
    assert r2["attempts"] == 2 and [c["id"] for c in r2["clients"]] == clients.ids
    assert [(d["id"], d["attempt"], d["cause"]) for d in r2["dropped"]] == [(c, 1, "error") for c in clients.ids]
    assert "ConnectionError: connection reset" in r2["dropped"][0]["reason"]
    assert state.history[0]["attempts"] == state.history[2]["attempts"] == 1


def test_persistent_failure_stops_after_bounded_retries_with_a_clear_error():
    def down(ins, res):
        raise OSError("host unreachable")

    clients = OffsetClients(3)
    clients.hooks = {"c01": down, "c02": down}
    sim, _ = _sim(clients, rounds=1, min_clients=2, round_retries=2)
    with pytest.raises(RoundFailed, match=r"1 client update\(s\) arrived after 3 attempt\(s\).*c01: OSError: host unreachable"):
        sim.run()
    assert sorted(clients.calls) == sorted([(1, "c00")] + [(1, c) for c in ("c01", "c02")] * 3)  # c00 only once


class _ReleaseOnDrop(logging.Handler):
    """Sets `event` when the driver logs that `cid` was dropped (the event the tests wait on)."""

    def __init__(self, cid, event):
        super().__init__()
        self.cid, self.event = cid, event

    def emit(self, record):
        if f"client {self.cid} dropped" in record.getMessage():
            self.event.set()


def test_a_slow_client_is_dropped_at_its_time_limit_and_never_overlaps_the_next_call():
    dropped = threading.Event()

    def slow(ins, res):  # blocks until the driver has dropped it for its time limit, then replies late
        assert dropped.wait(30)
        dropped.clear()
        return res

    handler = _ReleaseOnDrop("c01", dropped)
    logging.getLogger("fedtune.driver").addHandler(handler)
    try:
        clients = OffsetClients(3, hooks={"c01": slow})
        sim, _ = _sim(clients, rounds=2, client_timeout=0.2)
        state = sim.run()
    finally:
        logging.getLogger("fedtune.driver").removeHandler(handler)
    for rec in state.history:
        assert [(d["id"], d["cause"], d["injected"]) for d in rec["dropped"]] == [("c01", "timeout", False)]
        assert "no reply within the time limit of 0.2s" in rec["dropped"][0]["reason"]
        assert [c["id"] for c in rec["clients"]] == ["c00", "c02"]
    assert clients.max_active == 1  # the late call ended before the next one started


def test_a_client_still_running_after_twice_its_limit_stops_the_run():
    release = threading.Event()

    def stuck(ins, res):  # never returns until the test is over
        release.wait(60)
        return res

    clients = OffsetClients(2, hooks={"c00": stuck})
    sim, _ = _sim(clients, rounds=1, client_timeout=0.1)
    try:
        with pytest.raises(RoundFailed, match="c00 is still running.*cannot be stopped"):
            sim.run()
    finally:
        release.set()


def test_call_with_time_limit_returns_raises_or_times_out():
    assert call_with_time_limit(lambda: 7, 1.0) == 7
    with pytest.raises(KeyError):
        call_with_time_limit(lambda: {}["x"], 1.0)
    release = threading.Event()
    with pytest.raises(ClientTimeout) as e:
        call_with_time_limit(lambda: release.wait(60), 0.05)
    assert e.value.thread.is_alive()
    release.set()
    e.value.thread.join()


# ---------------------------------------------------------------------------- update validation


def _bad(change):
    def hook(ins, res):
        arrays = {k: v.copy() for k, v in res.arrays.items()}
        n, metrics = res.num_examples, res.metrics
        out = change(arrays)
        if isinstance(out, tuple):
            arrays, n, metrics = out
        else:
            arrays = out
        return FitRes(res.client_id, arrays, n, metrics)
    return hook


A_KEY, B_KEY = sorted(SHAPES)
BAD_REPLIES = {
    "missing key": (lambda a: {A_KEY: a[A_KEY]}, r"keys differ: missing \['x.lora_B.weight'\]"),
    "unexpected key": (lambda a: {**a, "x.extra": np.zeros(2, np.float32)}, r"unexpected \['x.extra'\]"),
    "wrong shape": (lambda a: {**a, A_KEY: np.zeros((4, 2), np.float32)}, r"'x.lora_A.weight': shape \(4, 2\), expected \(2, 4\)"),
    "wrong dtype": (lambda a: {**a, A_KEY: a[A_KEY].astype(np.float64)}, r"dtype float64, expected float32"),
    "NaN": (lambda a: {**a, A_KEY: np.full((2, 4), np.nan, np.float32)}, r"holds NaN or Inf"),
    "Inf": (lambda a: {**a, B_KEY: np.full((4, 2), -np.inf, np.float32)}, r"holds NaN or Inf"),
    "norm above the bound": (lambda a: {k: v + np.float32(5.0) for k, v in a.items()}, r"update norm 20.* exceeds the bound 1"),
    "no examples": (lambda a: (a, 0, {}), r"num_examples = 0"),
    "non-JSON metrics": (lambda a: (a, 3, {"loss": [1, 2]}), r"metric 'loss' = \[1, 2\]: metrics must be numbers"),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
def test_invalid_updates_are_rejected_with_a_logged_reason(case, caplog):
    change, reason = BAD_REPLIES[case]
    caplog.set_level(logging.WARNING, logger="fedtune.simulator")
    clients = OffsetClients(3, hooks={"c01": _bad(change)})
    sim, _ = _sim(clients, FedAvgStrategy(_initial(), seed=0, max_update_norm=1.0), rounds=1)
    state = sim.run()
    rec = state.history[0]
    assert [c["id"] for c in rec["clients"]] == ["c00", "c02"]
    [drop] = rec["dropped"]
    assert drop["id"] == "c01" and drop["cause"] == "rejected"
    assert drop["reason"].startswith("rejected: ")
    import re

    assert re.search(reason, drop["reason"]), drop["reason"]
    assert any("c01 dropped" in r.getMessage() and re.search(reason, r.getMessage()) for r in caplog.records)


# ---------------------------------------------------------------------------- malicious clients


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "robust_aggregation.py"
    spec = importlib.util.spec_from_file_location("robust_aggregation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_twenty_percent_malicious_clients_degrade_fedavg_and_robust_rules_hold():
    """The runs of benchmarks/robust_aggregation.py (docs/reliability.md), checked."""
    B = _bench()
    runs = {(r, a): B.run_rule(r, a, rounds=40) for r in B.RULES for a in B.ATTACKS}
    final = {k: v["final_mse"] for k, v in runs.items()}
    early = {k: v["trace"][9] for k, v in runs.items()}
    clean = final[("fedavg", "none")]
    assert clean < 1.1 * B.NOISE ** 2  # FedAvg reaches the noise floor without attackers
    assert len(runs[("fedavg", "scaled")]["attackers"]) == 2
    for rule in B.RULES:
        assert final[(rule, "none")] < 1.1 * B.NOISE ** 2, rule  # no robust rule costs accuracy at the end

    # x(-10) scaled updates: FedAvg diverges; median and trimmed mean hold; clipping bounds the damage
    assert final[("fedavg", "scaled")] > 1e6 * clean
    for rule in ("median", "trimmed_mean (0.2)", "median + clip_norm 0.5"):
        assert final[(rule, "scaled")] < 1.1 * clean, (rule, final[(rule, "scaled")])
    assert final[("fedavg + clip_norm 0.5", "scaled")] < 20 * clean

    # sign-flipped updates: FedAvg is slowed (10x worse after 10 rounds); the robust rules hold
    assert early[("fedavg", "sign_flip")] > 5 * early[("fedavg", "none")]
    for rule in ("median", "trimmed_mean (0.2)"):
        assert early[(rule, "sign_flip")] < 0.5 * early[("fedavg", "sign_flip")], rule
        assert final[(rule, "sign_flip")] < 1.1 * clean, rule
