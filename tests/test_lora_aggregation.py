"""LoRA aggregation done right: the exact mean of the clients' products B A re-factored to
rank r by truncated SVD (FlexLoRA), and FFA-LoRA (A frozen at its shared init: averaging the
adapters is then exactly averaging the products)."""

import numpy as np
import pytest

from fedtune.core.lora_math import ProductMean, lora_pairs
from fedtune.core.strategy import FitRes
from fedtune.fedit.strategy import FedAvgStrategy

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def _adapter(rng, r=2, d_in=6, d_out=5):
    return {A: rng.standard_normal((r, d_in)).astype(np.float32), B: rng.standard_normal((d_out, r)).astype(np.float32)}


def test_svd_aggregation_is_the_best_rank_r_fit_of_the_mean_product():
    rng = np.random.default_rng(0)
    ads = [_adapter(rng) for _ in range(3)]
    sizes = [1, 2, 3]
    strat = FedAvgStrategy(ads[0], seed=0, lora_aggregation="svd", lora_rank=2)
    out, metrics = strat.aggregate_fit(1, ads[0], [FitRes(f"c{i}", a, n) for i, (a, n) in enumerate(zip(ads, sizes))])
    mean = sum(n * (a[B].astype(np.float64) @ a[A].astype(np.float64)) for a, n in zip(ads, sizes)) / 6
    s = np.linalg.svd(mean, compute_uv=False)
    best = np.linalg.svd(mean)[0][:, :2] @ np.diag(s[:2]) @ np.linalg.svd(mean)[2][:2]  # Eckart-Young oracle
    got = out[B].astype(np.float64) @ out[A].astype(np.float64)
    np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-5)
    assert metrics["discarded_energy"] == pytest.approx(float(np.sum(s[2:] ** 2) / np.sum(s**2)), rel=1e-9)
    # the naive rule is not the mean product: the point of exact aggregation
    naive = sum(n * a[B] for a, n in zip(ads, sizes)).astype(np.float64) / 6 @ (sum(n * a[A] for a, n in zip(ads, sizes)) / 6)
    assert np.linalg.norm(naive - mean) > 10 * np.linalg.norm(got - best) + 1e-3


def test_a_rank_sufficient_svd_reproduces_the_mean_exactly():
    rng = np.random.default_rng(1)
    ads = [_adapter(rng, r=1) for _ in range(2)]  # two rank-1 products: the mean has rank <= 2
    pad = {A: np.zeros((2, 6), np.float32), B: np.zeros((5, 2), np.float32)}
    for a in ads:  # as rank-2 adapters with a zero second component
        a[A], a[B] = np.vstack([a[A], np.zeros((1, 6), np.float32)]), np.hstack([a[B], np.zeros((5, 1), np.float32)])
    pm = ProductMean()
    for a in ads:
        pm.add(a, 1.0)
    out, metrics = pm.result(2)
    mean = (ads[0][B] @ ads[0][A] + ads[1][B] @ ads[1][A]) / 2
    np.testing.assert_allclose(out[B] @ out[A], mean, rtol=1e-5, atol=1e-6)
    assert metrics["discarded_energy"] < 1e-12 and sorted(out) == sorted(pad)


def test_pairs_are_found_and_a_lone_a_is_an_error():
    assert lora_pairs([A, B]) == {"m.q_proj|weight": (A, B)}
    with pytest.raises(ValueError, match="has no matching"):
        lora_pairs([A])


def test_svd_goes_with_fedavg_only():
    from fedtune import config as C
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="server.lora_aggregation = 'svd' .* not 'fedadam'"):
        C.load(None, ["server.lora_aggregation='svd'", "server.aggregation='fedadam'"])


def test_ffa_lora_trains_only_b_and_the_average_is_exact(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from fedtune import config as C
    from fedtune.core.strategy import FitIns
    from fedtune.data.instructions import PromptFormatter, Row, tokenize_rows
    from fedtune.fedit.client import FedITClientApp
    from fedtune.fedit.lora import AdapterSlot, attach_lora, init_adapter
    from fedtune.models import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.requires_grad_(False)
    slot = AdapterSlot(attach_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"]))
    tok = load_tokenizer(tiny_llama)
    fmt = PromptFormatter("plain", tok)
    data = {"c0": tokenize_rows([Row("say hi", "", "hi there", "x")] * 4, fmt, 64, False, "error"),
            "c1": tokenize_rows([Row("upper case", "", "GOOD NEWS", "y")] * 4, fmt, 64, False, "error")}
    train = C.load(None, ["train.max_steps=3", "train.batch_size=2", "train.micro_batch_size=2", "train.lr=0.05"]).train
    app = FedITClientApp(slot, data, train, seed=0, pad_id=tok.pad_token_id, device=torch.device("cpu"),
                         amp=lambda: torch.autocast("cpu", enabled=False), freeze_a=True)
    x = init_adapter(slot.shapes(), seed=2)
    ys = [app.fit(cid, FitIns(x, {"round": 1})).arrays for cid in ("c0", "c1")]
    for k in x:
        if ".lora_A." in k:
            assert all(np.array_equal(y[k], x[k]) for y in ys)  # A never moved
        else:
            assert any(np.any(y[k] != x[k]) for y in ys)  # B trained
    assert all(p.requires_grad for p in slot.params.values())  # A is trainable again for anything else
    mean = FedAvgStrategy(x, seed=0).aggregate_fit(1, x, [FitRes("c0", ys[0], 1), FitRes("c1", ys[1], 1)])[0]
    for k in x:
        if ".lora_B." in k:  # with a shared A, mean(B) A == mean(B A): FedAvg is exact
            a = x[k.replace(".lora_B.", ".lora_A.")].astype(np.float64)
            exact = (ys[0][k].astype(np.float64) @ a + ys[1][k].astype(np.float64) @ a) / 2
            np.testing.assert_allclose(mean[k].astype(np.float64) @ a, exact, rtol=1e-5, atol=1e-6)
