"""Packing (`train.packing`): several rows of a micro-batch in one sequence, each attending
only to itself.

Without packing a micro-batch of rows of different lengths is padded to its longest row
(length grouping leaves about 25% padding on Dolly). With packing the rows of a micro-batch
are laid end to end into as few packed rows as fit the micro-batch's width (first-fit
decreasing), so that the forward pass carries almost no padding. Each row keeps its own
position ids (0, 1, 2, ... from its first token) and attends only to its own tokens: the
attention mask is block-diagonal. Hugging Face's decoders build that mask themselves from
`position_ids` when no 2D attention mask is given (transformers' `masking_utils`: a position
that does not follow the one before starts a new sequence), for eager attention, SDPA and
flash attention alike. The result is the same as the unpacked forward up to float rounding,
so the gradient does not change; only the shapes do.

Measured on a 2-core CPU with Dolly rows (docs/benchmarks.md), "on" was slower than length
grouping: grouping already leaves little padding, and a packed row as wide as the longest row
of its micro-batch pays attention (eager or SDPA with a mask: every score of the
block-diagonal square is computed) over the whole width, quadratic in it. It is there for
kernels that skip the masked blocks (flash attention's variable-length path on GPU, which
transformers uses for packed position ids).

Not every model honours packed position ids (a decoder with its own mask code, an old
remote-code model); feeding such a model packed rows would let each row see the rows
before it and train on wrong gradients without any error. So before the first packed
forward `check` runs a 10-token probe: two short sequences packed into one row against each
one alone, under every attention implementation the round may use; a model that fails it
is refused with an error that says why.

`train.packing = "flat"` goes further: the whole micro-batch is one sequence and attention runs
row by row (fedtune/fedit/flat_attention.py), so neither the linear layers nor the attention
see padding or another row's tokens; the same probe checks it before the first flat forward.
On the CPU it beat length grouping (1.19-1.20x the tokens/s, docs/benchmarks.md), so the default,
"auto", is flat on CPU; on GPU (not measured) it is off.

DP-SGD needs one example per row (its per-example gradients): the config refuses packing with
DP-SGD.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fedtune.data.instructions import Tokenized
from fedtune.fedit import flat_attention
from fedtune.fedit.lora import base_lm

SETTINGS = ("auto", "off", "on", "flat")
_PROBE = "_fedtune_packing_probe"
_AUTO_NOTED = "_fedtune_packing_auto_noted"
log = logging.getLogger("fedtune.train")


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most `capacity`, longest rows first, each
    into the first bin with room (a row longer than `capacity` gets a bin of its own)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclass
class Packed:
    ids: torch.Tensor  # (bins, width)
    position_ids: torch.Tensor  # (bins, width): 0.. for every row, and for the padding after the last
    labels: torch.Tensor  # (bins, width): -100 at each row's first token (nothing before it in that row) and padding
    tokens: int  # real (non-pad) tokens
    decoder_kwargs: dict | None = None  # flat packing: the row boundaries (fedtune/fedit/flat_attention.py)


def collate_packed(micro: list[Tokenized], pad_id: int, device: torch.device, width_of) -> Packed:
    """Pack a micro-batch into bins as wide as its longest row (rounded up by `width_of`, the
    unpacked path's padded width): never more tokens than the unpacked micro-batch, usually
    far fewer. Position t predicts token t+1, so the label at each row's first token is
    masked: the last token of one row must not learn to predict the next row."""
    lengths = [len(t) for t in micro]
    bins = first_fit_decreasing(lengths, width_of(max(lengths)))
    width = width_of(max(sum(lengths[i] for i in b) for b in bins))
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), -100, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    for r, b in enumerate(bins):
        at = 0
        for i in sorted(b):
            t, n = micro[i], lengths[i]
            ids[r, at:at + n] = torch.tensor(t.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(t.labels[1:])
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)  # the padding: a block of its own, with no labels
    return Packed(ids.to(device), pos.to(device), labels.to(device), sum(lengths))


def collate_flat(micro: list[Tokenized], pad_id: int, device: torch.device, width_of) -> Packed:
    """The rows of a micro-batch end to end in one sequence as wide as their total length,
    rounded up by `width_of`; the padding tail is a segment of its own, with no labels. Labels
    and position ids as in `collate_packed`."""
    lengths = [len(t) for t in micro]
    total = sum(lengths)
    width = width_of(total)
    ids = torch.full((1, width), pad_id, dtype=torch.long)
    labels = torch.full((1, width), -100, dtype=torch.long)
    pos = torch.zeros((1, width), dtype=torch.long)
    bounds, at = [0], 0
    for t, n in zip(micro, lengths):
        ids[0, at:at + n] = torch.tensor(t.input_ids)
        labels[0, at + 1:at + n] = torch.tensor(t.labels[1:])
        pos[0, at:at + n] = torch.arange(n)
        at += n
        bounds.append(at)
    if width > total:
        pos[0, total:] = torch.arange(width - total)
        bounds.append(width)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return Packed(ids.to(device), pos.to(device), labels.to(device), total,
                  flat_attention.segment_kwargs(cu, longest))


def probe(model, device: torch.device, flat=None) -> str | None:
    """None if the model's decoder keeps packed rows apart; otherwise why not. Two sequences
    (6 and 4 tokens) packed into one row must give the hidden states each gives alone. With
    `flat` (a callable that switches the model to the flat attention) each alone runs under the
    model's current attention, then the packed pair flat."""
    lm = base_lm(model)
    decoder = lm.get_decoder()
    vocab = int(getattr(lm.config, "vocab_size", 0) or 0)
    if vocab < 16:
        return f"vocabulary of {vocab} tokens is too small for the packing probe"
    a = torch.arange(3, 9, device=device) % vocab
    b = torch.arange(vocab // 2, vocab // 2 + 4, device=device) % vocab
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            alone = torch.cat([decoder(input_ids=x[None], use_cache=False).last_hidden_state[0] for x in (a, b)])
            pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))]).to(device)
            kw = {}
            if flat:
                flat()
                kw = flat_attention.segment_kwargs(torch.tensor([0, len(a), len(a) + len(b)], dtype=torch.int32,
                                                                device=device), len(a))
            packed = decoder(input_ids=torch.cat([a, b])[None], attention_mask=None, position_ids=pos[None],
                             use_cache=False, **kw).last_hidden_state[0]
    except (TypeError, ValueError, RuntimeError) as e:
        return f"its decoder did not run packed rows ({type(e).__name__}: {e})"
    finally:
        lm.train(was_training)
    second = slice(len(a), None)  # the second sequence: what leaks from the first shows here
    err = float((packed[second].float() - alone[second].float()).norm() / alone[second].float().norm().clamp_min(1e-12))
    # A leak moves the second row's hidden states by tens of percent (72% on SmolLM2-135M); rounding
    # alone moves them by up to 2.4% with bf16 weights over 30 layers, about 1e-6 in float32.
    if err > (2e-2 if alone.dtype == torch.float32 else 0.1):
        return (f"{type(lm).__name__} does not keep packed rows apart (the second of two packed sequences differs "
                f"from the same sequence alone by {err:.1%}): its attention mask ignores position_ids")
    return None


