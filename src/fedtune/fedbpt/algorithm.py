"""FedBPT's algorithm contract (see fedtune.core.algorithm): black-box prompt tuning with CMA-ES.
Only plain arrays cross the wire: the global mean and sigma (and, in reference mode, the
covariance) down; the local mean, its fitness and the sigmas used up."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedtune.core.arrays import Arrays
from fedtune.core.strategy import FitIns, FitRes
from fedtune.errors import ConfigError


class FedBPTSite:
    """FedBPT on one FLARE site: the black box, the projection and this site's encoded rows,
    with the same FedBPTClientApp the embedded simulator runs."""

    def __init__(self, cfg, settings):
        from fedtune.fedbpt.session import FedBPTModel
        from fedtune.fedbpt.table import TableFormat
        from fedtune.fedbpt.tasks import load_examples, task_from_config

        if settings.format:
            raise ConfigError(f"site '{settings.site}': {settings.source}: 'format' is for FedIT instruction data; "
                              f"FedBPT reads the columns named by task.text_columns and task.label_column")
        spec = task_from_config(cfg.task)
        examples = load_examples(spec, str(settings.data_path), TableFormat.from_task(cfg.task))
        model = FedBPTModel(cfg, spec)
        self.key = settings.site
        self.app = model.client_app({self.key: model.shard(examples)})

    def fit(self, client_id: str, ins: FitIns, index: int) -> FitRes:
        self.app.client_index = {self.key: index}  # seeds the perturbed copy as in the embedded simulator
        res = self.app.fit(self.key, ins)
        return FitRes(client_id, res.arrays, res.num_examples, res.metrics)


class FedBPTAlgorithm:
    name = "fedbpt"
    output = "prompt"

    def check_config(self, cfg) -> None:
        from fedtune.fedbpt.tasks import for_model, task_from_config

        try:
            spec = task_from_config(cfg.task)  # template, columns, verbalizer and metric fit together
            for_model(spec, cfg.fedbpt.model_kind)  # 'auto' is checked once the model says what it is
        except ConfigError as e:
            raise ConfigError(f"[task]: {e}") from None

    def session(self, cfg):
        from fedtune.fedbpt.session import FedBPTSession

        return FedBPTSession(cfg)

    def initial_arrays(self, cfg) -> Arrays:
        from fedtune.fedbpt.session import build_strategy

        return build_strategy(cfg, max(1, cfg.partition.num_clients)).initial_arrays()

    def strategy(self, cfg, initial: Arrays, sites: list[str]):
        from fedtune.fedbpt.session import build_strategy

        return build_strategy(cfg, len(sites))  # its initial arrays are fixed by the config

    def site_client(self, cfg, settings) -> FedBPTSite:
        return FedBPTSite(cfg, settings)

    def needs_data_to_collect(self, cfg) -> bool:
        """The best-by-dev prompt needs the dev rows, drawn from the training file as in the run."""
        if cfg.fedbpt.mode != "improved" or not cfg.fedbpt.select_on_dev:
            return False
        if not cfg.task.train_path:
            raise ConfigError("fedbpt.select_on_dev = true: collecting the best-by-dev prompt evaluates every "
                              "round's prompt on the dev rows, drawn from the training file as in the run; pass "
                              "--set task.train_path=FILE (and task.test_path=FILE for test metrics), or "
                              "--set fedbpt.select_on_dev=false to keep the final round's prompt")
        return True

    def write_output(self, cfg, arrays: Arrays, folder: Path, rounds: int) -> Path:
        """The final global prompt, reusable by `fedtune classify`."""
        from fedtune.fedbpt.session import FedBPTModel
        from fedtune.fedbpt.tasks import task_from_config

        model = FedBPTModel(cfg, task_from_config(cfg.task))
        return model.save(np.asarray(arrays["mean"], dtype=np.float32), folder, rounds, None)


ALGORITHM = FedBPTAlgorithm()
