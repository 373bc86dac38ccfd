"""Sample-level DP-SGD in local LoRA training: Opacus's per-example gradients equal each row's
own gradient computed alone; clipping and noise are applied as configured (oracle with a
seeded generator); the noise is not the run seed; each client's rows are accounted as
dp-accounting composes the same steps; the config names bad keys; a run records it."""

import json

import numpy as np
import pytest
import torch

from fedtune import config as C
from fedtune.errors import ConfigError
from fedtune.fedit import dpsgd
from fedtune.fedit.lora import AdapterSlot, attach_lora


def _peft(path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path)
    base.requires_grad_(False)
    return attach_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"])


def _rows(tiny_llama, n=6):
    from fedtune.data.instructions import PromptFormatter, Row, tokenize_rows
    from fedtune.models import load_tokenizer

    tok = load_tokenizer(tiny_llama)
    rows = [Row(f"say {w}", "", f"{w} " * (1 + i % 3), "x") for i, w in enumerate(["hi", "yo", "ok", "no", "go", "up"][:n])]
    return tokenize_rows(rows, PromptFormatter("plain", tok), 64, False, "error"), tok


def test_per_example_gradients_are_each_rows_own_mean_loss_gradient(tiny_llama):
    from fedtune.fedit.train import causal_lm_loss, collate

    model = _peft(tiny_llama)
    slot = AdapterSlot(model)
    rng = np.random.default_rng(0)  # B off zero, so every LoRA factor has a gradient
    slot.set({k: rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in slot.get().items()})
    params = list(slot.params.values())
    rows, tok = _rows(tiny_llama, 4)
    ids, mask, labels = collate(rows, tok.pad_token_id, torch.device("cpu"))
    with dpsgd.PerExampleGrads(model):
        token_loss = causal_lm_loss(model, ids, mask, labels, reduction="none")
        dpsgd.example_mean_sum(token_loss, labels).backward()
        batched = [torch.cat(p.grad_sample) if isinstance(p.grad_sample, list) else p.grad_sample.clone()
                   for p in params]
    assert not any(hasattr(p, "grad_sample") for p in params)  # the hooks are gone after the round
    for i, row in enumerate(rows):  # oracle: the row alone, its mean token loss, plain autograd
        model.zero_grad(set_to_none=True)
        a, b, c = collate([row], tok.pad_token_id, torch.device("cpu"))
        causal_lm_loss(model, a, b, c, reduction="mean").backward()
        for p, gs in zip(params, batched):
            torch.testing.assert_close(gs[i], p.grad, rtol=1e-4, atol=1e-6)


def test_privatize_clips_each_example_sums_adds_noise_and_divides_by_the_batch():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    samples = [torch.randn(5, 3, 2) * s for s in (1.0, 3.0)], [torch.randn(5, 4)]
    per = [torch.cat([samples[0][0][:2], samples[0][1][:3]]), samples[1][0]]  # p0 in two micro-batches
    params[0].grad_sample = [samples[0][0][:2], samples[0][1][:3]]
    params[1].grad_sample = samples[1][0]
    clipped = dpsgd.privatize(params, 5, clip=1.5, sigma=0.7, generator=torch.Generator().manual_seed(9))
    # oracle in numpy: norms over both parameters, factor min(1, C / norm), sum, N(0, (sigma C)^2), / 5
    flat = [g.numpy().reshape(5, -1).astype(np.float64) for g in per]
    norms = np.sqrt(sum((f ** 2).sum(axis=1) for f in flat))
    factor = np.minimum(1.0, 1.5 / norms)
    gen = torch.Generator().manual_seed(9)
    for p, g in zip(params, per):
        total = np.tensordot(factor, g.numpy().astype(np.float64), axes=(0, 0))
        noise = torch.normal(0.0, 0.7 * 1.5, size=total.shape, generator=gen).numpy()
        np.testing.assert_allclose(p.grad.numpy(), (total + noise) / 5, rtol=1e-5, atol=1e-6)
        assert p.grad_sample is None
    assert clipped == int((norms > 1.5).sum())


