"""Local LoRA training speed: fedtune's loop vs a plain Hugging Face `Trainer` loop in fp32, and
vs the same Trainer with `bf16=True` (what a user who knows their hardware would run).

The Trainer side is Shepherd's way (FederatedGPT-Shepherd, fed_utils/client.py): a PEFT
LoRA model in fp32 (on a CPU there is no fp16), `transformers.Trainer` with
`DataCollatorForSeq2Seq(pad_to_multiple_of=8)`, the model's own loss (the LM head over
every position). fedtune's side is `fedtune.fedit.train.train_local` as a client runs
it: bf16 autocast where bf16 matmuls are native, length-grouped micro-batches each padded to
its own longest row (the `fedtune_packed` side instead packs the rows of each micro-batch end
to end with a block-diagonal mask: `train.packing = "on"`; the `fedtune_flat` side lays each
micro-batch out as one row with no padding and computes attention per example:
`train.packing = "flat"`), the LM head only at labelled positions.

Both sides get the same model weights, the same LoRA config, the same tokenized rows in
the same batches (the Trainer reads them in fedtune's seeded order), the same batch size
and optimizer (AdamW, linear decay). They run alternately in one process, `--reps` times
each, so that machine noise hits both; the first optimizer step of every block is a
warm-up and is not timed. Tokens/s counts non-pad tokens through forward and backward.

The bf16 Trainer (`TrainingArguments(bf16=True)`: torch's bf16 autocast over the fp32 model) runs
by default everywhere: even on an AVX2-only CPU, where a bf16 `torch.mm` is emulated at a small
fraction of fp32 speed, the autocast Trainer measured faster than the fp32 one (oneDNN's bf16
linear layers there; docs/benchmarks.md). `--trainer-bf16 never` leaves it out; `auto` runs it
only where bf16 matmuls are native (CUDA, AMX, AVX512-BF16). Where fedtune's frozen base
weights are bf16 (`model.dtype = "auto"`, the default, on such hardware) a fourth side runs too, `trainer_bf16w`: the Trainer with
`bf16=True` over a model loaded in bf16 (`from_pretrained(dtype=torch.bfloat16)`; PEFT keeps the
LoRA weights in fp32), so each fedtune side also meets a Trainer with the same weights.

MFU: model FLOPs per second over the peak of a matmul measured in this same run (torch.mm on
large square matrices, before and after the training blocks; the max), in bf16 and in fp32; the
headline MFU is against the faster of the two (bf16 where it is native, fp32 on AVX2-only CPUs).
Model FLOPs of one row of L tokens, N labelled: every linear layer of the decoder
forward (2 x params x L) and backward for the inputs only (2 x params x L: the base is
frozen, LoRA's own weight gradients are negligible), attention scores and mixing
(forward 2 x layers x L^2 x d, backward twice that), and the LM head at the N labelled
positions (4 x head params x N). The LM head at unlabelled positions is not useful work
and is not counted, on either side.

Run:  .venv/bin/python benchmarks/train_throughput.py            (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DOLLY = ROOT.parent / "shared" / "data" / "dolly15k" / "databricks-dolly-15k.jsonl"


def matmul_peak(dtype: torch.dtype, seconds: float = 3.0, device: torch.device = torch.device("cpu")) -> float:
    """Sustained FLOP/s of torch.mm on square matrices (the best of a few sizes)."""
    best = 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for n in ((1024, 2048, 3072) if device.type == "cpu" else (4096, 8192)):
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up
        sync()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            torch.mm(a, b)
            reps += 1
            sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
        if time.perf_counter() - t0 > seconds:  # one product outlasts the budget (emulated bf16): larger ones too
            break
    return best


def model_shape(model) -> dict:
    """Decoder linear params, LM head params, layers, attention width."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = sum(p.numel() for name, p in lm.get_decoder().named_parameters()
               if p.dim() == 2 and "lora_" not in name and "embed" not in name)
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"body": body, "head": lm.get_output_embeddings().weight.numel(), "layers": cfg.num_hidden_layers,
            "d_attn": cfg.num_attention_heads * head_dim}


