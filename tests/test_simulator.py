"""The engine with numpy-only clients: what each client receives, what the server averages,
drops, min_clients, checkpoints."""

import numpy as np
import pytest

from fedtune.core.arrays import pack, unpack
from fedtune.core.strategy import FitRes
from fedtune.core.checkpoint import load as load_checkpoint
from fedtune.engines.simulator import RoundFailed, Simulator, SimulatorSettings
from fedtune.errors import UpdateRejected
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"a.lora_A.weight": (3, 5), "a.lora_B.weight": (5, 3)}


class RecordingClient:
    """Adds a client-specific offset; records exactly what it was sent."""

    def __init__(self, sizes, fail=(), bad=()):
        self.sizes, self.fail, self.bad = sizes, set(fail), set(bad)
        self.received = {}

    def fit(self, cid, ins):
        self.received[(ins.config["round"], cid)] = {k: v.copy() for k, v in ins.arrays.items()}
        if cid in self.fail:
            raise RuntimeError("device lost")
        i = int(cid[1:])
        out = {k: v + np.float32(i + ins.config["round"]) for k, v in ins.arrays.items()}
        if cid in self.bad:
            out[next(iter(out))][0, 0] = np.nan
        return FitRes(cid, out, self.sizes[cid], {"train_loss": float(i)})


def _initial():
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def test_every_client_starts_from_the_global_and_server_averages(tmp_path):
    sizes = {"c0": 1, "c1": 3, "c2": 4}
    client = RecordingClient(sizes)
    strat = FedAvgStrategy(_initial(), seed=0)
    globals_ = {0: _initial()}
    sim = Simulator(strat, client, list(sizes), SimulatorSettings(rounds=3, progress=False), run_dir=tmp_path,
                    on_round_end=lambda rnd, arrays, rec: globals_.__setitem__(rnd, arrays))
    state = sim.run()
    for rnd in (1, 2, 3):
        g = globals_[rnd - 1]
        for cid in sizes:
            for k in g:
                assert np.array_equal(client.received[(rnd, cid)][k], g[k])  # bit for bit
        for k in g:  # numpy oracle: example-weighted mean of g + (i + rnd)
            ups = [g[k] + np.float32(i + rnd) for i in range(3)]
            oracle = np.average(np.stack(ups).astype(np.float64), axis=0, weights=[1, 3, 4])
            np.testing.assert_allclose(globals_[rnd][k], oracle, atol=1e-6, rtol=0)
    rec = state.history[-1]
    assert rec["bytes_down"] == 3 * len(pack(_initial())) and rec["bytes_up"] == rec["bytes_down"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3
    # the checkpoint holds the same state
    resumed = load_checkpoint(tmp_path, FedAvgStrategy(_initial(), seed=0))
    assert resumed.round == 3
    assert all(np.array_equal(resumed.global_arrays[k], state.global_arrays[k]) for k in SHAPES)


def test_failing_and_invalid_clients_are_dropped_with_reasons():
    sizes = {"c0": 1, "c1": 1, "c2": 1}
    client = RecordingClient(sizes, fail={"c1"}, bad={"c2"})
    sim = Simulator(FedAvgStrategy(_initial(), seed=0), client, list(sizes), SimulatorSettings(rounds=1, progress=False))
    state = sim.run()
    rec = state.history[0]
    reasons = {d["id"]: d["reason"] for d in rec["dropped"]}
    assert "device lost" in reasons["c1"] and "NaN" in reasons["c2"]
    assert [c["id"] for c in rec["clients"]] == ["c0"]
    for k in SHAPES:  # only c0's update was averaged
        assert np.allclose(state.global_arrays[k], _initial()[k] + 1)


def test_round_fails_below_min_clients():
    sizes = {"c0": 1, "c1": 1}
    client = RecordingClient(sizes, fail={"c0", "c1"})
    sim = Simulator(FedAvgStrategy(_initial(), seed=0), client, list(sizes),
                    SimulatorSettings(rounds=1, min_clients=1, progress=False))
    with pytest.raises(RoundFailed, match="device lost"):
        sim.run()


def test_wire_format_rejects_garbage():
    with pytest.raises(UpdateRejected):
        unpack(b"\x00\x01 not safetensors")
    blob = pack(_initial())
    assert all(np.array_equal(unpack(blob)[k], _initial()[k]) for k in SHAPES)