def test_training_with_dpsgd_moves_the_adapter_with_fresh_noise_each_run(tiny_llama):
    from fedtune.fedit.train import train_local

    rows, tok = _rows(tiny_llama)
    cfg = C.load(None, ["train.max_steps=3", "train.batch_size=4", "train.micro_batch_size=2",
                        "train.dpsgd_noise_multiplier=1.0", "train.dpsgd_clip=0.5"]).train
    outs = []
    for _ in range(2):
        model = _peft(tiny_llama)
        slot = AdapterSlot(model)
        stats = train_local(model, list(slot.params.values()), rows, cfg, seed=0, pad_id=tok.pad_token_id,
                            device=torch.device("cpu"), amp=lambda: torch.autocast("cpu", enabled=False))
        outs.append(slot.get())
        assert stats.steps == 3 and stats.examples_seen == 12 and 0 <= stats.dpsgd_clipped <= 12
    key = next(k for k in outs[0] if "lora_B" in k)
    assert np.any(outs[0][key] != 0) and not np.array_equal(outs[0][key], outs[1][key])  # same seed, other noise
    with pytest.raises(ValueError, match="batch_size = 8 of a client's rows per step; this client holds 6"):
        model = _peft(tiny_llama)
        train_local(model, list(AdapterSlot(model).params.values()), rows,
                    C.load(None, ["train.batch_size=8", "train.dpsgd_noise_multiplier=1.0"]).train, seed=0,
                    pad_id=tok.pad_token_id, device=torch.device("cpu"), amp=lambda: torch.autocast("cpu", enabled=False))


def test_each_clients_rows_are_accounted_over_the_steps_it_took():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    ledger = dpsgd.SampleLedger(sigma=1.1, batch_size=8, delta=1e-5)
    ledger.add({"clients": [{"id": "a", "examples": 100, "steps": 5}, {"id": "b", "examples": 40, "steps": 5}]})
    rec = ledger.add({"clients": [{"id": "b", "examples": 40, "steps": 5}]})
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for _ in range(10):  # b: 10 steps of 8 of its 40 rows
        acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(40, 8, dp_accounting.GaussianDpEvent(1.1 / 2)))
    assert rec["client_max"] == "b" and rec["epsilon_max"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    again = dpsgd.SampleLedger(1.1, 8, 1e-5)
    again.load_state(ledger.state())  # what a checkpoint carries
    assert again.add({"clients": []})["epsilon_max"] == pytest.approx(rec["epsilon_max"])


def test_dpsgd_config_is_checked():
    with pytest.raises(ConfigError, match="train.dpsgd_clip"):
        C.load(None, ["train.dpsgd_noise_multiplier=1.0", "train.dpsgd_clip=0"])
    with pytest.raises(ConfigError, match="sample-level DP for FedIT"):
        C.load(None, ["train.dpsgd_noise_multiplier=1.0", "run.algorithm='fedbpt'"])


def test_a_run_with_dpsgd_records_every_rounds_sample_level_epsilon(tiny_llama, tmp_path):
    from fedtune import runner

    cfg = C.load(None, [f"model.name={json.dumps(str(tiny_llama))}", "model.autocast='off'",
                        "data.demo_rows_per_skill=24", "partition.num_clients=3", "partition.test_per_category=2",
                        "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=2",
                        "train.dpsgd_noise_multiplier=1.0", "eval.generate=false", "eval.compare_base=false",
                        "run.rounds=2", "run.progress=false", "run.save_every_round=false"])
    summary = runner.run(cfg, tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dpsgd"]["epsilon_max"] for r in recs]
    assert 0 < eps[0] < eps[1] and recs[1]["dpsgd"]["steps_max"] == 4
    assert all("dpsgd_clipped" in c for r in recs for c in r["clients"])
    assert summary["privacy_sample_level"]["epsilon_max"] == pytest.approx(eps[1])