def row_flops(n_tokens: int, n_labels: int, shape: dict) -> float:
    linear = 4 * shape["body"] * n_tokens
    attention = 3 * 2 * shape["layers"] * n_tokens**2 * shape["d_attn"]
    head = 4 * shape["head"] * n_labels
    return float(linear + attention + head)


# ----------------------------------------------------------------------------- the two loops


def fedtune_block(peft_model, params, data, train_cfg, pad_id, amp, seed, device, side="fedtune") -> list[float]:
    """train_local over the rows; returns the time at the end of every optimizer step."""
    from fedtune.fedit.train import train_local

    stamps: list[float] = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    train_local(peft_model, params, data, train_cfg, seed=seed, pad_id=pad_id, device=device, amp=amp,
                progress=lambda step, loss: (sync(), stamps.append(time.perf_counter())))
    FIRST_STEP_SECONDS.setdefault(side, []).append(stamps[0] - t0)  # the warm-up step (compiled: the one-time compile)
    return stamps


FIRST_STEP_SECONDS: dict[str, list[float]] = {}


def trainer_block(model, tokenizer, ordered, batch_size, micro, steps, lr, out_dir, bf16=False,
                  use_cpu=True) -> list[float]:
    """A plain HF Trainer loop (fp32, or bf16 autocast) over `ordered` rows, read in that order."""
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if not use_cpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=micro,
                             gradient_accumulation_steps=batch_size // micro, max_steps=steps, learning_rate=lr,
                             lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, optim="adamw_torch",
                             logging_strategy="no", save_strategy="no", report_to=[], use_cpu=use_cpu, bf16=bf16,
                             fp16=False, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
                             seed=0)
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    Trainer_ = InOrder(model=model, args=args, train_dataset=ordered, data_collator=collator, callbacks=[Stamp()])
    Trainer_.train()
    return stamps