def check(model, setting: str, device: torch.device, attention, *, dpsgd: bool = False,
          compiled: bool = False) -> str:
    """How this local round packs ("off", "on" or "flat"): `setting` is train.packing ("auto":
    "flat" on CPU unless DP-SGD, a compiled layer or an explicit train.attention is on, or the
    model fails the flat probe, which is logged once per model; "off" on GPU, where flat packing
    is not measured),
    `attention` the round's TrainingAttention (with "on" the probe runs under every attention
    implementation the round may use: it is their mask code that decides; with "flat" under the
    flat attention, which the round then uses throughout). The verdicts are kept on the model."""
    if setting not in SETTINGS:
        raise ValueError(f"train.packing = {setting!r}: expected one of {', '.join(SETTINGS)}")
    if setting == "auto":  # flat where it was measured faster (CPU) and can run; else unpacked, saying why
        if device.type != "cpu" or dpsgd or compiled or attention.setting != "auto":
            return "off"  # an explicit train.attention asks for that kernel, which flat packing replaces
        try:
            return check(model, "flat", device, attention)
        except ValueError as e:
            if not base_lm(model).__dict__.get(_AUTO_NOTED):
                base_lm(model).__dict__[_AUTO_NOTED] = True
                log.warning("train.packing = 'auto' trains unpacked: %s", str(e).replace("; set train.packing = 'off'", ""))
            return "off"
    if setting == "off":
        return setting
    if dpsgd:
        raise ValueError(f"train.packing = {setting!r} cannot be combined with DP-SGD (per-example gradients need "
                         "one example per row); set train.packing = 'off'")
    if setting == "flat" and compiled:
        raise ValueError("train.packing = 'flat' cannot be combined with train.compile = 'layers' (the flat attention "
                         "loops over each micro-batch's rows); set one of them to 'off'")
    verdicts = base_lm(model).__dict__.setdefault(_PROBE, {})
    impls = [flat_attention.register()] if setting == "flat" else attention.possible()
    for impl in impls:
        if impl not in verdicts:
            if setting == "flat":  # the reference: each row alone under the model's own attention
                attention.force(attention.own)
                verdicts[impl] = probe(model, device, flat=lambda: attention.force(impl))
            else:
                attention.force(impl)
                verdicts[impl] = probe(model, device)
        if verdicts[impl] is not None:
            raise ValueError(f"train.packing = {setting!r}: with {impl} attention, {verdicts[impl]}; "
                             "set train.packing = 'off'")
    if setting == "flat":
        attention.force(impls[0])
    return setting
