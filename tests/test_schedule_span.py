"""train.schedule_span: the learning-rate schedule restarts every local round, or spans the run.

Oracles are the schedule's values written out by hand for a 3-round run of 4 local steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_lora_trainer

from fedtune.core.strategy import FitIns


def _setup(tiny_llama, overrides):
    return tiny_lora_trainer(tiny_llama, 4, ["train.max_steps=4", "train.batch_size=4", "train.micro_batch_size=4",
                                             "train.lr=0.01", *overrides])


def _lr_sum(tiny_llama, overrides, run_position):
    from fedtune.fedit.train import train_local

    slot, tok, rows, train = _setup(tiny_llama, overrides)
    stats = train_local(slot.model, list(slot.params.values()), rows, train, seed=0, pad_id=tok.pad_token_id,
                        device=torch.device("cpu"), amp=lambda: torch.autocast("cpu", enabled=False),
                        run_position=run_position)
    return stats.lr_sum


@pytest.mark.parametrize("rnd, expected", [
    # linear over 12 steps: lr(g) = 0.01 (1 - g / 12); round r runs g = 4 (r - 1) .. 4 (r - 1) + 3
    (1, 0.01 * (12 + 11 + 10 + 9) / 12),
    (2, 0.01 * (8 + 7 + 6 + 5) / 12),
    (3, 0.01 * (4 + 3 + 2 + 1) / 12),
])
def test_linear_schedule_spans_the_run(tiny_llama, rnd, expected):
    got = _lr_sum(tiny_llama, ["train.schedule_span='run'"], (rnd, 3))
    assert got == pytest.approx(expected, rel=1e-9)


def test_round_span_restarts_every_round(tiny_llama):
    # linear over each round's 4 steps: 0.01 x (4 + 3 + 2 + 1) / 4, whatever the round
    for rnd in (1, 3):
        assert _lr_sum(tiny_llama, [], (rnd, 3)) == pytest.approx(0.01 * 10 / 4, rel=1e-9)


def test_warmup_counts_from_the_start_of_the_run(tiny_llama):
    # 6 warm-up steps of 12, then linear to 0: round 1 is all warm-up (0.01 x g/6 for g = 1..4),
    # round 2 ends the warm-up (5/6, 6/6) and decays: g = 6, 7 -> 1 - (g - 6) / 6
    over = ["train.schedule_span='run'", "train.warmup_steps=6"]
    assert _lr_sum(tiny_llama, over, (1, 3)) == pytest.approx(0.01 * (1 + 2 + 3 + 4) / 6, rel=1e-9)
    assert _lr_sum(tiny_llama, over, (2, 3)) == pytest.approx(0.01 * (5 / 6 + 1 + 1 + 5 / 6), rel=1e-9)


def test_run_span_without_a_round_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="schedule_span = 'run'"):
        _lr_sum(tiny_llama, ["train.schedule_span='run'"], (0, 0))


def test_client_app_places_its_round_in_the_run(tiny_llama):
    """The client app knows run.rounds: round 3 of 3 moves the adapter less than round 1
    (a quarter of the learning rate summed), and an app built without the run length refuses."""
    from fedtune.fedit.client import FedITClientApp
    from fedtune.fedit.lora import init_adapter

    slot, tok, rows, train = _setup(tiny_llama, ["train.schedule_span='run'"])
    kw = dict(seed=0, pad_id=tok.pad_token_id, device=torch.device("cpu"),
              amp=lambda: torch.autocast("cpu", enabled=False))
    x = init_adapter(slot.shapes(), seed=1)
    app = FedITClientApp(slot, {"c0": rows}, train, rounds=3, **kw)
    move = {}
    for rnd in (1, 3):
        y = app.fit("c0", FitIns(x, {"round": rnd})).arrays
        move[rnd] = np.sqrt(sum(float(np.sum((y[k] - x[k]) ** 2)) for k in x))
    assert move[3] < 0.5 * move[1]
    with pytest.raises(ValueError, match="got round 1 of 0"):
        FedITClientApp(slot, {"c0": rows}, train, **kw).fit("c0", FitIns(x, {"round": 1}))