def fedtune_order(n: int, seed: int, take: int) -> list[int]:
    """The row order train_local draws with this seed (one permutation, consumed from its end)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    return [order.pop() for _ in range(take)]


def timed(stamps: list[float], batches: list[list], shape: dict) -> tuple[float, float, float]:
    """(seconds, tokens, model FLOPs) of steps 2..K (the first step is a warm-up)."""
    secs = stamps[-1] - stamps[0]
    rows = [t for b in batches[1:len(stamps)] for t in b]
    tokens = sum(len(t) for t in rows)
    flops = sum(row_flops(len(t), sum(1 for x in t.labels[1:] if x != -100), shape) for t in rows)
    return secs, tokens, flops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per timed block (the first is a warm-up)")
    ap.add_argument("--reps", type=int, default=3, help="blocks per side, alternating")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--cutoff-len", type=int, default=512, help="Shepherd's cutoff_len")
    ap.add_argument("--modes", default="masked,inputs",
                    help="masked = loss on the response only (fedtune's default); inputs = train_on_inputs (Shepherd's)")
    ap.add_argument("--data", default=str(DOLLY), help="Dolly jsonl (default ../shared/data/dolly15k); else demo:skills")
    ap.add_argument("--fedtune-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="model.dtype of fedtune's frozen base weights (fedtune's default: auto, bfloat16 where bf16 "
                         "matmuls are native)")
    ap.add_argument("--fedtune-compile", default="both", choices=["off", "layers", "both"],
                    help="train.compile of fedtune's side; both = two fedtune sides, as shipped (off) and compiled "
                         "(the one-time compile falls in block 1's warm-up step and is reported separately)")
    ap.add_argument("--fedtune-packing", default="all", choices=["off", "on", "flat", "both", "off+flat", "all"],
                    help="train.packing of fedtune's side; both = as shipped (off: length-grouped micro-batches, each "
                         "padded to its longest row) and a side with the rows of each micro-batch packed under a "
                         "block-diagonal mask (on); all = those two and a flat-packed side (flat: one row per "
                         "micro-batch, attention per example, fedtune/fedit/flat_attention.py); off+flat = as "
                         "shipped and the flat side")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides train")
    ap.add_argument("--trainer-bf16", default="always", choices=["auto", "always", "never"],
                    help="the Trainer with bf16=True: auto = where bf16 matmuls are native (AMX, AVX512-BF16, CUDA)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedtune import config as C
    from fedtune.data import skills
    from fedtune.data.instructions import PromptFormatter, load_rows, tokenize_rows
    from fedtune.fedit.lora import AdapterSlot, attach_lora
    from fedtune.models import load_causal_lm

    cfg = C.load(None, [f"train.batch_size={args.batch_size}", f"train.micro_batch_size={args.micro_batch_size}",
                        f"train.max_steps={args.steps}", f"model.dtype='{args.fedtune_dtype}'",
                        f"train.compile='{'layers' if args.fedtune_compile == 'layers' else 'off'}'",
                        f"train.packing='{args.fedtune_packing if args.fedtune_packing in ('on', 'flat') else 'off'}'",
                        f"model.device='{args.device}'"])
    import dataclasses

    compiled_cfg = dataclasses.replace(cfg.train, compile="layers")
    packed_cfg = dataclasses.replace(cfg.train, packing="on")
    flat_cfg = dataclasses.replace(cfg.train, packing="flat")
    torch.manual_seed(0)
    from fedtune.models import cpu_has_fast_bf16

    dev = torch.device(args.device)
    peak0, fp32_peak0 = matmul_peak(torch.bfloat16, device=dev), matmul_peak(torch.float32, device=dev)
    native = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_fast_bf16()
    with_bf16 = args.trainer_bf16 == "always" or (args.trainer_bf16 == "auto" and native)
    bf16_note = "" if with_bf16 else (
        f"Trainer bf16 not run: bf16 matmuls are not native on this CPU (torch.mm bf16 {peak0 / 1e9:.1f} GFLOP/s "
        f"vs fp32 {fp32_peak0 / 1e9:.1f}); the fp32 Trainer is the strongest baseline here")
    if bf16_note:
        print(bf16_note)
    lm = load_causal_lm(cfg.model)
    peft_model = attach_lora(lm.model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    slot = AdapterSlot(peft_model)
    shape = model_shape(peft_model)

    def trainer_model(dtype):
        """The Trainer's model: the same weights (the cached safetensors folder) in `dtype`, the same
        LoRA, the same starting adapter as fedtune's."""
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(lm.path, dtype=dtype).to(dev),
                           LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM"))
        AdapterSlot(m).set(slot.get())
        return m

    fedtune_weights = next(lm.model.parameters()).dtype
    hf = trainer_model(torch.float32)  # the Trainer side: fp32 weights
    # the Trainer over bf16 weights, beside fedtune's bf16 weights
    hf_w = trainer_model(torch.bfloat16) if fedtune_weights == torch.bfloat16 and with_bf16 else None

    if Path(args.data).is_file():
        rows = load_rows(args.data)
        source = f"{args.data} (Dolly)"
    else:
        rows = skills.generate(60, 0)
        source = "demo:skills (../shared/data not found)"
    pick = np.random.default_rng(0).choice(len(rows), size=args.steps * args.batch_size * 2, replace=False)
    rows = [rows[i] for i in pick]
    fmt = PromptFormatter("alpaca", lm.tokenizer)
    n_rows = args.steps * args.batch_size
    print(f"load average at start: {os.getloadavg()}")
    print(f"model {cfg.model.name} ({lm.path}, fedtune weights {fedtune_weights}) · LoRA r={cfg.lora.r} on {cfg.lora.target_modules} · "
          f"batch {args.batch_size} (micro {args.micro_batch_size}) · cutoff {args.cutoff_len} · {args.steps} steps x "
          f"{args.reps} blocks per side · data {source} · torch threads {torch.get_num_threads()}")
    results = {"peak_bf16_flops": None, "modes": {}, "trainer_bf16_skipped": bf16_note or None}
    for mode in args.modes.split(","):
        data = tokenize_rows(rows, fmt, args.cutoff_len, train_on_inputs=(mode == "inputs"), too_long="drop")[:n_rows]
        if len(data) < n_rows:
            raise SystemExit(f"only {len(data)} rows fit cutoff_len {args.cutoff_len}; need {n_rows}")
        seed = 1234
        order = fedtune_order(len(data), seed, n_rows)
        ordered = [data[i] for i in order]
        batches = [ordered[i:i + args.batch_size] for i in range(0, n_rows, args.batch_size)]
        hf_rows = [{"input_ids": t.input_ids, "attention_mask": [1] * len(t), "labels": t.labels} for t in ordered]
        sides = {"fedtune": [], **({"fedtune_compiled": []} if args.fedtune_compile == "both" else {}),
                 **({"fedtune_packed": []} if args.fedtune_packing in ("both", "all") else {}),
                 **({"fedtune_flat": []} if args.fedtune_packing in ("all", "off+flat") else {}),
                 "trainer": [], **({"trainer_bf16": []} if with_bf16 else {}),
                 **({"trainer_bf16w": []} if hf_w is not None else {})}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.reps):
                st = fedtune_block(peft_model, list(slot.params.values()), data, cfg.train, lm.tokenizer.pad_token_id,
                                   lm.autocast, seed, dev)
                sides["fedtune"].append(timed(st, batches, shape))
                if "fedtune_compiled" in sides:
                    st = fedtune_block(peft_model, list(slot.params.values()), data, compiled_cfg,
                                       lm.tokenizer.pad_token_id, lm.autocast, seed, dev, "fedtune_compiled")
                    sides["fedtune_compiled"].append(timed(st, batches, shape))
                if "fedtune_packed" in sides:
                    st = fedtune_block(peft_model, list(slot.params.values()), data, packed_cfg,
                                       lm.tokenizer.pad_token_id, lm.autocast, seed, dev, "fedtune_packed")
                    sides["fedtune_packed"].append(timed(st, batches, shape))
                if "fedtune_flat" in sides:
                    st = fedtune_block(peft_model, list(slot.params.values()), data, flat_cfg,
                                       lm.tokenizer.pad_token_id, lm.autocast, seed, dev, "fedtune_flat")
                    sides["fedtune_flat"].append(timed(st, batches, shape))
                st = trainer_block(hf, lm.tokenizer, hf_rows, args.batch_size, args.micro_batch_size, args.steps,
                                   cfg.train.lr, Path(tmp) / f"t{rep}", use_cpu=dev.type == "cpu")
                sides["trainer"].append(timed(st, batches, shape))
                if with_bf16:
                    st = trainer_block(hf, lm.tokenizer, hf_rows, args.batch_size, args.micro_batch_size, args.steps,
                                       cfg.train.lr, Path(tmp) / f"b{rep}", bf16=True, use_cpu=dev.type == "cpu")
                    sides["trainer_bf16"].append(timed(st, batches, shape))
                if hf_w is not None:
                    st = trainer_block(hf_w, lm.tokenizer, hf_rows, args.batch_size, args.micro_batch_size,
                                       args.steps, cfg.train.lr, Path(tmp) / f"w{rep}", bf16=True,
                                       use_cpu=dev.type == "cpu")
                    sides["trainer_bf16w"].append(timed(st, batches, shape))
                f = max(v[-1][1] / v[-1][0] for n, v in sides.items() if n.startswith("fedtune"))
                line = " · ".join(f"{name} {v[-1][1] / v[-1][0]:8.1f} tokens/s" for name, v in sides.items())
                print(f"  [{mode}] block {rep + 1}: {line} · fastest fedtune / strongest Trainer "
                      f"{f / max(v[-1][1] / v[-1][0] for n, v in sides.items() if n.startswith('trainer')):.2f}x",
                      flush=True)
        results["modes"][mode] = {
            side: {"tokens_per_s": statistics.median(x[1] / x[0] for x in v),
                   "model_flops_per_s": statistics.median(x[2] / x[0] for x in v),
                   "blocks": [{"seconds": round(x[0], 3), "tokens": x[1]} for x in v]}
            for side, v in sides.items()}
        r = results["modes"][mode]
        r["ratio_median"] = r["fedtune"]["tokens_per_s"] / r["trainer"]["tokens_per_s"]
        r["ratio_per_block"] = [(f[1] / f[0]) / (t[1] / t[0]) for f, t in zip(sides["fedtune"], sides["trainer"])]
        if with_bf16:
            r["ratio_bf16_median"] = r["fedtune"]["tokens_per_s"] / r["trainer_bf16"]["tokens_per_s"]
            r["ratio_bf16_per_block"] = [(f[1] / f[0]) / (t[1] / t[0])
                                         for f, t in zip(sides["fedtune"], sides["trainer_bf16"])]
        if "fedtune_compiled" in sides:  # the same ratios for the compiled side
            for base, key in (("trainer", "ratio_compiled"), ("trainer_bf16", "ratio_compiled_bf16")):
                if base in sides:
                    r[key + "_median"] = r["fedtune_compiled"]["tokens_per_s"] / r[base]["tokens_per_s"]
                    r[key + "_per_block"] = [(f[1] / f[0]) / (t[1] / t[0])
                                             for f, t in zip(sides["fedtune_compiled"], sides[base])]
        r["ratios"] = {f"{side}/{base}": {"median": r[side]["tokens_per_s"] / r[base]["tokens_per_s"],
                                          "per_block": [(f[1] / f[0]) / (t[1] / t[0])
                                                        for f, t in zip(sides[side], sides[base])]}
                       for side in sides if side.startswith("fedtune") for base in sides
                       if base.startswith("trainer")}
        r["mean_tokens_per_row"] = sum(len(t) for t in ordered) / len(ordered)
        r["labelled_share"] = (sum(sum(1 for x in t.labels[1:] if x != -100) for t in ordered)
                               / sum(len(t) for t in ordered))
    bf16_peak = max(peak0, matmul_peak(torch.bfloat16, device=dev))
    fp32_peak = max(fp32_peak0, matmul_peak(torch.float32, device=dev))
    peak = max(bf16_peak, fp32_peak)  # the machine's faster matmul: the headline MFU's denominator
    results["fedtune_first_step_seconds"] = {k: [round(x, 2) for x in v] for k, v in FIRST_STEP_SECONDS.items()}
    results["fedtune_compile"] = args.fedtune_compile
    for side, v in FIRST_STEP_SECONDS.items():
        print(f"{side}: warm-up step per block (not timed; block 1's holds the one-time compile when compiled): "
              + ", ".join(f"{x:.1f} s" for x in v))
    results.update(peak_bf16_flops=bf16_peak, peak_fp32_flops=fp32_peak, peak_flops=peak,
                   peak_dtype="bfloat16" if bf16_peak >= fp32_peak else "float32")
    print(f"\nmatmul peak (torch.mm, this run): bf16 {bf16_peak / 1e9:.1f} GFLOP/s · fp32 {fp32_peak / 1e9:.1f} GFLOP/s;"
          f" MFU below is against {results['peak_dtype']}")
    first = next(iter(results["modes"].values()))
    cols = [n for n in ("trainer", "trainer_bf16", "trainer_bf16w") if n in first]
    ours = [n for n in ("fedtune", "fedtune_packed", "fedtune_flat", "fedtune_compiled") if n in first]
    label = {"trainer": "Trainer fp32", "trainer_bf16": "Trainer bf16",
             "trainer_bf16w": "Trainer bf16 wts", "fedtune": "fedtune",
             "fedtune_compiled": "fedtune compiled", "fedtune_packed": "fedtune packed",
             "fedtune_flat": "fedtune flat"}
    print(f"{'mode':8} {'side':17} {'tokens/s':>9} {'MFU':>6} " + " ".join(f"{'vs ' + label[c]:>17}" for c in cols)
          + f"  (medians of {args.reps} blocks)")
    for mode, r in results["modes"].items():
        for side in (*ours, *cols):
            r[side]["mfu"] = r[side]["model_flops_per_s"] / peak
            r[side]["mfu_vs_bf16_peak"] = r[side]["model_flops_per_s"] / bf16_peak
        for side in (*ours, *cols):
            vs = " ".join(f"{r['ratios'][f'{side}/{c}']['median']:16.2f}x" if f"{side}/{c}" in r["ratios"]
                          else " " * 17 for c in cols)
            print(f"{mode:8} {label[side]:17} {r[side]['tokens_per_s']:9.1f} {100 * r[side]['mfu']:5.1f}% {vs}")
        print(f"{'':8} ({r['mean_tokens_per_row']:.0f} tokens/row, {100 * r['labelled_share']:.0f}% labelled)")
    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
