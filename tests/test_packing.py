"""train.packing: rows packed end to end with a block-diagonal mask train the same adapter as
unpacked rows (the oracle: the unpacked run), and a model whose mask ignores packed position ids
is caught by the probe, never trained on rows that see each other."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from fedtune.fedit import packing
from fedtune.fedit.lora import AdapterSlot, attach_lora


def _peft(path, dropout=0.0):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path)
    base.requires_grad_(False)
    return attach_lora(base, 4, 8, dropout, ["q_proj", "v_proj"])


def _rows(lengths=(9, 40, 12, 15, 33, 10, 8, 27), prompt_masked=True):
    from fedtune.data.instructions import Tokenized

    rng = np.random.default_rng(0)
    out = []
    for n in lengths:
        ids = rng.integers(5, 200, n).tolist()
        out.append(Tokenized(ids, ([-100] * (n // 2) + ids[n // 2:]) if prompt_masked else list(ids)))
    return out


def test_first_fit_decreasing_places_every_row_once_within_capacity():
    lengths = [9, 40, 12, 15, 33, 10, 8, 27]
    bins = packing.first_fit_decreasing(lengths, 40)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 40 for b in bins)
    # the optimum, by hand: 40 and 33 fill a bin each (nothing fits the 33's 7 free), the other 81 tokens need 3
    assert len(bins) == 5


def test_collate_packed_resets_positions_and_masks_each_rows_first_label():
    rows = _rows((5, 3, 4), prompt_masked=False)
    p = packing.collate_packed(rows, 0, torch.device("cpu"), lambda n: n)
    assert p.tokens == 12 and p.ids.shape == (3, 5)  # capacity = the longest row (5): 5 | 4 | 3
    ids, pos, labels = p.ids.tolist(), p.position_ids.tolist(), p.labels.tolist()
    flat = {tuple(r.input_ids) for r in rows}
    seen = set()
    for r_ids, r_pos, r_lab in zip(ids, pos, labels):
        starts = [j for j, x in enumerate(r_pos) if x == 0]
        for a, b in zip(starts, starts[1:] + [len(r_pos)]):
            seg = tuple(r_ids[a:b])
            if seg in flat:  # a real row: its positions count from 0, its first label is masked, the rest kept
                seen.add(seg)
                assert r_pos[a:b] == list(range(b - a))
                assert r_lab[a] == -100 and r_lab[a + 1:b] == list(seg[1:])
            else:  # padding: no labels
                assert set(r_lab[a:b]) == {-100}
    assert seen == flat


@pytest.mark.parametrize("micro,prompt_masked", [(8, True), (4, True), (8, False)])
def test_packed_training_matches_unpacked(tiny_llama, micro, prompt_masked):
    from fedtune import config as C
    from fedtune.fedit.train import train_local

    data = _rows(prompt_masked=prompt_masked)  # unmasked: every row's first token carries a label
    after, stats = {}, {}
    for setting in ("off", "on"):
        cfg = C.load(None, ["train.batch_size=8", f"train.micro_batch_size={micro}", "train.max_steps=3",
                            "train.lr=1e-2", f"train.packing='{setting}'"])
        torch.manual_seed(0)
        model = _peft(tiny_llama)
        slot = AdapterSlot(model)
        start = slot.get()
        stats[setting] = train_local(model, list(slot.params.values()), data, cfg.train, seed=3, pad_id=0,
                                     device=torch.device("cpu"), amp=nullcontext)
        after[setting] = slot.get()
    assert any(not np.allclose(after["off"][k], start[k]) for k in start)
    for k in after["off"]:
        np.testing.assert_allclose(after["on"][k], after["off"][k], rtol=1e-4, atol=1e-5)
    assert stats["on"].loss == pytest.approx(stats["off"].loss, rel=1e-5)
    assert stats["on"].tokens == stats["off"].tokens == 3 * sum(len(t) for t in data)


class _LeakyMask:
    """A decoder that drops position_ids and the mask: packed rows would see each other."""

    def __init__(self, decoder):
        self.decoder = decoder

    def __call__(self, input_ids, attention_mask=None, position_ids=None, **kw):
        return self.decoder(input_ids=input_ids, **kw)


def test_probe_catches_a_model_that_ignores_packed_positions(tiny_llama, monkeypatch):
    from fedtune import config as C
    from fedtune.fedit.train import train_local

    model = _peft(tiny_llama)
    lm = model.get_base_model()
    assert packing.probe(model, torch.device("cpu")) is None  # a Llama keeps packed rows apart
    leaky = _LeakyMask(lm.get_decoder())
    monkeypatch.setattr(type(lm), "get_decoder", lambda self: leaky)
    assert "does not keep packed rows apart" in packing.probe(model, torch.device("cpu"))
    slot = AdapterSlot(model)
    cfg = C.load(None, ["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=1", "train.packing='on'"])
    with pytest.raises(ValueError, match="train.packing = 'on'.*does not keep packed rows apart"):
        train_local(model, list(slot.params.values()), _rows()[:4], cfg.train, seed=0, pad_id=0,
                    device=torch.device("cpu"), amp=nullcontext)
    model.get_base_model().__dict__.pop(packing._PROBE, None)
    cfg = C.load(None, ["train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=1"])  # default: unpacked
    assert train_local(model, list(slot.params.values()), _rows()[:4], cfg.train, seed=0, pad_id=0,
                       device=torch.device("cpu"), amp=nullcontext).steps == 1


def test_packing_on_with_dpsgd_is_refused_by_config():
    from fedtune import config as C
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="train.packing = 'on'"):
        C.load(None, ["train.packing='on'", "train.dpsgd_noise_multiplier=1.0"])
