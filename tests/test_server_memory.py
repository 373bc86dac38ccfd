"""The server folds mean-based aggregation one update at a time: its memory does not grow
with the number of clients in a round, and the numbers equal aggregate_fit's exactly."""

import tracemalloc

import numpy as np
import pytest

from fedtune.core.strategy import CollectingAggregator, FitRes
from fedtune.engines.simulator import Simulator, SimulatorSettings
from fedtune.fedit.strategy import FedAvgStrategy

SHAPES = {"a.lora_A.weight": (256, 512), "a.lora_B.weight": (512, 256)}  # 1 MiB of float32


class ShiftClient:
    def fit(self, cid, ins):
        i = int(cid[1:])
        return FitRes(cid, {k: v + np.float32(i % 7) for k, v in ins.arrays.items()}, 1 + i % 3, {"train_loss": 0.0})


def _peak_bytes(aggregation: str, n_clients: int) -> tuple[int, dict]:
    initial = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}
    sim = Simulator(FedAvgStrategy(initial, seed=0, aggregation=aggregation), ShiftClient(),
                    [f"c{i}" for i in range(n_clients)], SimulatorSettings(rounds=1, progress=False))
    tracemalloc.start()
    try:
        state = sim.run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, state.global_arrays


def test_fedavg_round_memory_is_flat_in_the_number_of_clients():
    payload = sum(int(np.prod(s)) * 4 for s in SHAPES.values())
    peak_fold, g = _peak_bytes("fedavg", 60)
    assert peak_fold < 16 * payload, f"{peak_fold / payload:.1f} payloads held at the peak"
    # the robust rules need every update at once: the same round holds all 60 of them
    peak_all, _ = _peak_bytes("median", 60)
    assert peak_all > 50 * payload
    w = np.array([1 + i % 3 for i in range(60)], dtype=np.float64)
    shift = np.array([i % 7 for i in range(60)], dtype=np.float64)
    np.testing.assert_allclose(g["a.lora_A.weight"], np.sum(w * shift) / w.sum(), rtol=1e-6)


@pytest.mark.parametrize("aggregation,clip", [("fedavg", 0.0), ("fedavgm", 0.0), ("fedadam", 3.0)])
def test_folding_gives_exactly_what_aggregate_fit_gives(aggregation, clip):
    rng = np.random.default_rng(0)
    g = {k: rng.standard_normal((4, 5)).astype(np.float32) for k in ("x", "y")}
    res = [FitRes(f"c{i}", {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()}, 1 + i)
           for i in range(5)]
    a = FedAvgStrategy(g, seed=0, aggregation=aggregation, clip_norm=clip)
    b = FedAvgStrategy(g, seed=0, aggregation=aggregation, clip_norm=clip)
    for rnd in (1, 2):  # two rounds: the server optimizer's state carries over identically
        ga, ma = a.aggregate_fit(rnd, g, res)
        fold = b.aggregator(rnd, g)
        for r in res:
            fold.add(r)
        gb, mb = fold.result()
        assert ma == mb and all(np.array_equal(ga[k], gb[k]) for k in g)
    assert isinstance(FedAvgStrategy(g, seed=0, aggregation="trimmed_mean").aggregator(1, g), CollectingAggregator)


def test_padded_widths_are_few_and_cheap():
    """Micro-batches are padded to few widths (each new width costs oneDNN kernels and
    resident memory), at most 12.5% above the longest row."""
    from fedtune.fedit.train import padded_width

    widths = {padded_width(n) for n in range(1, 1025)}
    assert len(widths) <= 8 * 8 + 16  # about 8 per doubling
    for n in range(1, 4097):
        w = padded_width(n)
        assert n <= w <= max(n + 7, n * 1.125)


def test_padding_leaves_the_loss_of_real_tokens_unchanged(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from fedtune.data.instructions import Tokenized
    from fedtune.fedit.train import causal_lm_loss, collate

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    rows = [Tokenized(list(range(5, 5 + n)), [-100] * 3 + list(range(8, 5 + n))) for n in (9, 13)]
    ids, mask, labels = collate(rows, 0, torch.device("cpu"))
    assert ids.shape[1] == 16  # 13 rounded up
    with torch.no_grad():
        padded = causal_lm_loss(model, ids, mask, labels, reduction="none")
        exact = torch.cat([causal_lm_loss(model, torch.tensor([r.input_ids]), torch.ones(1, len(r), dtype=torch.long),
                                          torch.tensor([r.labels]), reduction="none") for r in rows])
    torch.testing.assert_close(padded, exact, atol=1e-5, rtol=1e-5)
