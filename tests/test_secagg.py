"""Secure aggregation through the real round driver with numpy clients: the unmasked result
equals the plain weighted mean within the fixed-point error; what the server receives from a
client is indistinguishable from uniform; dropouts after masking up to the threshold still
give the exact sum, beyond it a clear error; malformed and replayed messages are rejected."""

import numpy as np
import pytest

from fedtune.core import secagg_crypto as X
from fedtune.core.secagg import SecAggFailed, SecAggSettings, neighbours
from fedtune.core.secagg_client import SecAggClient
from fedtune.core.strategy import FitIns, FitRes
from fedtune.engines.simulator import Simulator, SimulatorSettings
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"x.lora_A.weight": (3, 4), "x.lora_B.weight": (4, 3)}


class Numpy:
    """Client i returns global + its own offset; weight = 2 + i."""

    def fit(self, cid, ins):
        i = int(cid[1:])
        rng = np.random.default_rng(i)
        return FitRes(cid, {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in ins.arrays.items()},
                      2 + i, {"train_loss": 0.0})


class Dropping(SecAggClient):
    """Raises in the exchanges named for each client (a client lost mid-protocol)."""

    def __init__(self, inner, drop):
        super().__init__(inner)
        self.drop, self.seen = drop, []

    def fit(self, cid, ins):
        phase = ins.config.get("secagg_phase")
        self.seen.append((cid, phase))
        if phase in self.drop.get(cid, ()):
            raise ConnectionError(f"lost in exchange {phase}")
        return super().fit(cid, ins)


