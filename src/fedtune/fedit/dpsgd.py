"""Sample-level DP-SGD inside local LoRA training (Abadi et al., CCS 2016), `train.dpsgd_noise_multiplier > 0`.

Every local step draws its batch as a uniform sample without replacement of batch_size of the
client's n rows, independently of the other steps. Opacus's `GradSampleModule` gives the
per-example gradients of the trainable LoRA parameters (each example's loss is the mean over
its own answer tokens); each example's gradient, over all parameters together, is clipped to
L2 norm `train.dpsgd_clip` (C); the clipped gradients are summed, Gaussian noise of std
sigma * C is added (drawn from the operating system's entropy, never from the run seed), and
the sum is divided by the batch size. AdamW then steps on that noisy mean: post-processing.

Accounting (per client, over the whole run): each step is
`SampledWithoutReplacementDpEvent(n, b, GaussianDpEvent(sigma / 2))` under replace-one (one
row replaced moves the sum of clipped gradients by at most 2C), composed over every step the
client took, with dp-accounting's RDP accountant: the same event and accountant as client-level
DP (`fedtune.core.privacy.epsilon`), with rows in place of clients.
"""

from __future__ import annotations

import secrets
import warnings

import torch


def check_supported(ctx) -> None:
    if isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16:
        raise ValueError("train.dpsgd_noise_multiplier > 0 does not run with fp16 autocast (its loss scaling would "
                         "scale the per-example gradients before clipping): set model.autocast = 'bf16' or 'off'")


class PerExampleGrads:
    """Opacus's per-example gradient hooks on `model` for the duration of a local round."""

    def __init__(self, model):
        self.model = model
        self.gsm = None

    def __enter__(self) -> "PerExampleGrads":
        from opacus import GradSampleModule

        # the base model's inputs never need gradients; torch says so once per hooked backward
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="sum", strict=False)
        return self

    def __exit__(self, *exc) -> None:
        self.gsm._close()  # removes the hooks and every grad_sample


def example_mean_sum(token_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The sum over examples of each example's mean token loss, from the per-token losses at
    the labelled positions (row-major, as `causal_lm_loss(..., reduction='none')` returns them):
    what DP-SGD differentiates, so that each example's gradient is that of its own mean loss."""
    keep = labels[:, 1:] != -100
    rows = keep.nonzero()[:, 0]
    counts = keep.sum(dim=1).clamp(min=1).to(token_loss.dtype)
    return (token_loss / counts[rows]).sum()


def noise_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def privatize(params: list[torch.nn.Parameter], batch_size: int, clip: float, sigma: float,
              generator: torch.Generator) -> int:
    """Replace each parameter's gradient with the DP-SGD mean: per-example clip, sum, noise,
    / batch_size. Returns how many examples were clipped."""
    samples = []
    for p in params:
        gs = p.grad_sample
        gs = torch.cat(gs, dim=0) if isinstance(gs, list) else gs  # one entry per backward (micro-batch)
        samples.append(gs.float())
    if any(s.shape[0] != batch_size for s in samples):
        raise RuntimeError(f"DP-SGD: per-example gradients for {samples[0].shape[0]} examples, expected {batch_size}")
    sq = sum(s.flatten(1).pow(2).sum(dim=1) for s in samples)
    norms = sq.sqrt()
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)
    for p, s in zip(params, samples):
        total = torch.einsum("b...,b->...", s, factor)
        noise = torch.normal(0.0, sigma * clip, size=total.shape, generator=generator, device=total.device)
        p.grad = ((total + noise) / batch_size).to(p.dtype)
        p.grad_sample = None
    return int((norms > clip).sum())


class SampleLedger:
    """The server's record of each client's DP-SGD steps and rows over the run (from what each
    client reports), and the largest sample-level epsilon any client's rows have spent."""

    def __init__(self, sigma: float, batch_size: int, delta: float):
        self.sigma, self.batch_size, self.delta = sigma, batch_size, delta
        self.steps: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.eps: dict[str, float] = {}  # each client's epsilon so far (recomputed only when it trains)

    def _account(self, cid: str) -> None:
        from fedtune.core.privacy import epsilon

        n = self.rows[cid]
        self.eps[cid] = epsilon(n, min(self.batch_size, n), self.sigma, self.steps[cid], self.delta)

    def add(self, record: dict) -> dict:
        """Book one round's client records; returns the round's DP-SGD record."""
        for c in record.get("clients", []):
            self.steps[c["id"]] = self.steps.get(c["id"], 0) + int(c.get("steps", 0))
            self.rows[c["id"]] = int(c.get("examples_claimed", c["examples"]))
            self._account(c["id"])
        eps = self.eps
        worst = max(eps, key=eps.get) if eps else None
        return {"epsilon_max": eps[worst] if worst else 0.0, "client_max": worst, "clients": len(eps),
                "steps_max": max(self.steps.values(), default=0), "noise_multiplier": self.sigma, "delta": self.delta}

    def state(self) -> dict:
        return {"dpsgd_steps": dict(self.steps), "dpsgd_rows": dict(self.rows)}

    def load_state(self, meta: dict) -> None:
        self.steps = {k: int(v) for k, v in meta.get("dpsgd_steps", {}).items()}
        self.rows = {k: int(v) for k, v in meta.get("dpsgd_rows", {}).items()}
        self.eps = {}
        for cid in self.steps:
            self._account(cid)
