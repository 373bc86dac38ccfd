"""Held-out evaluation of the global adapter: token loss per category and greedy generation.
Scores on generated answers (ROUGE-L, exact match) live in `fedtune.eval.metrics`."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from fedtune.data.instructions import PromptFormatter, Row, Tokenized
from fedtune.fedit.train import causal_lm_loss, collate


@torch.no_grad()
def heldout_loss(model, data: list[Tokenized], categories: list[str], *, batch_size: int, pad_id: int,
                 device: torch.device, amp) -> dict:
    """Mean next-token loss on the labelled tokens, overall and per category."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i]))  # similar lengths pad less
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask, labels = collate([data[i] for i in idx], pad_id, device)
        with amp():
            tok_loss = causal_lm_loss(model, ids, mask, labels, reduction="none")  # (N,) labelled positions
        row_of = (labels[:, 1:] != -100).nonzero()[:, 0]  # row index of each labelled position
        per_row = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, row_of.cpu(), tok_loss.double().cpu())
        n_row = torch.bincount(row_of.cpu(), minlength=len(idx))
        for j, i in enumerate(idx):
            for key in ("all", categories[i]):
                sums[key] += float(per_row[j])
                counts[key] += int(n_row[j])
    out = {"loss": sums["all"] / max(counts["all"], 1)}
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
    out["loss_by_category"] = {c: sums[c] / max(counts[c], 1) for c in sorted(sums) if c != "all"}
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, formatter: PromptFormatter, rows: list[Row], *, batch_size: int,
                     max_new_tokens: int, device: torch.device, amp, progress=None) -> list[str]:
    """Greedy answers for rows (left-padded batches)."""
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = [""] * len(rows)
    try:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].instruction) + len(rows[i].input))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            prompts = [formatter.prompt(rows[i].instruction, rows[i].input) for i in idx]
            enc = tokenizer(prompts, return_tensors="pt", padding=True,
                            add_special_tokens=formatter.adds_special_tokens).to(device)
            with amp():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(idx):
                answers[i] = tokenizer.decode(new[j], skip_special_tokens=True)
            if progress is not None:
                progress(len(idx))
    finally:
        tokenizer.padding_side = old_side
    return answers
