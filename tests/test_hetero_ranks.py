"""Heterogeneous LoRA ranks (lora.client_ranks): each client gets the first r_i components of
the global adapter; HetLoRA zero-pads the lower ranks into the mean, FlexLoRA re-factors the
mean of the products, so that a rank-4 client receives the best rank-4 approximation of the
global B A (numpy SVD oracle)."""

import json

import numpy as np
import pytest

from fedtune import config as C
from fedtune.core.strategy import FitRes
from fedtune.errors import ConfigError
from fedtune.fedit.strategy import FedAvgStrategy

A, B = "m.v_proj.lora_A.weight", "m.v_proj.lora_B.weight"
IDS = ["c0", "c1", "c2"]


def _adapter(rng, r, d_in=20, d_out=12):
    return {A: rng.standard_normal((r, d_in)).astype(np.float32), B: rng.standard_normal((d_out, r)).astype(np.float32)}


def _pad(a, r):  # the oracle's own zero-padding
    return {A: np.pad(a[A], ((0, r - a[A].shape[0]), (0, 0))), B: np.pad(a[B], ((0, 0), (0, r - a[B].shape[1])))}


def _round(strat, glob, rng, sizes=(3, 1, 2)):
    ins = strat.configure_fit(1, glob, IDS)
    replies = {cid: _adapter(rng, ins[cid].arrays[A].shape[0]) for cid in IDS}
    for cid in IDS:  # a reply has the shapes of what the client was sent
        strat.check_reply(ins[cid], FitRes(cid, replies[cid], sizes[IDS.index(cid)]))
    res = [FitRes(cid, replies[cid], n) for cid, n in zip(IDS, sizes)]
    return ins, replies, strat.aggregate_fit(1, glob, res)[0]


def test_each_client_gets_its_first_components_and_hetlora_zero_pads_into_the_mean():
    rng = np.random.default_rng(0)
    glob = _adapter(rng, 8)
    strat = FedAvgStrategy(glob, seed=0, client_ranks=[4, 8, 2])
    ins, replies, out = _round(strat, glob, rng)
    assert {cid: ins[cid].arrays[A].shape[0] for cid in IDS} == {"c0": 4, "c1": 8, "c2": 2}
    np.testing.assert_array_equal(ins["c0"].arrays[A], glob[A][:4])
    np.testing.assert_array_equal(ins["c2"].arrays[B], glob[B][:, :2])
    want = {k: (3 * _pad(replies["c0"], 8)[k] + 1 * replies["c1"][k] + 2 * _pad(replies["c2"], 8)[k]) / 6 for k in (A, B)}
    for k in (A, B):
        np.testing.assert_allclose(out[k], want[k], rtol=1e-6, atol=1e-6)


def test_flexlora_a_rank_4_client_receives_the_best_rank_4_approximation_of_the_global_product():
    rng = np.random.default_rng(1)
    glob = _adapter(rng, 8)
    strat = FedAvgStrategy(glob, seed=0, client_ranks=[4, 8, 2], lora_aggregation="svd", lora_rank=8)
    _, replies, out = _round(strat, glob, rng)
    mean = sum(n * (replies[c][B].astype(np.float64) @ replies[c][A].astype(np.float64))
               for c, n in zip(IDS, (3, 1, 2))) / 6
    u, s, vt = np.linalg.svd(mean)
    np.testing.assert_allclose(out[B] @ out[A], u[:, :8] * s[:8] @ vt[:8], rtol=1e-4, atol=1e-4)  # rank <= 8 + 4 + 2
    nxt = strat.configure_fit(2, out, IDS)["c0"].arrays  # the rank-4 client's share of the new global
    best4 = u[:, :4] * s[:4] @ vt[:4]  # Eckart-Young: the best rank-4 approximation of the global update
    np.testing.assert_allclose(nxt[B].astype(np.float64) @ nxt[A], best4, rtol=1e-4, atol=1e-4)
    assert nxt[A].shape == (4, 20) and nxt[B].shape == (12, 4)


def test_client_ranks_are_checked():
    with pytest.raises(ConfigError, match=r"lora.client_ranks = \[4, 16\]: each rank must be an integer between 1 "
                                          r"and lora.r = 8"):
        C.load(None, ["lora.client_ranks=[4, 16]"])
    with pytest.raises(ConfigError, match="goes with a mean rule"):
        C.load(None, ["lora.client_ranks=[4, 8]", "server.aggregation='median'"])