def _g():
    return {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


def _oracle(ids):
    num = {k: np.zeros(s) for k, s in SHAPES.items()}
    total = 0.0
    for cid in ids:
        res = Numpy().fit(cid, FitIns(_g(), {}))
        for k in SHAPES:
            num[k] += res.num_examples * res.arrays[k].astype(np.float64)
        total += res.num_examples
    return {k: v / total for k, v in num.items()}


def _run(n, settings, drop=None, min_clients=1):
    ids = [f"c{i:02d}" for i in range(n)]
    client = Dropping(Numpy(), drop or {})
    strat = FedAvgStrategy(_g(), seed=3, secagg=settings)
    state = Simulator(strat, client, ids, SimulatorSettings(rounds=1, progress=False, round_retries=0,
                                                            min_clients=min_clients)).run()
    return state, ids, client


@pytest.mark.parametrize("k", [0, 4])  # every pair (SecAgg) and a sparse ring (SecAgg+)
def test_the_unmasked_sum_is_the_weighted_mean(k):
    state, ids, _ = _run(8, SecAggSettings(neighbours=k))
    want = _oracle(ids)
    for key in SHAPES:
        np.testing.assert_allclose(state.global_arrays[key], want[key], rtol=0, atol=2 ** -20)
    rec = state.history[0]
    assert rec["exchanges"] == 4 and rec["aggregate"]["secagg"]["survivors"] == 8
    assert all(c["bytes_up"] > 0 for c in rec["clients"])


def test_a_masked_input_looks_uniform():
    """Chi-square test on the bytes a client sends in exchange 2 (uniform modulo 2^64 means
    uniform bytes): the statistic stays well inside what uniform data gives."""
    from fedtune.core.secagg import flatten, mask_info, sign

    rng = np.random.default_rng(0)
    update = {"w": np.full(4000, 0.25)}  # a very non-random input
    vec = X.encode(flatten(update, 3.0))
    b = bytes(rng.integers(0, 256, 16, dtype=np.uint8))
    sk, _ = X.new_keypair()
    _, peer = X.new_keypair()
    masked = vec + X.prg(b, vec.size) + sign("a", "b") * X.prg(X.agree(sk, peer, mask_info(1, "a", "b")), vec.size)
    counts = np.bincount(masked.view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 360  # 255 degrees of freedom: p ~ 1e-5 at 360
    raw = np.bincount(vec.view(np.uint8), minlength=256)  # and the unmasked encoding is far from uniform
    assert float(np.sum((raw - raw.sum() / 256) ** 2 / (raw.sum() / 256))) > 10_000


def test_dropouts_after_masking_up_to_the_threshold_still_give_the_exact_sum():
    # c03 and c05 send their masked inputs, then vanish before unmasking; c01 vanishes after sharing keys
    state, ids, _ = _run(8, SecAggSettings(neighbours=0, threshold=4),
                         drop={"c03": (3,), "c05": (3,), "c01": (2,)})
    survivors = [c for c in ids if c != "c01"]  # the masked inputs that arrived
    want = _oracle(survivors)
    for key in SHAPES:
        np.testing.assert_allclose(state.global_arrays[key], want[key], rtol=0, atol=2 ** -20)
    agg = state.history[0]["aggregate"]["secagg"]
    assert agg["survivors"] == 7 and agg["dropped_after_sharing"] == 1
    assert {(d["id"], d["phase"]) for d in state.history[0]["dropped"]} == {("c01", 2), ("c03", 3), ("c05", 3)}


def test_beyond_the_threshold_the_round_fails_with_a_clear_error():
    with pytest.raises(SecAggFailed, match=r"cannot remove .* share\(s\) arrived, 5 needed .*resumes from the last checkpoint"):
        _run(6, SecAggSettings(neighbours=0, threshold=5), drop={"c00": (3,), "c01": (3,)})


def test_a_replayed_or_altered_share_and_a_greedy_server_are_refused():
    client = SecAggClient(Numpy())
    ids = ["c00", "c01", "c02"]
    keys = {cid: client.fit(cid, FitIns(_g(), {"round": 1, "secagg_phase": 0})).arrays for cid in ids}
    graph = neighbours(ids, 0, 0, 1)
    cts = {}
    for cid in ids:
        arrays = {f"{kind}/{j}": keys[j][kind] for j in graph[cid] for kind in ("c_pk", "s_pk")}
        cts[cid] = client.fit(cid, FitIns(arrays, {"round": 1, "secagg_phase": 1, "threshold": 2,
                                                   "neighbours": graph[cid]})).arrays
    # c00's inbox: the share from c01 is replaced by the one c01 sealed for c02 (wrong recipient)
    inbox = {"ct/c01": cts["c01"]["ct/c02"], "ct/c02": cts["c02"]["ct/c00"]}
    client.fit("c00", FitIns(inbox, {"round": 1, "secagg_phase": 2, "alive": ["c01", "c02"]}))
    with pytest.raises(Exception, match="does not authenticate"):
        client.fit("c00", FitIns({"nothing": np.zeros(1, np.uint8)},
                                 {"round": 1, "secagg_phase": 3, "survivors": ["c01", "c02"], "dropped": []}))
    inbox = {"ct/c00": cts["c00"]["ct/c01"], "ct/c02": cts["c02"]["ct/c01"]}
    client.fit("c01", FitIns(inbox, {"round": 1, "secagg_phase": 2, "alive": ["c00", "c02"]}))
    with pytest.raises(Exception, match="both secrets"):
        client.fit("c01", FitIns({"nothing": np.zeros(1, np.uint8)},
                                 {"round": 1, "secagg_phase": 3, "survivors": ["c00"], "dropped": ["c00"]}))
    with pytest.raises(Exception, match="no state for round 2"):  # a message from another round
        client.fit("c02", FitIns({}, {"round": 2, "secagg_phase": 2, "alive": []}))


def test_a_malformed_masked_input_is_rejected_by_the_server():
    class Bad(SecAggClient):
        def fit(self, cid, ins):
            res = super().fit(cid, ins)
            if cid == "c02" and ins.config.get("secagg_phase") == 2:
                return FitRes(cid, {"masked": res.arrays["masked"][:-1]}, 1, {})
            return res

    ids = [f"c{i:02d}" for i in range(5)]
    state = Simulator(FedAvgStrategy(_g(), seed=0, secagg=SecAggSettings(threshold=3)), Bad(Numpy()), ids,
                      SimulatorSettings(rounds=1, progress=False)).run()
    (drop,) = [d for d in state.history[0]["dropped"] if d["id"] == "c02"]
    assert drop["cause"] == "rejected" and "masked input is uint64" in drop["reason"]
    for key in SHAPES:  # c02 counted as dropped after sharing: its masks are removed, the rest is exact
        np.testing.assert_allclose(state.global_arrays[key], _oracle([c for c in ids if c != "c02"])[key],
                                   rtol=0, atol=2 ** -20)
