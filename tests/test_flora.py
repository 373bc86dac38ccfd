"""FLoRA's stacking (server.lora_aggregation = 'stack'): the global update grows by exactly the
example-weighted mean of the clients' B A each round (numpy oracle), clients train a fresh
adapter over the frozen stack (forward hooks checked against weights merged by hand), and the
saved adapter is an ordinary PEFT adapter of the stacked rank that computes the same function."""

import json

import numpy as np
import pytest
import torch

from fedtune import config as C
from fedtune.core import arrays as AR
from fedtune.core.lora_math import STACK
from fedtune.core.strategy import FitRes
from fedtune.errors import ConfigError, UpdateRejected
from fedtune.fedit.strategy import FedAvgStrategy

A, B = "m.v_proj.lora_A.weight", "m.v_proj.lora_B.weight"
IDS = ["c0", "c1", "c2"]


def _adapter(rng, r, d_in=20, d_out=12, b_zero=False):
    b = np.zeros((d_out, r)) if b_zero else rng.standard_normal((d_out, r))
    return {A: rng.standard_normal((r, d_in)).astype(np.float32), B: b.astype(np.float32)}


def _round(strat, glob, rnd, rng, sizes):
    ins = strat.configure_fit(rnd, glob, IDS)
    replies = {cid: _adapter(rng, ins[cid].arrays[A].shape[0]) for cid in IDS}
    for cid in IDS:  # a reply is the trained adapter alone, with the shapes the client was sent
        strat.check_reply(ins[cid], FitRes(cid, replies[cid], 1))
    out, metrics = strat.aggregate_fit(rnd, glob, [FitRes(c, replies[c], n) for c, n in zip(IDS, sizes)])
    return ins, replies, out, metrics


def test_the_stack_adds_exactly_the_weighted_mean_of_the_products_and_its_rank_grows():
    rng = np.random.default_rng(0)
    init = _adapter(rng, 4, b_zero=True)
    strat = FedAvgStrategy(init, seed=5, lora_aggregation="stack", lora_rank=4, client_ranks=[2, 4, 4])
    glob = strat.initial_arrays()
    assert glob[STACK + A].shape == (0, 20) and glob[STACK + B].shape == (12, 0)
    want = np.zeros((12, 20))
    for rnd, sizes in ((1, (3, 1, 2)), (2, (1, 1, 5))):
        ins, replies, glob, metrics = _round(strat, glob, rnd, rng, sizes)
        assert {c: ins[c].arrays[A].shape[0] for c in IDS} == {"c0": 2, "c1": 4, "c2": 4}
        for c in IDS:  # every client gets the same fresh adapter (B = 0) and the whole stack so far
            assert not ins[c].arrays[B].any() and ins[c].arrays[STACK + A].shape[0] == 10 * (rnd - 1)
        if rnd == 1:
            np.testing.assert_array_equal(ins["c1"].arrays[A], init[A])  # round 1 starts from the run's init
        else:
            assert not np.allclose(ins["c1"].arrays[A], init[A])  # later rounds draw A anew
        want += sum(n * replies[c][B].astype(np.float64) @ replies[c][A] for c, n in zip(IDS, sizes)) / sum(sizes)
        got = glob[STACK + B].astype(np.float64) @ glob[STACK + A]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert metrics["stack_rank"] == 10 * rnd == glob[STACK + A].shape[0]
    np.testing.assert_array_equal(glob[A], init[A])  # the adapter part stays the init; the stack is the model


def test_a_reply_carrying_the_stack_or_a_wrong_rank_is_rejected():
    rng = np.random.default_rng(1)
    strat = FedAvgStrategy(_adapter(rng, 4, b_zero=True), seed=0, lora_aggregation="stack")
    ins = strat.configure_fit(1, strat.initial_arrays(), IDS)["c0"]
    with pytest.raises(UpdateRejected):
        strat.check_reply(ins, FitRes("c0", dict(ins.arrays), 1))
    with pytest.raises(UpdateRejected):
        strat.check_reply(ins, FitRes("c0", _adapter(rng, 3), 1))
    with pytest.raises(ValueError):
        FedAvgStrategy(_adapter(rng, 4), seed=0, lora_aggregation="stack", aggregation="fedadam")