@pytest.mark.parametrize("agg", ["separate", "svd"])
def test_a_run_with_ranks_2_and_4_trains_each_client_at_its_rank(tiny_llama, tmp_path, agg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune import runner

    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'", "data.demo_rows_per_skill=24",
                        "partition.num_clients=3", "partition.test_per_category=2", "train.max_steps=2",
                        "train.batch_size=4", "train.micro_batch_size=2", "eval.generate=false",
                        "eval.compare_base=false", "run.rounds=2", "run.progress=false", "lora.r=4",
                        "lora.client_ranks=[2, 4]", f"server.lora_aggregation='{agg}'"])
    run = tmp_path / "run"
    run.mkdir()
    runner.run(cfg, run)
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    down = {c["id"]: c["bytes_down"] for c in rounds[-1]["clients"]}
    assert down["client_000"] < down["client_001"] and down["client_002"] == down["client_000"]  # ranks 2, 4, 2
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(base, run / "adapter")  # the global adapter is a plain rank-4 PEFT adapter
    assert model.peft_config["default"].r == 4
    from safetensors.numpy import load_file

    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert any(np.abs(v).sum() > 0 for k, v in saved.items() if "lora_B" in k)


def test_every_rank_applies_the_same_scale(tiny_llama):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from fedtune.fedit.lora import AdapterSlot, attach_lora, rank_slots

    peft = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), 8, 16, 0.0, ["v_proj"])
    slots = rank_slots(peft, AdapterSlot(peft), SimpleNamespace(client_ranks=[2, 8, 4], alpha=16, r=8, dropout=0.0,
                                                                target_modules=["v_proj"]))
    assert sorted(slots) == [2, 4, 8] and peft.active_adapter == "default"
    layer = peft.base_model.model.model.layers[0].self_attn.v_proj
    assert {name: layer.scaling[name] for name in layer.scaling} == {"default": 2.0, "rank2": 2.0, "rank4": 2.0}


def test_fedsa_lora_shares_a_and_keeps_each_clients_b(tiny_llama, tmp_path):
    """FedSA-LoRA: the global B never moves (it is the mean of the B's the clients were sent),
    A is the example-weighted mean of the clients' A's, each client starts round 2 from its own
    B, and each personalized model is evaluated on its own categories."""
    from safetensors.numpy import load_file

    from fedtune import runner
    from fedtune.core import arrays as A_
    from fedtune.core.client_state import ClientStateStore

    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'", "data.demo_rows_per_skill=24",
                        "partition.num_clients=3", "partition.test_per_category=2", "train.max_steps=2",
                        "train.batch_size=4", "train.micro_batch_size=2", "eval.generate=false",
                        "eval.compare_base=false", "run.rounds=2", "run.progress=false", "lora.personal_b=true"])
    run = tmp_path / "run"
    run.mkdir()
    summary = runner.run(cfg, run)
    final = A_.unpack((run / "checkpoint" / "global.safetensors").read_bytes())
    bs = [k for k in final if ".lora_B." in k]
    assert bs and all(np.all(final[k] == 0) for k in bs)  # the global B is still PEFT's zero init
    store = ClientStateStore(run / "client_state")
    own = {cid: store.load(cid, 10**9) for cid in ("client_000", "client_001", "client_002")}
    assert all(set(o) == set(bs) for o in own.values())
    assert not np.array_equal(own["client_000"][bs[0]], own["client_001"][bs[0]])  # personal, and trained
    assert all(np.abs(o[bs[0]]).sum() > 0 for o in own.values())
    per = summary["personalized"]
    assert sorted(per["clients"]) == sorted(own) and per["mean_loss"] > 0
    every = set(summary["final"]["loss_by_category"])
    assert all(0 < len(m["loss_by_category"]) < len(every) for m in per["clients"].values())  # its own categories
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(np.all(saved[k] == 0) for k in saved if "lora_B" in k)
    with pytest.raises(ConfigError, match="lora.personal_b .* without lora.freeze_a"):
        C.load(None, ["lora.personal_b=true", "lora.freeze_a=true"])
