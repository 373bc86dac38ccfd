import numpy as np
import pytest
import torch

from fedtune.errors import UpdateRejected
from fedtune.fedit.lora import AdapterSlot, attach_lora, init_adapter, save_adapter


def _peft(path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path)
    base.requires_grad_(False)
    return attach_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"])


def test_slot_keys_are_pefts_portable_keys(tiny_llama):
    from peft import get_peft_model_state_dict

    model = _peft(tiny_llama)
    slot = AdapterSlot(model)
    assert slot.keys() == sorted(get_peft_model_state_dict(model))
    assert len(slot.keys()) == 2 * 2 * 2  # layers x modules x (A, B)


def test_restore_is_bit_exact_and_get_is_a_copy(tiny_llama):
    model = _peft(tiny_llama)
    slot = AdapterSlot(model)
    rng = np.random.default_rng(0)
    g = {k: rng.standard_normal(s).astype(np.float32) for k, s in slot.shapes().items()}
    slot.set(g)
    got = slot.get()
    for k in g:
        assert np.array_equal(got[k], g[k])  # bit for bit
    got[next(iter(got))][...] = 7.0  # mutating the copy must not touch the model
    assert not np.array_equal(slot.get()[next(iter(got))], got[next(iter(got))])


def test_strict_load_raises_on_missing_unexpected_and_shape(tiny_llama):
    slot = AdapterSlot(_peft(tiny_llama))
    g = slot.get()
    k0 = next(iter(g))
    with pytest.raises(UpdateRejected, match="missing"):
        slot.set({k: v for k, v in g.items() if k != k0})
    with pytest.raises(UpdateRejected, match="unexpected"):
        slot.set({**g, "foo.lora_A.weight": g[k0]})
    with pytest.raises(UpdateRejected, match="shape"):
        slot.set({**g, k0: np.zeros((1, 1), np.float32)})


