"""fedbpt.select_by: which round's global prompt the session keeps as best-by-dev."""

import numpy as np
import pytest

from fedtune import config as C
from fedtune.errors import ConfigError
from fedtune.fedbpt.session import FedBPTSession

# (dev accuracy, dev loss) for rounds 0 (the zero prompt) .. 5: accuracy and loss disagree
DEV = [(0.80, 0.50), (0.85, 0.48), (0.85, 0.40), (0.80, 0.35), (0.90, 0.45), (0.80, 0.35)]
# by hand: the highest accuracy is round 4 (0.90); the lowest loss is 0.35 at rounds 3 and 5, round 3 first
EXPECTED = {"metric": 4, "loss": 3}


@pytest.mark.parametrize("by", ["metric", "loss"])
def test_session_keeps_the_round_with_the_best_dev_result_by_the_chosen_key(by):
    cfg = C.load(None, ["run.algorithm='fedbpt'", f"fedbpt.select_by='{by}'", "run.save_every_round=false"])
    s = FedBPTSession.__new__(FedBPTSession)  # only the selection: no model, no data
    s.cfg, s.run_dir = cfg, None
    acc0, loss0 = DEV[0]
    s.best = {"round": 0, "dev": {"score": acc0, "accuracy": acc0, "loss": loss0}, "z": np.zeros(3, np.float32)}
    for rnd, (acc, loss) in enumerate(DEV[1:], start=1):
        arrays = {"mean": np.full(3, rnd, np.float32)}
        s.on_round_end(rnd, arrays, {"eval": {"dev_score": acc, "dev_accuracy": acc, "dev_loss": loss}})
    assert s.best["round"] == EXPECTED[by]
    np.testing.assert_array_equal(s.best["z"], np.full(3, EXPECTED[by], np.float32))


def test_select_by_names_its_choices():
    with pytest.raises(ConfigError, match="fedbpt.select_by = 'accuracy' is not one of 'metric', 'loss'"):
        C.load(None, ["run.algorithm='fedbpt'", "fedbpt.select_by='accuracy'"])
