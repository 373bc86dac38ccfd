"""The config's sections: typed dataclasses, each field with its default and its one-line
documentation (`fedtune config` prints them as comments). Loading, validation and writing
are in fedtune.config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


def opt(default: Any, doc: str) -> Any:
    """A config field with a default and its one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


# ----------------------------------------------------------------------------- sections


@dataclass
class RunSection:
    algorithm: str = opt("fedit", "fedit = federated LoRA instruction tuning; fedbpt = black-box prompt tuning with CMA-ES")
    name: str = opt("demo", "run name; the run folder is <out_dir>/<name>")
    out_dir: str = opt("runs", "parent folder of run folders")
    seed: int = opt(42, "seeds partitioning, client selection, data order, LoRA init and CMA-ES")
    rounds: int = opt(8, "number of communication rounds")
    engine: Literal["simulator", "nvflare"] = opt("simulator", "simulator = embedded in-process engine; nvflare = NVIDIA FLARE simulator")
    eval_every: int = opt(1, "evaluate the global model every N rounds (the last round is always evaluated)")
    save_every_round: bool = opt(True, "save the global adapter/prompt after every round (rounds/round_NNN)")
    progress: bool = opt(True, "show progress bars")


@dataclass
class ModelSection:
    name: str = opt("smollm2-135m", "'smollm2-135m' (embedded, offline), a Hugging Face id, a local folder, or a .gguf file")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto picks cuda when available, else cpu")
    quantization: Literal["none", "nf4", "int8"] = opt("none", "QLoRA: load the frozen base weights quantized by bitsandbytes (pip install 'fedtune[qlora]'): nf4 = 4-bit NormalFloat with double quantization, computing in bf16 where bf16 is native (else float32); int8 = LLM.int8(); the LoRA adapter stays in float32 on top. Causal LMs; CUDA, or CPU with bitsandbytes' CPU backend")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = opt("auto", "dtype of the frozen base weights; auto = bfloat16 where bf16 matmuls are native (CUDA with bf16, CPUs with AMX or AVX512-BF16) and model.autocast computes in bf16, float32 elsewhere; LoRA weights stay float32")
    autocast: Literal["auto", "bf16", "fp16", "off"] = opt("auto", "mixed precision for compute; auto = bf16 on CPUs with AMX/AVX512-BF16 and on CUDA with bf16 support")
    trust_remote_code: bool = opt(False, "passed to transformers when loading a Hugging Face model")


@dataclass
class DataSection:
    path: str = opt("demo:skills", "instruction data: a .json/.jsonl file, a Hugging Face dataset (hub:DATASET[@CONFIG][:SPLIT], split train by default), or demo:skills (generated offline)")
    format: Literal["auto", "dolly", "alpaca", "messages", "columns"] = opt("auto", "record schema; auto detects Dolly (instruction/context/response), Alpaca (instruction/input/output) or a conversation (messages: OpenAI/TRL role/content turns, or ShareGPT's conversations: from/value), whose last turn (the assistant's) is the response, the user turn before it the instruction and earlier turns the input")
    columns: dict = opt({}, "with format='columns': map of instruction/input/output/category to your field names")
    test_path: str = opt("", "optional separate held-out test file (same schema); its rows are removed from training")
    template: Literal["alpaca", "chat", "plain"] = opt("alpaca", "prompt template: Shepherd's Alpaca template, the model's chat template, or plain 'instruction\\ninput\\n'")
    cutoff_len: int = opt(256, "maximum tokens per example (prompt + response); longer examples are truncated")
    too_long: Literal["error", "drop"] = opt("error", "a row whose prompt alone exceeds cutoff_len: error (names the row) or drop it")
    train_on_inputs: bool = opt(False, "also train on the prompt tokens (Shepherd's default is true)")
    max_rows: int = opt(0, "use at most this many rows of the data file (0 = all), taken with a seeded shuffle")
    demo_rows_per_skill: int = opt(240, "demo:skills only: rows generated per skill")