def test_config_refuses_stacking_with_a_server_optimizer_or_clipping():
    with pytest.raises(ConfigError, match="lora_aggregation = 'stack'.*fedavg"):
        C.load(None, ["server.lora_aggregation='stack'", "server.aggregation='fedadam'"])
    with pytest.raises(ConfigError, match="clip_norm"):
        C.load(None, ["server.lora_aggregation='stack'", "server.clip_norm=1.0"])


def test_hooks_compute_the_merged_weights_and_leave_the_model_as_it_was(tiny_llama):
    from transformers import AutoModelForCausalLM

    from fedtune.fedit.flora import applied
    from fedtune.fedit.lora import AdapterSlot, attach_lora

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = attach_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"])
    peft_model.eval()
    slot = AdapterSlot(peft_model)
    rng = np.random.default_rng(2)
    stack = {}
    with torch.no_grad():
        for k, p in slot.params.items():
            if ".lora_A." in k:
                mod = k.rsplit(".lora_A.", 1)[0]
                out_f = slot.params[k.replace(".lora_A.", ".lora_B.")].shape[0]
                stack[k] = rng.standard_normal((7, p.shape[1])).astype(np.float32)
                stack[k.replace(".lora_A.", ".lora_B.")] = rng.standard_normal((out_f, 7)).astype(np.float32)
                # the oracle: W + (alpha / r) B A written into a plain copy of the model
                name = mod.replace("base_model.model.", "", 1)
                w = merged.get_submodule(name).weight
                w += 2.0 * torch.from_numpy(stack[k.replace(".lora_A.", ".lora_B.")] @ stack[k])
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    before = peft_model(ids).logits
    with applied(peft_model, stack, "default", torch.device("cpu")):
        hooked = peft_model(ids).logits
    np.testing.assert_allclose(hooked.detach().numpy(), merged(ids).logits.detach().numpy(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hooked, before)
    assert torch.equal(peft_model(ids).logits, before)  # hooks removed: the shared base model is untouched


def test_a_flora_run_saves_a_peft_adapter_of_the_stacked_rank_that_computes_the_hooked_function(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune import runner
    from fedtune.fedit.flora import applied
    from fedtune.fedit.lora import AdapterSlot, attach_lora

    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'",
                        "data.demo_rows_per_skill=12", "partition.num_clients=3", "partition.test_per_category=2",
                        "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=2", "eval.generate=false",
                        "eval.compare_base=false", "run.rounds=2", "run.progress=false", "lora.r=4",
                        "lora.client_ranks=[2, 4]", "server.lora_aggregation='stack'"])
    summary = runner.run(cfg, tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["aggregate"]["stack_rank"] for r in recs] == [8, 16]  # ranks 2, 4, 2 stacked each round
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["r"] == 16 and conf["lora_alpha"] == pytest.approx(cfg.lora.alpha * 16 / 4)
    glob = AR.unpack((tmp_path / "checkpoint" / "global.safetensors").read_bytes())
    stack = {k[len(STACK):]: v for k, v in glob.items() if k.startswith(STACK)}

    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 4]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                       str(tmp_path / "adapter")).eval()
    hooked = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), cfg.lora.r,
                         cfg.lora.alpha, 0.0, cfg.lora.target_modules).eval()
    AdapterSlot(hooked).set({k: v for k, v in glob.items() if not k.startswith(STACK)})  # B = 0: only the stack acts
    with torch.no_grad(), applied(hooked, stack, "default", torch.device("cpu")):
        want = hooked(ids).logits.numpy()
    np.testing.assert_allclose(loaded(ids).logits.detach().numpy(), want, rtol=1e-5, atol=1e-5)
    assert summary["final"]["loss"] > 0


def test_the_stack_is_ordered_by_client_id_not_by_arrival():
    rng = np.random.default_rng(3)
    strat = FedAvgStrategy(_adapter(rng, 4, b_zero=True), seed=0, lora_aggregation="stack")
    glob = strat.initial_arrays()
    res = [FitRes(c, _adapter(rng, 4), n) for c, n in zip(IDS, (2, 3, 1))]
    first, _ = strat.aggregate_fit(1, glob, res)
    again, _ = strat.aggregate_fit(1, glob, res[::-1])
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
