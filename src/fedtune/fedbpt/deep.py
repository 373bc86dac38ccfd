"""Deep prompts (BBTv2, Sun et al. 2022) for the black box: besides the input-layer prompt, an
offset added to the hidden states at the prompt positions entering every further layer.

Layer 0 is the ordinary prompt (A_0 z_0 on the prompt embeddings); layer l >= 1 adds A_l z_l to
the hidden states at the prompt slots before layer l runs. Each A_l is its own fixed random
matrix, N(0, std_l^2) with BBT's rule std_l = alpha * s_l / (sqrt(d) * sigma), s_l being the
std of that layer's input hidden states, which the black box publishes (measured once on a
fixed neutral text, never on anyone's data), as it publishes the word-embedding std. Still no
gradients, weights or hidden states leave the box: it accepts per-layer additions, nothing else.
"""

from __future__ import annotations

import numpy as np

from fedtune.errors import ModelError
from fedtune.fedbpt.prompt import PROJECTION_STREAM, Projection, ProjectionSpec, projection_std

NEUTRAL_TEXT = "The weather was mild and the streets were quiet on an ordinary afternoon."


def transformer_layers(model):
    """The model's stack of transformer blocks (Llama-style, BERT-style or GPT-2-style)."""
    base = model.base_model
    for path in ("layers", "encoder.layer", "h", "decoder.layers"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "__len__") and len(obj) > 0:
            return obj
    raise ModelError(f"fedbpt.deep: cannot find the transformer layers of {type(model).__name__} "
                     f"(looked for base_model.layers, .encoder.layer, .h, .decoder.layers)")


class DeepHooks:
    """Pre-hooks on layers 1..L-1 that add the current forward's offsets at the prompt positions.
    `now` is (offsets (rows, L-1, n, H), positions (rows, n)) during a deep forward, else None;
    `live[l - 1]` says whether layer l's offsets are nonzero in the current call (those that are
    all zero, e.g. the layers past `fedbpt.deep_layers`, are skipped)."""

    def __init__(self, model):
        self.layers = transformer_layers(model)
        self.now = None
        self.live: list[bool] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)

    def _hook(self, i: int):
        import torch

        def hook(module, args, kwargs):
            if self.now is None or not self.live[i - 1]:  # a zero offset changes nothing: skip the copy
                return None
            add, pos = self.now
            h = args[0] if args else kwargs["hidden_states"]
            h = h.clone()
            rows = torch.arange(h.shape[0], device=h.device)[:, None]
            h[rows, pos] = h[rows, pos] + add[:, i - 1].to(h.dtype)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        return hook


def layer_input_stds(model, tokenizer, device, autocast) -> list[float]:
    """Std of the hidden states entering each layer 1..L-1, on a fixed neutral sentence."""
    import torch

    ids = tokenizer(NEUTRAL_TEXT, return_tensors="pt")["input_ids"].to(device)
    with torch.inference_mode(), autocast():
        out = model.base_model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states  # embeddings, then each layer's output
    n = len(transformer_layers(model))
    return [float(hs[i].float().std()) for i in range(1, n)]


class DeepProjection:
    """Z (P, L, d) -> (input prompts (P, n, H), offsets (P, L-1, n, H)); A_0 is the ordinary
    projection, A_l (l >= 1) is drawn from the seed's stream for layer l."""

    def __init__(self, spec: ProjectionSpec, layer_stds: list[float], first: Projection | None = None):
        self.spec, self.layer_stds = spec, list(layer_stds)
        self.first = first or Projection(spec)  # the input layer's A_0: the caller's, when it has one
        self._A: dict[int, np.ndarray] = {}  # layer -> A_l, drawn when a z row of that layer is first nonzero

    def matrix(self, layer: int) -> np.ndarray:
        """A_l (l >= 1), (n * H, d), from the seed's stream for layer l with layer l's std rule."""
        if layer not in self._A:
            spec = self.spec
            rng = np.random.default_rng([spec.seed, PROJECTION_STREAM, layer])
            a = rng.standard_normal((spec.n_prompt_tokens * spec.hidden_size, spec.intrinsic_dim), dtype=np.float32)
            a *= np.float32(projection_std(self.layer_stds[layer - 1], spec.intrinsic_dim, spec.alpha, spec.sigma))
            self._A[layer] = a
        return self._A[layer]

    @property
    def layers(self) -> int:
        return 1 + len(self.layer_stds)

    def __call__(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = np.asarray(z, dtype=np.float32)
        if z.ndim == 2:
            z = z[None]
        if z.shape[1:] != (self.layers, self.spec.intrinsic_dim):
            raise ValueError(f"deep z has shape {z.shape[1:]}, expected ({self.layers}, {self.spec.intrinsic_dim})")
        n, h = self.spec.n_prompt_tokens, self.spec.hidden_size
        first = self.first(z[:, 0])
        deep = np.zeros((len(z), self.layers - 1, n, h), dtype=np.float32)
        for layer in range(1, self.layers):
            if z[:, layer].any():  # A_l 0 = 0: layers left at zero (past fedbpt.deep_layers) cost nothing
                deep[:, layer - 1] = (z[:, layer] @ self.matrix(layer).T).reshape(len(z), n, h)
        return first, deep