@dataclass
class PartitionSection:
    num_clients: int = opt(6, "number of clients")
    method: Literal["iid", "shards", "dirichlet"] = opt("shards", "iid; shards = sorted by category, 2 shards per client (Shepherd diff_quantity 0); dirichlet over categories (diff_quantity 1)")
    shards_per_client: int = opt(2, "shards: contiguous category-sorted shards per client")
    alpha: float = opt(0.5, "dirichlet: concentration (smaller = more skewed)")
    min_client_size: int = opt(40, "dirichlet: redraw until every client holds at least this many rows")
    test_per_category: int = opt(10, "held-out global test rows per category (stratified; excluded from training)")


@dataclass
class ServerSection:
    fraction: float = opt(1.0, "fraction of clients selected each round")
    clients_per_round: int = opt(0, "if > 0, select exactly this many clients per round (overrides fraction)")
    min_clients: int = opt(1, "a round needs at least this many successful client updates")
    max_update_norm: float = opt(0.0, "reject a client update farther than this (L2) from the global arrays (0 = no bound)")
    aggregation: Literal["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedexp", "scaffold", "median", "trimmed_mean", "krum", "multi_krum", "bulyan"] = opt("fedavg", "fedavg = example-weighted mean; fedavgm = server momentum; scaffold = SCAFFOLD control variates (client state kept on disk, one file per client); fedadagrad / fedadam / fedyogi = adaptive server optimizers on the averaged update (Reddi et al. 2021); fedexp = FedAvg with a server step chosen each round from the clients' update norms, max(1, mean ||update||^2 / (2 (||mean update||^2 + server.fedexp_epsilon))) (Jhunjhunwala et al. 2023; not with DP, secagg or heterogeneous ranks); median = coordinate-wise median; trimmed_mean = coordinate-wise mean without the trim_fraction largest and smallest values; krum / multi_krum / bulyan = distance-based selection tolerating server.byzantine bad clients (the robust rules ignore example counts)")
    byzantine: int = opt(1, "krum / multi_krum / bulyan: how many Byzantine clients per round to tolerate (f); krum needs at least 2f + 3 updates per round, bulyan 4f + 3")
    krum_select: int = opt(0, "multi_krum: how many lowest-score updates to average (0 = updates - byzantine)")
    trim_fraction: float = opt(0.1, "trimmed_mean: fraction of clients dropped at each end, per coordinate, in [0, 0.5)")
    lora_aggregation: Literal["separate", "svd", "stack"] = opt("separate", "FedIT: separate = average A and B each (FedIT's way; the product of the means is not the mean of the products B A); svd = the exact example-weighted mean of each client's B A, re-factored to rank lora.r by truncated SVD (FlexLoRA), with the discarded energy reported; stack = FLoRA: the clients' adapters stacked with their example weights, so the global update grows by exactly the mean of the B A each round (its rank grows by the clients' ranks; clients train a fresh adapter on top; the saved adapter has that rank)")
    clip_norm: float = opt(0.0, "before any aggregation, scale each client update down to this L2 distance from the global arrays (0 = off)")
    client_timeout: float = opt(0.0, "seconds a client call may take before it is dropped from the round (0 = no limit in the embedded simulator; nvflare.task_timeout on FLARE)")
    max_examples: int = opt(1_000_000, "cap on the example count a client reports, which weighs its update (0 = no cap); the embedded simulator also rejects a count that differs from the partition it made, so a client cannot choose its own weight")
    round_retries: int = opt(2, "a round with fewer than min_clients updates asks its missing clients again, at most this many times, then stops with an error")
    server_lr: float = opt(1.0, "fedavgm / fedadagrad / fedadam / fedyogi: server learning rate")
    momentum: float = opt(0.9, "fedavgm: server momentum; fedadagrad / fedadam / fedyogi: beta1")
    beta2: float = opt(0.99, "fedadam / fedyogi: beta2")
    tau: float = opt(1e-3, "fedadagrad / fedadam / fedyogi: adaptivity (epsilon); the second moment starts at tau^2")
    fedexp_epsilon: float = opt(1e-3, "fedexp: epsilon added to the squared norm of the mean update in the server step's denominator (larger = steps closer to FedAvg's)")


