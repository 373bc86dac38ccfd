"""FedBPT's algorithm contract (see fedtune.core.algorithm): black-box prompt tuning with CMA-ES.
Only plain arrays cross the wire: the global mean and sigma (and, in reference mode, the
covariance) down; the local mean, its fitness and the sigmas used up."""

from __future__ import annotations

from pathlib import Path


from fedtune.core.arrays import Arrays
from fedtune.core.strategy import FitIns, FitRes
from fedtune.data import hub
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


def check_fedbpt(cfg) -> None:
    """[fedbpt] and [task], checked only for FedBPT runs; the first problem is a ConfigError."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    fb, t = cfg.fedbpt, cfg.task
    need(fb.intrinsic_dim >= 1, f"fedbpt.intrinsic_dim must be >= 1, got {fb.intrinsic_dim}")
    need(fb.n_prompt_tokens >= 1, f"fedbpt.n_prompt_tokens must be >= 1, got {fb.n_prompt_tokens}")
    need(fb.popsize >= 2, f"fedbpt.popsize must be >= 2, got {fb.popsize}")
    need(fb.local_iter >= 1, f"fedbpt.local_iter must be >= 1, got {fb.local_iter}")
    need(fb.sigma0 >= 0, f"fedbpt.sigma0 must be > 0 (or 0: the mode's default), got {fb.sigma0}")
    need(0.0 < fb.mean_lr <= 1.0, f"fedbpt.mean_lr must be in (0, 1], got {fb.mean_lr}")
    need(fb.mean_lr == 1.0 or fb.mode != "reference",
         f"fedbpt.mean_lr = {fb.mean_lr} applies to the improved mode's server step and the one-generation mode's "
         "global CMA-ES; reference mode keeps FedBPT's step (set fedbpt.mode = 'improved' or 'generation', "
         "or leave fedbpt.mean_lr = 1)")
    need(fb.proj_alpha > 0 and fb.proj_sigma > 0, "fedbpt.proj_alpha and fedbpt.proj_sigma must be > 0")
    need(0.0 < fb.perturb_rate <= 1.0, f"fedbpt.perturb_rate must be in (0, 1], got {fb.perturb_rate}")
    need(not (fb.perturb and fb.loss == "perf"),
         "fedbpt.loss = 'perf' (= -accuracy) cannot be divided by a perturbed loss; set fedbpt.perturb = false")
    need(fb.bound >= 0, f"fedbpt.bound must be >= 0, got {fb.bound}")
    need(fb.max_forward_rows >= 1, f"fedbpt.max_forward_rows must be >= 1, got {fb.max_forward_rows}")
    need(fb.forward_overhead_tokens >= 0, f"fedbpt.forward_overhead_tokens must be >= 0, got {fb.forward_overhead_tokens}")
    need(fb.max_seq_len >= fb.n_prompt_tokens + 4,
         f"fedbpt.max_seq_len = {fb.max_seq_len} leaves no room for text after {fb.n_prompt_tokens} prompt tokens")
    need(not fb.init_prompt or fb.prompt_mode == "cat", "fedbpt.init_prompt is only used with fedbpt.prompt_mode = 'cat'")
    need(0.0 < fb.sigma_decay <= 1.0, f"fedbpt.sigma_decay must be in (0, 1], got {fb.sigma_decay}")
    need(fb.sigma_min >= 0, f"fedbpt.sigma_min must be >= 0, got {fb.sigma_min}")
    need(fb.prompt_norm_max >= 0, f"fedbpt.prompt_norm_max must be >= 0, got {fb.prompt_norm_max}")
    need(fb.minibatch >= 0, f"fedbpt.minibatch must be >= 0 (0 = all of a client's rows), got {fb.minibatch}")
    if fb.mode == "reference":
        need(not fb.separable and not fb.minibatch, "fedbpt.mode = 'reference' reproduces FedBPT's mechanics: "
             "fedbpt.separable and fedbpt.minibatch are for 'improved' and 'generation'")
    need(not fb.deep or fb.mode == "generation", "fedbpt.deep = true (deep prompts) runs in fedbpt.mode = 'generation'")
    need(not fb.deep_accept or fb.deep, "fedbpt.deep_accept = true needs fedbpt.deep = true")
    need(fb.deep_layers >= 0, f"fedbpt.deep_layers must be >= 0 (0 = every layer), got {fb.deep_layers}")
    need(not fb.deep_layers or fb.deep, "fedbpt.deep_layers needs fedbpt.deep = true")
    need(fb.deep_rounds_per_layer >= 1, f"fedbpt.deep_rounds_per_layer must be >= 1, got {fb.deep_rounds_per_layer}")
    if fb.mode == "generation":
        need(fb.bound == 0, "fedbpt.mode = 'generation' samples from the server's distribution without bounds: "
             "set fedbpt.bound = 0")
    need(t.k_shot >= 0, f"task.k_shot must be >= 0, got {t.k_shot}")
    need(t.dev_shots >= 1, f"task.dev_shots must be >= 1 (the dev split selects the global prompt), got {t.dev_shots}")
    need(t.test_max_rows >= 0, f"task.test_max_rows must be >= 0, got {t.test_max_rows}")
    # an unset path is the built-in task's Hugging Face split: never beside a local file of the other kind
    for given, unset in (("train_path", "test_path"), ("test_path", "train_path")):
        value = getattr(t, given)
        hint = (" (the training file itself holds task.test_max_rows rows out of it for testing)"
                if unset == "test_path" else "")
        need(not value or getattr(t, unset) or value.startswith(hub.PREFIX),
             f"task.{unset} is not set while task.{given} = {value!r} is a file; set task.{unset}{hint}; an unset "
             f"path means task '{t.name}''s Hugging Face split")
    need(not t.train_path or t.train_path != t.test_path or t.test_max_rows > 0,
         f"task.test_path is task.train_path ({t.train_path!r}) with task.test_max_rows = 0: every row would be a "
         "test row and none left to train on; set task.test_max_rows to the rows to hold out")


class FedBPTAlgorithm:
    name = "fedbpt"
    output = "prompt"

    def check_config(self, cfg) -> None:
        from fedtune.fedbpt.tasks import for_model, task_from_config

        check_fedbpt(cfg)
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
        if cfg.fedbpt.mode == "reference" or not cfg.fedbpt.select_on_dev:
            return False
        if not cfg.task.train_path:
            raise ConfigError("fedbpt.select_on_dev = true: collecting the best-by-dev prompt evaluates every "
                              "round's prompt on the dev rows, drawn from the training file as in the run; pass "
                              "--set task.train_path=FILE (and task.test_path=FILE for test metrics), or "
                              "--set fedbpt.select_on_dev=false to keep the final round's prompt")
        return True

    def write_output(self, cfg, arrays: Arrays, folder: Path, rounds: int) -> Path:
        """The final global prompt, reusable by `fedtune classify`."""
        from fedtune.fedbpt.session import FedBPTModel, prompt_z
        from fedtune.fedbpt.tasks import task_from_config

        model = FedBPTModel(cfg, task_from_config(cfg.task))
        return model.save(prompt_z(arrays), folder, rounds, None)


ALGORITHM = FedBPTAlgorithm()