def test_initial_adapter_is_the_base_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = _peft(tiny_llama)
    slot = AdapterSlot(model)
    init = init_adapter(slot.shapes(), seed=5)
    assert all(np.all(v == 0) for k, v in init.items() if "lora_B" in k)
    assert any(np.any(v != 0) for k, v in init.items() if "lora_A" in k)
    assert all(np.array_equal(init[k], init_adapter(slot.shapes(), seed=5)[k]) for k in init)
    slot.set(init)
    ids = torch.tensor([[1, 5, 9, 12]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_saved_adapter_opens_with_peft_from_pretrained(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _peft(tiny_llama)
    slot = AdapterSlot(model)
    rng = np.random.default_rng(1)
    g = {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in slot.shapes().items()}
    save_adapter(g, model.peft_config["default"], tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    got = AdapterSlot(loaded).get()
    for k in g:
        assert np.array_equal(got[k], g[k])


def test_length_grouped_micro_batches_give_the_same_update(tiny_llama):
    """group_by_length only regroups an optimizer batch into micro-batches (the loss is
    normalized over the whole batch): same adapter after two steps, fewer padded tokens."""
    from contextlib import nullcontext

    from fedtune import config as C
    from fedtune.data.instructions import Tokenized
    from fedtune.fedit.train import micro_batches, padded_width, train_local

    rng = np.random.default_rng(0)
    lengths = [9, 200, 12, 15, 180, 10, 8, 150]  # short and long rows mixed: one micro-batch pads all to 200+
    data = []
    for n in lengths:
        ids = rng.integers(5, 200, n).tolist()
        data.append(Tokenized(ids, [-100] * (n // 2) + ids[n // 2:]))
    after = {}
    for grouped in (False, True):
        cfg = C.load(None, ["train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=2",
                            f"train.group_by_length={str(grouped).lower()}", "train.micro_batch_overhead_tokens=64"])
        groups = micro_batches(data, cfg.train)
        assert sorted(len(t) for g in groups for t in g) == sorted(lengths)  # every row once
        padded = sum(len(g) * padded_width(max(len(t) for t in g)) for g in groups)
        if grouped:
            assert 1 < len(groups) <= 8 and padded < 0.5 * len(data) * padded_width(max(lengths))
        else:
            assert len(groups) == 1
        similar = [t for t in data if len(t) < 20]
        assert micro_batches(similar, cfg.train) == [similar]  # nothing worth splitting: the batch as it is
        torch.manual_seed(0)  # the same initial adapter for both
        model = _peft(tiny_llama)
        slot = AdapterSlot(model)
        train_local(model, list(slot.params.values()), data, cfg.train, seed=3, pad_id=0, device=torch.device("cpu"),
                    amp=nullcontext)
        after[grouped] = slot.get()
    torch.manual_seed(0)
    start = AdapterSlot(_peft(tiny_llama)).get()
    assert any(not np.allclose(after[False][k], start[k]) for k in start)  # training moved the adapter
    for k in after[False]:
        np.testing.assert_allclose(after[True][k], after[False][k], atol=1e-6)


def test_a_shape_mismatch_leaves_the_model_untouched(tiny_llama):
    slot = AdapterSlot(_peft(tiny_llama))
    before = slot.get()
    bad = {k: v + 1.0 for k, v in before.items()}
    last = sorted(bad)[-1]  # the mismatch is in the last key: every other key would be written first
    bad[last] = np.zeros((1, 1), np.float32)
    with pytest.raises(UpdateRejected, match="shape"):
        slot.set(bad)
    assert all(np.array_equal(slot.get()[k], before[k]) for k in before)


def test_lora_on_embeddings_starts_trainable_as_peft_inits_it(tiny_llama):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.requires_grad_(False)
    slot = AdapterSlot(attach_lora(base, 4, 8, 0.0, ["embed_tokens", "q_proj"]))
    init = init_adapter(slot.shapes(), seed=1)
    emb_a = [k for k in init if "lora_embedding_A" in k]
    emb_b = [k for k in init if "lora_embedding_B" in k]
    assert emb_a and emb_b
    assert all(np.all(init[k] == 0) for k in emb_a)  # A = 0 and B ~ N(0, 1), as PEFT does for embeddings:
    assert all(0.5 < float(np.std(init[k])) < 1.5 for k in emb_b)  # the product starts at zero, and both get gradients


def test_saved_adapter_config_is_portable_and_the_same_every_time(tiny_llama, tmp_path):
    import json

    model = _peft(tiny_llama)
    slot = AdapterSlot(model)
    cfg = model.peft_config["default"]
    cfg.target_modules = {"v_proj", "q_proj"}  # PEFT keeps a set: its order changes from run to run
    save_adapter(slot.get(), cfg, tmp_path / "a", "HuggingFaceTB/SmolLM2-135M-Instruct")
    save_adapter(slot.get(), cfg, tmp_path / "b", "HuggingFaceTB/SmolLM2-135M-Instruct")
    doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert doc["target_modules"] == ["q_proj", "v_proj"]
    assert doc["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # saving over an existing adapter swaps the folder whole: nothing stale, no temporary left
    save_adapter(slot.get(), cfg, tmp_path / "a", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_fp16_autocast_trains_with_a_gradient_scaler(tiny_llama, monkeypatch):
    from fedtune import config as C
    from fedtune.data.instructions import PromptFormatter, Row, tokenize_rows
    from fedtune.fedit.train import train_local
    from fedtune.models import autocast, load_tokenizer

    made = []

    class CountingScaler(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    model = _peft(tiny_llama)
    slot = AdapterSlot(model)
    tok = load_tokenizer(tiny_llama)
    rows = tokenize_rows([Row("say hi", "", "hi there", "x")] * 4, PromptFormatter("plain", tok), 64, False, "error")
    train_cfg = C.load(None, ["train.max_steps=2", "train.batch_size=2", "train.micro_batch_size=2"]).train
    dev = torch.device("cpu")
    train_local(model, list(slot.params.values()), rows, train_cfg, seed=0, pad_id=tok.pad_token_id, device=dev,
                amp=lambda: autocast(dev, torch.float16))
    assert len(made) == 1  # fp16: a scaler
    train_local(model, list(slot.params.values()), rows, train_cfg, seed=0, pad_id=tok.pad_token_id, device=dev,
                amp=lambda: autocast(dev, torch.bfloat16))
    assert len(made) == 1  # bf16 needs none
    assert all(np.all(np.isfinite(v)) for v in slot.get().values())


def test_fedprox_term_has_the_papers_gradient_and_pulls_training_toward_the_global(tiny_llama):
    from fedtune import config as C
    from fedtune.data.instructions import PromptFormatter, Row, tokenize_rows
    from fedtune.fedit.train import proximal_term, train_local
    from fedtune.models import load_tokenizer

    # the term's gradient is mu * (w - w0), against a numpy oracle
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    w0 = torch.tensor([[0.0, 1.0], [0.5, -1.0]])
    proximal_term([w], [w0], 0.3).backward()
    np.testing.assert_allclose(w.grad.numpy(), 0.3 * (w.detach().numpy() - w0.numpy()), rtol=1e-6)
    assert float(proximal_term([w], [w0], 0.3).detach()) == pytest.approx(0.15 * float(np.sum((w.detach().numpy() - w0.numpy()) ** 2)))

    tok = load_tokenizer(tiny_llama)
    rows = tokenize_rows([Row("say hi", "", "hi there good", "x")] * 8, PromptFormatter("plain", tok), 64, False, "error")
    dev = torch.device("cpu")

    def drift(mu):
        model = _peft(tiny_llama)
        slot = AdapterSlot(model)
        start = init_adapter(slot.shapes(), seed=3)
        slot.set(start)
        train_cfg = C.load(None, ["train.max_steps=6", "train.batch_size=4", "train.micro_batch_size=4",
                                  "train.lr=0.05", f"train.prox_mu={mu}", "train.max_grad_norm=0"]).train
        train_local(model, list(slot.params.values()), rows, train_cfg, seed=0, pad_id=tok.pad_token_id, device=dev,
                    amp=lambda: torch.autocast("cpu", enabled=False))
        got = slot.get()
        return float(np.sqrt(sum(np.sum((got[k] - start[k]) ** 2) for k in got)))

    free, pulled = drift(0.0), drift(50.0)
    assert pulled < 0.8 * free, (free, pulled)