@dataclass
class PrivacySection:
    mode: Literal["off", "central", "distributed"] = opt("off", "off; central = client-level DP-FedAvg with a trusted server: each selected client's update clipped to privacy.clip, Gaussian noise of std noise_multiplier x clip added to the sum, divided by the clients per round (fixed-size sampling without replacement of server.clients_per_round, or server.fraction, of the clients); example counts ignored. distributed = each client clips its own update and adds its share of the noise, std noise_multiplier x clip / sqrt(noise_shares), under secure aggregation (needs secagg.enabled), so no party sees an update without noise; FedIT only. FedBPT: central, on the prompt mean each client returns")
    clip: float = opt(1.0, "L2 norm each client's update (adapter minus the global adapter; FedBPT: its prompt mean minus the global one) is clipped to; the initial clip with adaptive_clip")
    adaptive_clip: bool = opt(False, "adapt the clip each round toward the target_quantile of the update norms (Andrew et al. 2021): the count of updates within the clip is released with noise of std count_noise, and the update's noise multiplier is raised so that the round stays a Gaussian mechanism of noise_multiplier")
    target_quantile: float = opt(0.5, "adaptive_clip: the fraction of client updates meant to lie within the clip")
    clip_lr: float = opt(0.2, "adaptive_clip: learning rate of the geometric clip update, clip *= exp(-clip_lr x (fraction within - target_quantile))")
    count_noise: float = opt(0.0, "adaptive_clip: std of the noise on the count of updates within the clip (0 = max(clients per round / 20, noise_multiplier))")
    noise_shares: int = opt(0, "distributed: the noise is split into this many client shares (0 = the clients per round); a round summed from fewer shares is accounted with the lower noise it had; set it below the clients per round to tolerate dropouts at full noise")
    noise_multiplier: float = opt(0.0, "noise std / clip; 0 = calibrate it from privacy.target_epsilon for run.rounds rounds")
    target_epsilon: float = opt(0.0, "the (epsilon, delta) budget: the run refuses to start, or stops before the round, that would exceed it (0 = no budget: epsilon is only reported; then set noise_multiplier)")
    delta: float = opt(1e-5, "delta of (epsilon, delta)-DP; keep it below 1 / number of clients")


@dataclass
class SecAggSection:
    enabled: bool = opt(False, "secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the weighted sum of the surviving clients' updates; four message exchanges per round; goes with the mean rules (fedavg, fedavgm, fedadagrad, fedadam, fedyogi) and without server-side clipping, update-norm checks or central DP")
    neighbours: int = opt(0, "each client masks with this many neighbours in a random ring per round (0 = every other client: SecAgg; fewer: SecAgg+, less work per client)")
    threshold: int = opt(0, "Shamir threshold t: any t of a client's neighbours can recover its secrets, so up to (neighbours - t) of them may drop; 0 = neighbours // 2 + 1")


@dataclass
class FaultsSection:
    probability: float = opt(0.0, "simulator only, for testing: probability that a client call fails (0 = off)")
    seed: int = opt(0, "seeds which calls fail; each draw depends only on (seed, round, attempt, client)")
    kinds: list = opt(["raise", "timeout", "disappear"], "how a failing call fails: raise = the client raises; timeout = it hangs past server.client_timeout; disappear = its reply never arrives")


