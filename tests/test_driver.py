"""The round driver on its own: weights a client cannot choose, protocols with more than one
exchange per round, trimmed mean that must trim. numpy-only clients, no model."""

import logging

import numpy as np
import pytest

from fedtune import config as C
from fedtune.core.aggregate import weighted_mean
from fedtune.core.strategy import FitIns, FitRes, OneExchange, SelectingStrategy
from fedtune.engines.simulator import Simulator, SimulatorSettings
from fedtune.errors import ConfigError, UpdateRejected
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"x.lora_A.weight": (2, 3), "x.lora_B.weight": (3, 2)}


def _g():
    return {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


class Clients:
    """Client i returns global + (i + 1); `claims` may replace its reported example count."""

    def __init__(self, n, claims=None):
        self.ids = [f"c{i}" for i in range(n)]
        self.sizes = {cid: 10 for cid in self.ids}
        self.claims = claims or {}

    def fit(self, cid, ins):
        i = self.ids.index(cid)
        out = {k: v + np.float32(i + 1) for k, v in ins.arrays.items()}
        return FitRes(cid, out, self.claims.get(cid, self.sizes[cid]), {"train_loss": 0.0})


# ----------------------------------------------------------------------------- weights


def test_a_client_claiming_2_to_the_62_examples_is_rejected_when_the_server_knows_its_size():
    clients = Clients(4, claims={"c3": 2**62})
    state = Simulator(FedAvgStrategy(_g(), seed=0), clients, clients.ids,
                      SimulatorSettings(rounds=1, progress=False, known_sizes=clients.sizes)).run()
    rec = state.history[0]
    assert [d["id"] for d in rec["dropped"]] == ["c3"] and rec["dropped"][0]["cause"] == "rejected"
    assert "claims 4611686018427387904 examples; the server knows 10" in rec["dropped"][0]["reason"]
    oracle = weighted_mean([({k: np.full(s, i + 1, np.float32) for k, s in SHAPES.items()}, 10) for i in range(3)])
    assert all(np.array_equal(state.global_arrays[k], oracle[k]) for k in SHAPES)  # c3 has no say


def test_without_known_sizes_a_claim_is_capped_at_max_examples_and_flagged(caplog):
    caplog.set_level(logging.WARNING, logger="fedtune.driver")
    clients = Clients(4, claims={"c3": 2**62})
    state = Simulator(FedAvgStrategy(_g(), seed=0), clients, clients.ids,
                      SimulatorSettings(rounds=1, progress=False, max_examples=40)).run()
    rec = state.history[0]
    c3 = rec["clients"][3]
    assert c3["examples"] == 40 and c3["examples_claimed"] == 2**62 and c3["capped"]
    assert rec["weight_outliers"] == ["c3"] and "far above the round's median" in caplog.text
    # the numpy oracle: weights 10, 10, 10, 40 (not 2^62)
    for k, s in SHAPES.items():
        want = (10 * 1 + 10 * 2 + 10 * 3 + 40 * 4) / 70
        np.testing.assert_allclose(state.global_arrays[k], np.full(s, want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("claim", [0, -5, True, 2.5])
def test_a_count_that_is_not_a_positive_integer_is_rejected(claim):
    clients = Clients(3, claims={"c1": claim})
    state = Simulator(FedAvgStrategy(_g(), seed=0), clients, clients.ids,
                      SimulatorSettings(rounds=1, progress=False)).run()
    assert [d["id"] for d in state.history[0]["dropped"]] == ["c1"]


def test_config_caps_claims_by_default():
    assert C.load(None).server.max_examples == 1_000_000
    with pytest.raises(ConfigError, match="server.max_examples must be >= 0"):
        C.load(None, ["server.max_examples=-1"])


# ----------------------------------------------------------------------------- trimmed mean


def test_a_trimmed_mean_that_would_trim_nothing_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"trims nothing \(floor\(0.1 x 6\) = 0\).*at least 0.167"):
        C.load(None, ["server.aggregation='trimmed_mean'"])
    assert C.load(None, ["server.aggregation='trimmed_mean'", "server.trim_fraction=0.2"]).server.trim_fraction == 0.2


def test_a_round_whose_drops_leave_nothing_to_trim_warns_and_records_it(caplog):
    caplog.set_level(logging.WARNING, logger="fedtune.strategy")
    g = _g()
    strat = FedAvgStrategy(g, seed=0, aggregation="trimmed_mean", trim_fraction=0.2)
    res = [FitRes(f"c{i}", {k: v + np.float32(i) for k, v in g.items()}, 1) for i in range(5)]
    _, m = strat.aggregate_fit(1, g, res)
    assert m["trimmed_per_side"] == 1 and "trims nothing" not in caplog.text
    _, m = strat.aggregate_fit(2, g, res[:4])  # a client dropped: floor(0.2 x 4) = 0
    assert m["trimmed_per_side"] == 0 and "trims nothing" in caplog.text


# ----------------------------------------------------------------------------- several exchanges a round


class TwoPhase(SelectingStrategy):
    """A toy protocol in the shape of secure aggregation: phase 0 collects a 'masked' update
    (the update plus a per-client offset), phase 1 asks every accepted client for its offset,
    and the server subtracts the sum of offsets of the clients that answered both phases."""

    def __init__(self):
        super().__init__(seed=0)

    def initial_arrays(self):
        return _g()

    def configure_fit(self, rnd, global_arrays, client_ids):
        return {cid: FitIns(global_arrays, {"round": rnd, "phase": 0}) for cid in client_ids}

    def check_reply(self, ins, res):
        pass

    def aggregator(self, rnd, global_arrays):
        return TwoPhaseAgg(global_arrays)

    def state(self):
        return {}, {}

    def load_state(self, arrays, meta):
        pass


class TwoPhaseAgg(OneExchange):
    def __init__(self, g):
        self.g, self.masked, self.offsets, self.lost_ids, self.asked = g, {}, {}, [], False

    def add(self, res):
        self.masked[res.client_id] = res.arrays

    def next_exchange(self, accepted):
        if self.asked:
            return None
        self.asked = True
        return {cid: FitIns({"ping": np.zeros(1, np.float32)}, {"phase": 1}) for cid in accepted}

    def add_reply(self, phase, res):
        if phase != 1:
            raise UpdateRejected(f"phase {phase}")
        self.offsets[res.client_id] = res.arrays

    def lost(self, phase, cid, reason):
        self.lost_ids.append(cid)

    def result(self):
        ids = sorted(self.offsets)
        out = {k: np.mean([self.masked[c][k] - self.offsets[c]["offset"][0] for c in ids], axis=0).astype(np.float32)
               for k in self.g}
        return out, {"unmasked": ids, "lost": self.lost_ids}


class MaskingClients:
    def __init__(self, n, lose_in_phase_1=()):
        self.ids = [f"c{i}" for i in range(n)]
        self.lose = set(lose_in_phase_1)
        self.phases = []

    def fit(self, cid, ins):
        i = self.ids.index(cid)
        self.phases.append((cid, ins.config["phase"]))
        offset = np.float32(100 * (i + 1))
        if ins.config["phase"] == 0:
            return FitRes(cid, {k: v + np.float32(i + 1) + offset for k, v in ins.arrays.items()}, 1)
        if cid in self.lose:
            raise ConnectionError("gone between the phases")
        return FitRes(cid, {"offset": np.array([offset], np.float32)}, 1)


def test_a_round_can_carry_a_second_exchange_and_a_client_lost_in_it_is_reported():
    clients = MaskingClients(3, lose_in_phase_1={"c2"})
    state = Simulator(TwoPhase(), clients, clients.ids, SimulatorSettings(rounds=2, progress=False)).run()
    rec = state.history[-1]
    assert rec["exchanges"] == 2
    assert rec["aggregate"] == {"unmasked": ["c0", "c1"], "lost": ["c2"]}
    lost = [d for d in rec["dropped"] if d.get("phase") == 1]
    assert [d["id"] for d in lost] == ["c2"] and "gone between the phases" in lost[0]["reason"]
    assert clients.phases.count(("c0", 1)) == 2  # one second exchange per round
    for k, s in SHAPES.items():  # round 1: mean of 1 and 2; round 2: that + mean of 1 and 2 again
        np.testing.assert_allclose(state.global_arrays[k], np.full(s, 3.0), rtol=0, atol=1e-5)
