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

Measured on a 2-core CPU with Dolly rows (docs/benchmarks.md), packing was slower than the
default length grouping: grouping already leaves little padding, and a packed row as wide as
the longest row of its micro-batch pays attention (eager or SDPA with a mask: every score of
the block-diagonal square is computed) over the whole width, quadratic in it. So it is off by
default (`train.packing = "off"`); it is there for rows whose lengths grouping cannot match
and for kernels that skip the masked blocks (flash attention's variable-length path on GPU,
which transformers uses for packed position ids).

Not every model honours packed position ids (a decoder with its own mask code, an old
remote-code model); feeding such a model packed rows would let each row see the rows
before it and train on wrong gradients without any error. So before the first packed
forward `check` runs a 10-token probe: two short sequences packed into one row against each
one alone, under every attention implementation the round may use; a model that fails it
is refused with an error that says why.

DP-SGD needs one example per row (its per-example gradients): the config refuses
`train.packing = "on"` with DP-SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.data.instructions import Tokenized
from fedtune.fedit.lora import base_lm

SETTINGS = ("off", "on")
_PROBE = "_fedtune_packing_probe"


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


def probe(model, device: torch.device) -> str | None:
    """None if the model's decoder keeps packed rows apart; otherwise why not. Two sequences
    (6 and 4 tokens) packed into one row must give the hidden states each gives alone."""
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
            packed = decoder(input_ids=torch.cat([a, b])[None], attention_mask=None, position_ids=pos[None],
                             use_cache=False).last_hidden_state[0]
    except (TypeError, ValueError, RuntimeError) as e:
        return f"its decoder did not run packed rows ({type(e).__name__}: {e})"
    finally:
        lm.train(was_training)
    second = slice(len(a), None)  # the second sequence: what leaks from the first shows here
    err = float((packed[second].float() - alone[second].float()).norm() / alone[second].float().norm().clamp_min(1e-12))
    if err > 2e-2:
        return (f"{type(lm).__name__} does not keep packed rows apart (the second of two packed sequences differs "
                f"from the same sequence alone by {err:.1%}): its attention mask ignores position_ids")
    return None


def check(model, setting: str, device: torch.device, attention, *, dpsgd: bool = False) -> bool:
    """Whether this local round packs: `setting` is train.packing, `attention` the round's
    TrainingAttention (the probe runs under every attention implementation the round may use:
    it is their mask code that decides). The verdicts are kept on the model."""
    if setting not in SETTINGS:
        raise ValueError(f"train.packing = {setting!r}: expected one of {', '.join(SETTINGS)}")
    if setting == "off":
        return False
    if dpsgd:
        raise ValueError("train.packing = 'on' cannot be combined with DP-SGD (per-example gradients need one "
                         "example per row); set train.packing = 'off'")
    verdicts = base_lm(model).__dict__.setdefault(_PROBE, {})
    for impl in attention.possible():
        if impl not in verdicts:
            attention.force(impl)
            verdicts[impl] = probe(model, device)
        if verdicts[impl] is not None:
            raise ValueError(f"train.packing = 'on': with {impl} attention, {verdicts[impl]}; set train.packing = 'off'")
    return True
