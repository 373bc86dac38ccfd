"""Local LoRA training: one function that reads top to bottom.

Speed on CPU comes from: bf16 autocast (AMX); each micro-batch as one padding-free
sequence with attention computed row by row (`train.packing`, default "auto": flat on CPU;
fedtune/fedit/packing.py), or else micro-batches grouped by length, each padded only to its own
longest row; the LM head and cross-entropy only at positions that carry a label (with the prompt
masked that is a small share of the sequence), head and loss in one autograd function
(fedtune/fedit/head_loss.py); LoRA dropout masks drawn 16 bits per element instead of by
`bernoulli_` (fedtune/fedit/fast_dropout.py); Llama-style RMSNorm with its frozen weight in
fewer passes (fedtune/fedit/fast_norm.py); the LoRA inputs left in autocast's dtype (PEFT would
cast them to fp32 and autocast back); plain ("eager") attention on CPU when unpacked,
whose backward beats SDPA's at these lengths (`train.attention`); and optionally
(`train.compile`) torch.compile of the decoder layers, which fuses the element-wise work
between matmuls (fedtune/fedit/train_speed.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from peft.helpers import disable_input_dtype_casting

from fedtune.core.batching import plan_forwards
from fedtune.data.instructions import Tokenized
from fedtune.fedit import dpsgd, packing
from fedtune.fedit.fast_dropout import fast_lora_dropout
from fedtune.fedit.fast_norm import fast_rms_norm
from fedtune.fedit.head_loss import head_cross_entropy
from fedtune.fedit.lora import base_lm
from fedtune.fedit.train_speed import TrainingAttention, check_supported, compiled_layers


@dataclass
class TrainStats:
    loss: float  # mean token loss over the local round
    steps: int
    examples_seen: int
    tokens: int  # non-pad tokens through forward+backward
    compute_seconds: float  # time inside forward/backward/optimizer steps
    seconds: float
    lr_sum: float = 0.0  # the learning rates of all steps, summed (SCAFFOLD's K * lr)
    dpsgd_clipped: int = 0  # DP-SGD: examples whose gradient was clipped


def padded_width(n: int) -> int:
    """Round a micro-batch width up to a step that grows with it (8 up to 127 tokens, then
    1/8 of the power of two below: at most 12.5% padding, about 8 widths per doubling).

    Every new input shape makes oneDNN build and cache new kernels: seconds of compile time
    and tens of MB that stay resident (measured: RSS grew with the number of distinct widths
    seen, not with the work done). Few widths keep both small. Right padding under the
    attention mask leaves the real positions' results unchanged."""
    step = max(8, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def collate(batch: list[Tokenized], pad_id: int, device: torch.device):
    """Right-pad a micro-batch to its longest row, rounded up by `padded_width`. Returns
    ids, attention mask, labels."""
    width = padded_width(max(len(t) for t in batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, t in enumerate(batch):
        n = len(t)
        ids[i, :n] = torch.tensor(t.input_ids)
        labels[i, :n] = torch.tensor(t.labels)
        mask[i, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def micro_batches(batch: list[Tokenized], cfg, packed: bool = False) -> list[list[Tokenized]]:
    """The micro-batches of one optimizer batch: consecutive slices of micro_batch_size rows,
    or with `group_by_length` rows of similar (padded) width grouped so as to minimize padded
    tokens plus a fixed cost per micro-batch. With packing (`packed`), consecutive slices: the
    packing removes the padding that grouping only reduces, in fewer forwards. The loss is
    normalized over the whole optimizer batch, so the gradient does not depend on the grouping."""
    m = cfg.micro_batch_size
    if packed or not cfg.group_by_length:
        return [batch[i:i + m] for i in range(0, len(batch), m)]
    widths = np.array([padded_width(len(t)) for t in batch])
    plan = plan_forwards(widths, 1, m, cfg.micro_batch_overhead_tokens)
    return [[batch[i] for i in sorted(rows.tolist())] for rows, _ in plan]  # batch order within a group: one group = the batch


def causal_lm_loss(model, ids, mask, labels, reduction: str = "mean", position_ids=None,
                   decoder_kwargs: dict | None = None) -> torch.Tensor:
    """Next-token cross-entropy computed only where a label exists.

    `model` is a (PEFT-wrapped) Hugging Face causal LM. We run its decoder for hidden
    states, then apply the LM head to the labelled positions only: for prompt-masked
    instruction data this skips most of the (hidden x vocab) head and the softmax.
    Packed rows (fedtune/fedit/packing.py) come with `position_ids` and no `mask`, flat-packed
    rows also with their boundaries (`decoder_kwargs`).
    """
    lm = base_lm(model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    kw = dict(decoder_kwargs or {})
    if position_ids is not None:
        kw["position_ids"] = position_ids
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False, **kw).last_hidden_state  # (B, T, H); no KV cache
    target = labels[:, 1:]  # position t predicts token t+1
    keep = target != -100
    h = hidden[:, :-1][keep]  # (N, H), N = labelled positions
    cfg = getattr(lm.config, "get_text_config", lambda: lm.config)()
    scale = getattr(cfg, "logit_scale", None) or 1.0  # e.g. Cohere; 1.0 elsewhere
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2
    return head_cross_entropy(head, h, target[keep], scale=scale, softcap=softcap, reduction=reduction)


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * max(0.0, 1.0 - progress)


def schedule(steps: int, span: str, run_position: tuple[int, int] | None) -> tuple[int, int]:
    """(offset, total): this round's local step s runs at step offset + s of a schedule `total`
    steps long. span "round": (0, steps), every round from the top; "run": the run as one
    training of `rounds` rounds of `steps` steps each, so round r starts at (r - 1) x steps."""
    if span == "round":
        return 0, steps
    rnd, rounds = run_position or (0, 0)
    if not 1 <= rnd <= rounds:
        raise ValueError(f"train.schedule_span = 'run' needs the round (1..run.rounds) and run.rounds; "
                         f"got round {rnd} of {rounds}")
    return (rnd - 1) * steps, rounds * steps


def proximal_term(params: list[torch.nn.Parameter], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term mu/2 * sum ||w - w0||^2 (its gradient is mu * (w - w0))."""
    return 0.5 * mu * sum(torch.sum((p.float() - a.float()) ** 2) for p, a in zip(params, anchor))


def local_steps(n_examples: int, cfg) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size))


def train_local(model, params: list[torch.nn.Parameter], data: list[Tokenized], cfg, *, seed: int, pad_id: int,
                device: torch.device, amp, progress=None, correction: list[torch.Tensor] | None = None,
                run_position: tuple[int, int] | None = None) -> TrainStats:
    """Train the trainable `params` of `model` on `data` for one local round.

    `cfg` is the [train] config section; `seed` fixes the data order; `amp` is a callable
    returning the autocast context; `progress` (optional) is called with (step, loss);
    `run_position` = (round, rounds) places this round in the run when cfg.schedule_span is
    "run" (see `schedule`); `correction` (SCAFFOLD: c - c_i, one tensor per parameter) moves the parameters by -lr (c - c_i)
    after every optimizer step: SCAFFOLD's local step y <- y - lr (g + c - c_i) with the
    correction kept out of the optimizer, so that AdamW does not rescale it (added to the gradient
    it came out of Adam's normalization at the size of a whole step, and the control variates,
    (x - y_i) / (K lr), measured in those units, made rounds oscillate). With plain SGD the two
    are the same step; OpenFedLLM applies its correction the same way.
    """
    t_start = time.perf_counter()
    steps = local_steps(len(data), cfg)
    offset, total = schedule(steps, getattr(cfg, "schedule_span", "round"), run_position)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)

    # Data order: a fresh seeded permutation per epoch, consumed batch by batch.
    order: list[int] = []

    sigma = float(getattr(cfg, "dpsgd_noise_multiplier", 0.0))
    if sigma > 0 and cfg.batch_size > len(data):
        raise ValueError(f"DP-SGD samples train.batch_size = {cfg.batch_size} of a client's rows per step; this "
                         f"client holds {len(data)}")

    def next_batch(k: int) -> list[Tokenized]:
        nonlocal order
        if sigma > 0:  # DP-SGD: each step a fresh uniform sample without replacement (what the accountant assumes)
            return [data[i] for i in rng.choice(len(data), size=k, replace=False)]
        out = []
        while len(out) < k:
            if not order:
                order = rng.permutation(len(data)).tolist()
            out.append(data[order.pop()])
        return out

    # fp16 autocast (GPUs without bf16) underflows small gradients: scale the loss, unscale before clipping
    ctx = amp()
    fp16 = isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    if sigma > 0:
        dpsgd.check_supported(ctx)
        noise = dpsgd.noise_generator(device)

    # FedProx (Li et al., 2020): mu/2 * ||w - w_global||^2 on the trainable (LoRA) parameters
    mu = float(getattr(cfg, "prox_mu", 0.0))
    anchor = [p.detach().clone() for p in params] if mu > 0 else None

    compile_setting = getattr(cfg, "compile", "off")
    check_supported(compile_setting, device, dpsgd=sigma > 0)

    model.train()
    loss_sum, loss_tokens, tokens, seen, compute, lr_sum, dp_clipped = 0.0, 0, 0, 0, 0.0, 0.0, 0
    with contextlib.ExitStack() as stack:
        if sigma > 0:
            stack.enter_context(dpsgd.PerExampleGrads(model))
        attention = stack.enter_context(TrainingAttention(model, getattr(cfg, "attention", "auto"), device))
        packed = packing.check(model, getattr(cfg, "packing", "off"), device, attention, dpsgd=sigma > 0,
                               compiled=compile_setting != "off")
        collate_rows = {"on": packing.collate_packed, "flat": packing.collate_flat}.get(packed)
        stack.enter_context(compiled_layers(model, compile_setting))  # after the probe: it runs eagerly
        eager_cpu = device.type == "cpu" and compile_setting == "off"  # a compiled layer fuses these itself
        stack.enter_context(fast_lora_dropout(model, eager_cpu))
        stack.enter_context(fast_rms_norm(model, eager_cpu))
        # PEFT casts each LoRA layer's input to the LoRA weights' dtype (fp32), and autocast casts it
        # back for lora_A's matmul: two copies of the input forward and two of its gradient backward,
        # with the dropout in between on fp32. Under autocast the LoRA matmuls run in its dtype either
        # way, so the cast changes nothing but the time (DP-SGD keeps it: Opacus reads those inputs)
        stack.enter_context(disable_input_dtype_casting(model, active=isinstance(ctx, torch.autocast) and sigma == 0))
        for step in range(steps):
            lr = lr_at(offset + step, total, cfg.lr, cfg.warmup_steps, cfg.scheduler)
            for g in opt.param_groups:
                g["lr"] = lr
            lr_sum += lr
            batch = next_batch(cfg.batch_size)
            n_label = sum(sum(1 for x in t.labels[1:] if x != -100) for t in batch)
            t0 = time.perf_counter()
            for micro in micro_batches(batch, cfg, packed != "off"):
                if collate_rows:
                    p = collate_rows(micro, pad_id, device, padded_width)
                    ids, mask, labels, position_ids, n_tokens = p.ids, None, p.labels, p.position_ids, p.tokens
                    decoder_kwargs = p.decoder_kwargs
                else:
                    ids, mask, labels = collate(micro, pad_id, device)
                    position_ids, n_tokens, decoder_kwargs = None, int(mask.sum()), None
                if packed != "flat":  # flat: the flat attention throughout (packing.check switched to it)
                    attention.use(*ids.shape)
                with amp():
                    if sigma > 0:  # DP-SGD: each example's own mean loss, so each per-example gradient is its own
                        token_loss = causal_lm_loss(model, ids, mask, labels, reduction="none")
                        loss, scaled = token_loss.detach().sum(), dpsgd.example_mean_sum(token_loss, labels)
                    else:
                        loss = causal_lm_loss(model, ids, mask, labels, reduction="sum", position_ids=position_ids,
                                              decoder_kwargs=decoder_kwargs)
                        scaled = loss / max(n_label, 1)  # token-weighted mean over the whole optimizer batch
                (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += float(loss.detach())
                tokens += n_tokens
            if sigma > 0:  # per-example clip, sum, noise, / batch size (before any term that is not data)
                dp_clipped += dpsgd.privatize(params, len(batch), cfg.dpsgd_clip, sigma, noise)
            if anchor is not None:
                prox = proximal_term(params, anchor, mu)
                (scaler.scale(prox) if scaler else prox).backward()
            if scaler:
                scaler.unscale_(opt)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler:
                scaler.step(opt)  # skips the step when the scaled gradients overflowed
                scaler.update()
            else:
                opt.step()
            if correction is not None:  # SCAFFOLD: y <- y - lr (c - c_i), outside the optimizer (see the docstring)
                with torch.no_grad():
                    for p, c in zip(params, correction):
                        p.add_(c.to(p.dtype), alpha=-lr)
            opt.zero_grad(set_to_none=True)
            compute += time.perf_counter() - t0
            loss_tokens += n_label
            seen += len(batch)
            if progress is not None:
                progress(step, loss_sum / max(loss_tokens, 1))
    model.eval()
    return TrainStats(loss_sum / max(loss_tokens, 1), steps, seen, tokens, compute, time.perf_counter() - t_start,
                      lr_sum, dp_clipped)
