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
