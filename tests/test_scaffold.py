"""SCAFFOLD on LoRA adapters: the server step against a numpy oracle of Karimireddy et al.'s
equations, the client's control-variate update and gradient correction on a tiny Llama, and
client state that survives a crash mid-round without drifting."""

import numpy as np
import pytest
import torch

from conftest import tiny_lora_trainer

from fedtune.core.client_state import ClientStateStore
from fedtune.core.strategy import FitIns, FitRes
from fedtune.fedit.scaffold import VARIATE_PREFIX, split_variates, with_variates
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"m.lora_A.weight": (2, 3), "m.lora_B.weight": (3, 2)}


def test_server_step_matches_the_papers_equations():
    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    strat = FedAvgStrategy(x, seed=0, aggregation="scaffold", server_lr=0.5)
    ids = [f"c{i}" for i in range(5)]  # N = 5, 3 reply
    plan = strat.configure_fit(1, x, ids)
    sent = plan["c0"].arrays
    assert sorted(sent) == sorted(list(SHAPES) + [VARIATE_PREFIX + k for k in SHAPES])
    assert all(np.all(sent[VARIATE_PREFIX + k] == 0) for k in SHAPES)  # c starts at 0
    ys = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(3)]
    dcs = [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(3)]
    sizes = [2, 3, 5]
    res = [FitRes(f"c{i}", with_variates(y, dc), n) for i, (y, dc, n) in enumerate(zip(ys, dcs, sizes))]
    new_x, metrics = strat.aggregate_fit(1, x, res)
    for k in SHAPES:
        mean_y = sum(n * y[k].astype(np.float64) for y, n in zip(ys, sizes)) / sum(sizes)
        np.testing.assert_allclose(new_x[k], x[k] + 0.5 * (mean_y - x[k]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(strat.c[k], sum(dc[k].astype(np.float64) for dc in dcs) / 5, rtol=1e-6, atol=1e-7)
    # the next round sends the new c, and it survives a checkpoint
    arrays, meta = strat.state()
    again = FedAvgStrategy(x, seed=0, aggregation="scaffold", server_lr=0.5)
    again.load_state(arrays, meta)
    assert all(np.array_equal(again.c[k], strat.c[k]) for k in SHAPES)
    sent2 = strat.configure_fit(2, new_x, ids)["c1"].arrays
    assert all(np.array_equal(sent2[VARIATE_PREFIX + k], strat.c[k]) for k in SHAPES)
    assert metrics["control_variate_norm"] > 0


def test_client_state_store_reads_only_earlier_rounds_and_keeps_two(tmp_path):
    store = ClientStateStore(tmp_path)
    assert store.load("c/1", 1) is None
    for rnd in (1, 2, 3):
        store.save("c/1", rnd, {"v": np.full(2, rnd, np.float32)})
    assert store.load("c/1", 3)["v"][0] == 2  # round 3 rerun after a crash reads round 2's state
    assert store.load("c/1", 4)["v"][0] == 3
    assert sorted(p.name for p in next(tmp_path.iterdir()).iterdir()) == ["r000002.safetensors", "r000003.safetensors"]


def test_client_update_correction_and_variate_on_a_tiny_llama(tiny_llama, tmp_path):
    from fedtune.fedit.client import FedITClientApp
    from fedtune.fedit.lora import init_adapter

    slot, tok, rows, train = tiny_lora_trainer(tiny_llama, 8, [
        "train.max_steps=3", "train.batch_size=4", "train.micro_batch_size=4", "train.lr=0.01",
        "train.scheduler='constant'", "train.max_grad_norm=0"])
    store = ClientStateStore(tmp_path / "state")
    app = FedITClientApp(slot, {"c0": rows}, train, seed=0, pad_id=tok.pad_token_id, device=torch.device("cpu"),
                         amp=lambda: torch.autocast("cpu", enabled=False), state_store=store)
    x = init_adapter(slot.shapes(), seed=1)
    zero_c = {k: np.zeros_like(v) for k, v in x.items()}
    res = app.fit("c0", FitIns(with_variates(x, zero_c), {"round": 1}))
    y, dc = split_variates(res.arrays)
    # round 1 (c = c_i = 0): c_i+ = (x - y) / (K lr) with K lr = 3 x 0.01, and the reply carries delta c_i = c_i+
    for k in x:
        np.testing.assert_allclose(dc[k], (x[k] - y[k]) / 0.03, rtol=1e-4, atol=1e-5)
    saved = store.load("c0", 2)
    assert all(np.allclose(saved[k], dc[k]) for k in x)
    # round 2 with a server c: every step's gradient gets c - c_i added, so a large c moves y along -c
    big_c = {k: np.full_like(v, 5.0) for k, v in x.items()}
    res2 = app.fit("c0", FitIns(with_variates(x, big_c), {"round": 2}))
    y2, _ = split_variates(res2.arrays)
    res3 = app.fit("c0", FitIns(with_variates(x, zero_c), {"round": 2}))  # a rerun of round 2 reads round 1's c_i
    y3, _ = split_variates(res3.arrays)
    shift = np.mean([np.mean(y2[k] - y3[k]) for k in x])
    assert shift < -0.01  # AdamW steps against the +5 added to every gradient


def test_correction_is_a_parameter_step_outside_adamw(tiny_llama):
    """SCAFFOLD's y <- y - lr (g + c - c_i): the correction moves the parameters by exactly
    -lr (c - c_i) per step, whatever AdamW does with g. Oracle: one step with a correction equals
    one step without it, minus lr x correction (the first step's gradient does not depend on it)."""
    from contextlib import nullcontext

    from fedtune.fedit.lora import init_adapter
    from fedtune.fedit.train import train_local

    slot, tok, rows, train = tiny_lora_trainer(tiny_llama, 4, [
        "train.max_steps=1", "train.batch_size=4", "train.micro_batch_size=4", "train.lr=0.01",
        "train.scheduler='constant'"])
    x = init_adapter(slot.shapes(), seed=1)
    rng = np.random.default_rng(0)
    corr = {k: rng.normal(0, 3.0, v.shape).astype(np.float32) for k, v in x.items()}
    after = {}
    for name, c in (("plain", None), ("corrected", corr)):
        slot.set(x)
        train_local(slot.model, list(slot.params.values()), rows, train, seed=0, pad_id=tok.pad_token_id,
                    device=torch.device("cpu"), amp=nullcontext,
                    correction=None if c is None else [torch.from_numpy(c[k]) for k in slot.params])
        after[name] = slot.get()
    for k in x:
        np.testing.assert_allclose(after["corrected"][k], after["plain"][k] - 0.01 * corr[k], rtol=1e-5, atol=1e-6)