@dataclass
class LoraSection:
    r: int = opt(8, "LoRA rank")
    alpha: int = opt(16, "LoRA alpha (scale = alpha / r)")
    dropout: float = opt(0.05, "LoRA dropout")
    target_modules: list = opt(["q_proj", "v_proj"], "module names that get LoRA adapters")
    client_ranks: list = opt([], "heterogeneous ranks: client i (in sorted id order) trains at rank client_ranks[i % len], each <= lora.r, e.g. [4, 8, 16]; the global adapter has rank lora.r and a client receives its first r_i components; server.lora_aggregation = 'separate' zero-pads the lower ranks (HetLoRA), 'svd' re-factors the mean of the products B A (FlexLoRA: a client then receives the best rank-r_i approximation of the global B A); [] = every client at lora.r")
    personal_b: bool = opt(False, "FedSA-LoRA: only A is shared and averaged; each client keeps its own B between rounds (in the run folder's client_state/, or on the FLARE site) and its personalized model (global A, own B) is evaluated on the held-out rows of its own categories at the end; the global B stays at its initial zeros")
    freeze_a: bool = opt(False, "FFA-LoRA: every client keeps A at the shared random init and trains only B, so averaging the adapters is exactly averaging their products B A")


@dataclass
class TrainSection:
    epochs: float = opt(1.0, "local epochs per round (ignored when max_steps > 0)")
    max_steps: int = opt(0, "if > 0, local optimizer steps per round (overrides epochs)")
    batch_size: int = opt(8, "examples per optimizer step")
    micro_batch_size: int = opt(8, "examples per forward/backward; batch_size / micro_batch_size = gradient accumulation (a value >= batch_size: one forward/backward per batch)")
    group_by_length: bool = opt(True, "split each optimizer batch into micro-batches of similar length (each at most micro_batch_size rows) when the padding saved outweighs the fixed cost of another forward/backward; the same gradient up to float rounding (and LoRA dropout draws)")
    micro_batch_overhead_tokens: int = opt(256, "with group_by_length: the fixed cost of one micro-batch's forward/backward, in tokens")
    packing: Literal["auto", "off", "on", "flat"] = opt("auto", "flat = each micro-batch as one sequence, its rows end to end with no padding, attention computed row by row (fedtune/fedit/flat_attention.py): the same gradient up to float rounding, and on CPU 1.19-1.20x the tokens/s of length-grouped padded micro-batches on Dolly, side by side (AVX2 and AVX512-BF16; docs/benchmarks.md); a 10-token probe refuses a model whose decoder does not pass the row boundaries or positions on; not with DP-SGD or train.compile. on = the rows packed into as few rows as fit the micro-batch's width under a block-diagonal mask built from per-row position ids (slower than grouping on CPU: attention over the whole packed width). off = length-grouped micro-batches, each padded to its longest row. auto (default) = flat on CPU, off on GPU (flat not measured there), off with DP-SGD, train.compile or an explicit train.attention, and off (logged once) for a model that fails the flat probe; flat with an explicit train.attention is refused (its own kernel replaces it)")
    attention: Literal["auto", "eager", "sdpa"] = opt("auto", "attention kernel during local training only (evaluation keeps the model's own): auto = eager on CPU (its backward beat SDPA's 1.19x per step at 160-token rows) while a micro-batch's attention scores, kept for the backward pass, fit 4 GiB over all layers (SmolLM2-135M, 8 rows: up to 575 tokens wide), the model's own otherwise and on GPU")
    compile: Literal["off", "layers"] = opt("off", "torch.compile for local training: \"layers\" compiles one decoder layer and reuses the graph for every layer (dynamic shapes; about 30 s once per process on a 2-core CPU, needs a C++ compiler on CPU; not with DP-SGD); evaluation and generation stay eager")
    lr: float = opt(3e-4, "AdamW peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    scheduler: Literal["linear", "cosine", "constant"] = opt("linear", "LR decay after warm-up, over train.schedule_span")
    warmup_steps: int = opt(0, "linear warm-up steps at the start of train.schedule_span")
    schedule_span: Literal["round", "run"] = opt("round", "what the warm-up and decay span: round = each local round on its own (the schedule restarts every round); run = the whole run, as one training of run.rounds x the round's local steps (a client at step s of round r is at step (r - 1) x steps + s; OpenFedLLM decays its learning rate over the rounds)")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    prox_mu: float = opt(0.0, "FedProx: proximal term mu/2 * ||w - w_global||^2 on the LoRA parameters in every local step (0 = off, plain FedAvg clients)")
    dpsgd_noise_multiplier: float = opt(0.0, "sample-level DP-SGD in local training (0 = off): each step samples batch_size rows without replacement, clips each example's gradient (Opacus per-example gradients) to dpsgd_clip, adds Gaussian noise of std dpsgd_noise_multiplier x dpsgd_clip to the sum; each client's rows are accounted over its steps (dp-accounting RDP), separately from [privacy]")
    dpsgd_clip: float = opt(1.0, "DP-SGD: L2 norm each example's gradient (all LoRA parameters together) is clipped to")
    dpsgd_delta: float = opt(1e-5, "DP-SGD: delta of the sample-level (epsilon, delta); keep it below 1 / rows per client")


@dataclass
class EvalSection:
    max_examples: int = opt(0, "evaluate on at most this many held-out rows (0 = all)")
    batch_size: int = opt(16, "evaluation batch size")
    generate: bool = opt(True, "after the last round (and for the base model), generate answers on the held-out set: exact match per category")
    max_new_tokens: int = opt(32, "generation length for exact-match evaluation")
    compare_base: bool = opt(True, "at the end, also evaluate the untuned base model and print base vs federated")


@dataclass
class CompareSection:
    variants: list = opt(["base", "local", "centralized", "federated"], "fedtune compare: which variants to run (base = no tuning, local = each client alone, centralized = all client data pooled, federated)")
    algorithms: list = opt([], "fedtune compare: run the federated variant once per algorithm listed (server.aggregation values, or fedprox, flexlora_svd, flora, ffa_lora, hetlora, flexlora_het: ranks [r/4, r/2, r] unless lora.client_ranks is set), or per entry table { name = \"fedavgm_lr3\", algorithm = \"fedavgm\", set = { server = { server_lr = 3.0 } } } (set: server.* but its client selection, train.prox_mu, lora.freeze_a, lora.client_ranks); [] = the config's own")
    local_clients: int = opt(0, "fedtune compare: run the local-only baseline for the first N clients only (0 = every client)")


@dataclass
class JudgeSection:
    endpoint: str = opt("", "OpenAI-compatible base URL for an LLM judge, e.g. http://127.0.0.1:8000/v1 ('' = judge off)")
    model: str = opt("", "judge model name sent to the endpoint")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable that holds the endpoint's API key (sent as a Bearer token; never stored)")
    questions: str = opt("", "question file for the judge (Vicuna/MT-Bench question.jsonl); '' = the held-out rows' instructions")
    max_questions: int = opt(80, "judge at most this many questions (0 = all)")
    max_new_tokens: int = opt(256, "answer length when generating answers to the judge's questions")
    max_tokens: int = opt(512, "the judge's own reply length")
    timeout_s: float = opt(120.0, "seconds to wait for one judge reply")


@dataclass
class NvflareSection:
    threads: int = opt(0, "FLARE simulator: sites that run at the same time (0 = all). Below the number of sites, FLARE's simulator swaps sites in and out and relaunches each site's process (reloading its model) every round")
    workspace: str = opt("", "FLARE simulator workspace ('' = <run folder>/nvflare/workspace); must be empty")
    python: str = opt("", "command that starts the site script on each site ('' = this Python in the simulator, 'python3 -u' in exported jobs)")
    job_name: str = opt("", "FLARE job name ('' = run.name)")
    task_timeout: float = opt(3600.0, "seconds a site may take for one round's task when server.client_timeout = 0, so that one hung site cannot stall a deployment forever")
    launch_timeout: float = opt(300.0, "seconds a site script may take to start and connect (loading the model included)")


@dataclass
class TaskSection:
    name: str = opt("sst2", "FedBPT classification task: a built-in (sst2, yelp, agnews, mrpc, rte, snli, dbpedia) with BBT's template and verbalizer, or 'custom' (then set text_columns, template and verbalizer)")
    train_path: str = opt("", "training file (.csv, .tsv, .jsonl, .json; header/fields name the columns), or hub:DATASET[@CONFIG]:SPLIT; '' = the built-in task's Hugging Face dataset (refused when test_path is a local file)")
    test_path: str = opt("", "test file, same format, or the training file itself with test_max_rows > 0 (those rows are held out of training); '' = the built-in task's Hugging Face test split (refused when train_path is a local file). Never used for selection")
    text_columns: list = opt([], "override: text columns, each filled into the template as {column}")
    label_column: str = opt("", "override: label column ('' = the task's, 'label' for custom)")
    template: str = opt("", "override: template with {column} fields, the prompt slot <P> (default: at the start) and the answer slot <mask>; for causal LMs the label word is the next token after the text before <mask>")
    verbalizer: dict = opt({}, "override: label value -> one-token word, e.g. {\"0\" = \"bad\", \"1\" = \"great\"}; its order is the class order")
    metric: str = opt("", "override: 'accuracy' or 'f1' (binary F1 of the second class; macro F1 for more classes)")
    skip_labels: list = opt([], "override: label values dropped when loading (SNLI's -1)")
    label_map: dict = opt({}, "file label value -> verbalizer label, applied on load, e.g. {entailment = \"0\", not_entailment = \"1\"} ({} = the built-in task's: GLUE's RTE words for rte, SNLI's for snli)")
    k_shot: int = opt(16, "training rows per class, drawn from the training file (0 = all rows left after the dev split)")
    dev_shots: int = opt(100, "dev rows per class, drawn from the training file, disjoint from the training rows; the global prompt is selected on them")
    test_max_rows: int = opt(0, "evaluate the test set on a fixed class-balanced subset of this many rows (0 = all)")
    columns: list = opt([], "the column names of headerless .csv/.tsv files, in order (e.g. AG News as released: [\"label\", \"title\", \"description\"]); [] = the first row is the header")
    template_candidates: list = opt([], "fedbpt.search: templates to try beside task.template ([] = the built-in task's alternatives); each is also tried with and without the space before <mask> and, for a tokenizer with a chat template, in the chat format")
    word_candidates: dict = opt({}, "fedbpt.search: label value -> list of candidate one-token words tried beside the verbalizer's ({} = the built-in task's alternatives, none when task.verbalizer is set)")
    quoting: Literal["auto", "none", "csv"] = opt("auto", ".tsv quoting: none = fields are never quoted (GLUE: a sentence may start with a quote mark); csv = fields may be quoted (holding tabs, quotes or newlines); auto = quoted when the header row's fields all are, or when only the quoted reading gives every row the header's field count. .csv is always read with quoting")


@dataclass
class FedBPTSection:
    mode: Literal["improved", "reference", "generation"] = opt("improved", "reference = FedBPT's server exactly (rank recombination, its sigma rule, one ES seed for all, covariance on the wire); improved = each defect fixed by the switches below (ignored in reference mode); generation = one round is one generation of a single global separable CMA-ES: every selected client scores the same popsize candidates on its rows and returns per-candidate loss sums (centralized CMA-ES over the union of the clients' rows)")
    model_kind: Literal["auto", "causal", "masked"] = opt("auto", "causal (label = next token after the template) or masked (label at <mask>); auto reads the model config")
    intrinsic_dim: int = opt(500, "dimension d of the space CMA-ES searches (z)")
    n_prompt_tokens: int = opt(50, "prompt length in tokens; A maps z to n_prompt_tokens x hidden embeddings")
    prompt_mode: Literal["add", "cat"] = opt("add", "add = A z added to placeholder-token embeddings; cat = A z (+ init_prompt) inserted as the prompt embeddings")
    init_prompt: str = opt("", "cat mode: text whose token embeddings form the initial prompt p0 (cycled to n_prompt_tokens); '' = zero")
    proj_alpha: float = opt(1.0, "projection: A ~ N(0, std^2), std = proj_alpha * word-embedding std / (sqrt(d) * proj_sigma)")
    proj_sigma: float = opt(1.0, "projection: the sigma in A's std rule")
    sigma0: float = opt(0.0, "initial CMA-ES step size; 0 = the mode's default: 1.0 in reference mode (FedBPT's), 0.3 in improved and generation modes (at 1.0 the mean drifts on the few rows each ranking sees; docs/fedbpt.md)")
    mean_lr: float = opt(1.0, "the learning rate of the global prompt mean. generation mode: cma's CMA_cmean: each generation the mean moves this fraction of the way to the weighted recombination of the best candidates; improved mode: each round the global mean moves this fraction of the way to the clients' weighted mean. Below 1 averages out the noise of few-row fitness (a random walk of the mean when ranks are noise); 1 = standard CMA-ES / FedBPT's averaging. Not in reference mode")
    popsize: int = opt(5, "CMA-ES population size (local ES; generation: the global ES's candidates per round)")
    separable: bool = opt(False, "improved: local CMA-ES with a diagonal covariance (cma's CMA_diagonal; generation mode always is)")
    calibration: Literal["none", "batch", "content_free"] = opt("none", "calibrate the verbalizer's class scores in every evaluation (dev, test, zero prompt): batch = divide by the class probabilities averaged over the rows scored (Zhou et al. 2024); content_free = by those of content-free inputs ('N/A', '[MASK]', '') in the same template (Zhao et al. 2021)")
    search: bool = opt(True, "before round 1, choose the template, label words and calibration with the zero prompt on the run's training and dev rows (never test): task.template_candidates x task.word_candidates x fedbpt.search_calibration; the choice is printed, saved as search.json and written into the run's config.toml (with search = false). false = keep the task's own template, words and fedbpt.calibration (a choice written into a config, or BBT's start)")
    search_calibration: list = opt(["none", "batch", "content_free"], "fedbpt.search: calibrations to try")
    search_chat: bool = opt(True, "fedbpt.search: also try each template in the model's chat format (causal LMs whose tokenizer has a chat template)")
    deep: bool = opt(False, "generation mode: deep prompts (BBTv2): besides the input prompt, an offset A_l z_l at the prompt positions entering every layer, one separable CMA-ES per layer, optimized layer by layer; each A_l's std follows that layer's hidden-state std, which the black box publishes")
    deep_accept: bool = opt(False, "fedbpt.deep: an acceptance test per layer: each round the clients also score, on the same rows as the candidates, the accepted deep prompt and the proposal (the accepted prompt with the last-told layer set to its CMA-ES mean); the proposal replaces the accepted prompt only when its loss is lower. Two more forwards per round; what is evaluated and saved is the accepted prompt")
    deep_layers: int = opt(0, "fedbpt.deep: how many layers, from the input, get a tuned prompt (0 = every layer); the others keep a zero offset. 1 = the input prompt alone: with deep_accept, the one-generation mode with an acceptance test")
    deep_rounds_per_layer: int = opt(2, "fedbpt.deep: rounds (generations) each layer is optimized before the next one takes over (layer 0, 1, ..., then again from layer 0)")
    calibrate_fitness: bool = opt(False, "apply fedbpt.calibration inside the clients' fitness too (batch: over each client's rows or minibatch)")
    minibatch: int = opt(0, "rows of a client scored per generation, the same for every candidate, drawn afresh each generation (0 = all of the client's rows)")
    local_iter: int = opt(8, "local CMA-ES generations per round")
    loss: Literal["ce", "hinge", "perf"] = opt("ce", "ce = cross-entropy over verbalizer logits; hinge = multi-class margin 2; perf = -accuracy")
    perturb: bool = opt(True, "perturbation objective: fitness = loss(clean) / loss(copy with perturb_rate of the text tokens replaced by random ones)")
    perturb_rate: float = opt(0.5, "fraction of text tokens replaced in the perturbed copy")
    bound: float = opt(0.0, "if > 0, CMA-ES searches within [-bound, bound] per coordinate")
    batch_population: bool = opt(True, "evaluate a whole CMA-ES population in one batched forward pass (false = one candidate at a time)")
    max_forward_rows: int = opt(512, "at most this many rows (candidates x examples) per forward pass")
    forward_overhead_tokens: int = opt(128, "fixed cost of one forward pass, in tokens: rows are grouped by length into forwards minimizing overhead + padded tokens, and the text before <P> is shared when that saves more (128: measured on SmolLM2-135M, CPU; docs/benchmarks.md)")
    share_context: bool = opt(True, "causal LMs: when the template has text before <P>, run that text once per example and let every candidate attend to its cached keys/values (same logits, less work per candidate)")
    max_seq_len: int = opt(256, "tokens per row (prompt included); the longest text field is cut to fit")
    distinct_seeds: bool = opt(True, "improved: each client gets its own CMA-ES seed each round (reference: one seed for all)")
    weight_by_size: bool = opt(True, "improved: average client means weighted by shard size (false: CMA rank weights by fitness, as the reference)")
    sigma_decay: float = opt(0.9, "improved: sigma is multiplied by this each round down to sigma_min (1.0 = no annealing)")
    sigma_min: float = opt(0.05, "improved: floor of the annealed sigma")
    prompt_norm_max: float = opt(1.0, "improved: scale the global z back to norm <= prompt_norm_max * sqrt(d) (0 = off; 1 = entries of A z at word-embedding scale)")
    select_on_dev: bool = opt(True, "improved and generation: keep the best global prompt on the dev split (false: the final round's); both are reported on the test set")
    select_by: Literal["metric", "loss"] = opt("metric", "fedbpt.select_on_dev: what makes a round's prompt the best so far on the dev split: metric = the task's metric (ties: the lower loss); loss = the lower dev cross-entropy (a few hundred dev rows move the loss smoothly, the accuracy in steps of one row)")


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    server: ServerSection = field(default_factory=ServerSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    faults: FaultsSection = field(default_factory=FaultsSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    compare: CompareSection = field(default_factory=CompareSection)
    judge: JudgeSection = field(default_factory=JudgeSection)
    nvflare: NvflareSection = field(default_factory=NvflareSection)
    task: TaskSection = field(default_factory=TaskSection)
    fedbpt: FedBPTSection = field(default_factory=FedBPTSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTION_DOCS = {
    "run": "What to run and where results go.",
    "model": "The base model. It never moves: FedIT trains LoRA adapters on it; FedBPT only runs it forward.",
    "data": "Instruction data (FedIT).",
    "partition": "How the data is split across clients, and the held-out global test set.",
    "server": "Client selection, aggregation, and what a round does with failing clients.",
    "privacy": "Differential privacy (docs/privacy.md): client-level DP-FedAvg with an RDP accountant (dp-accounting).",
    "secagg": "Secure aggregation (docs/privacy.md): pairwise masks from X25519 key agreement, Shamir-shared seeds, dropout recovery.",
    "faults": "Fault injection in the simulator, to test failing clients.",
    "lora": "LoRA adapter (FedIT).",
    "train": "Local training on each client (FedIT).",
    "eval": "Evaluation of the global model on the held-out set.",
    "compare": "fedtune compare: base model, each client alone, centralized and federated, at equal training budgets.",
    "judge": "Optional LLM judge (single-answer score 1-10 and pairwise comparison) over an OpenAI-compatible endpoint.",
    "nvflare": "NVIDIA FLARE engine (run.engine = 'nvflare', fedtune nvflare export): simulator and job settings. Sites name their data in their own site config (docs/nvflare.md).",
    "task": "Classification task (FedBPT): data files, template, verbalizer, metric, k-shot train and dev splits.",
    "fedbpt": "Black-box prompt tuning (FedBPT): projection, local CMA-ES, objective, and the server mode with its fixes.",
}
