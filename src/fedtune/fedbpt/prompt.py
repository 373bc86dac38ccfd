"""Prompt parametrization: a point z in R^d maps to prompt embeddings A z.

A is a fixed random matrix, (n_prompt_tokens * hidden) x d, drawn from N(0, std^2) with
BBT's rule std = alpha * std_hat / (sqrt(d) * sigma), std_hat being the standard deviation
of the model's word embeddings: when z ~ N(0, sigma^2 I), every entry of A z has the scale
of a word embedding. Every party rebuilds A from the seed; it never crosses the wire.

A saved global prompt is a folder with `prompt.safetensors` (z and the prompt embeddings)
and `prompt.json` (seed, projection settings, model and task), enough to rebuild A, check
it, and classify new text.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fedtune.core import atomic
from fedtune.errors import FedtuneError

PROJECTION_STREAM = 0xA7  # seed stream of the projection, apart from every other use of the run seed


def projection_std(embedding_std: float, intrinsic_dim: int, alpha: float = 1.0, sigma: float = 1.0) -> float:
    return alpha * embedding_std / (math.sqrt(intrinsic_dim) * sigma)


@dataclass(frozen=True)
class ProjectionSpec:
    seed: int
    intrinsic_dim: int
    n_prompt_tokens: int
    hidden_size: int
    embedding_std: float
    alpha: float = 1.0
    sigma: float = 1.0

    @property
    def std(self) -> float:
        return projection_std(self.embedding_std, self.intrinsic_dim, self.alpha, self.sigma)

    def to_json(self) -> dict:
        return {**asdict(self), "std": self.std}

    @classmethod
    def from_json(cls, d: dict) -> "ProjectionSpec":
        return cls(int(d["seed"]), int(d["intrinsic_dim"]), int(d["n_prompt_tokens"]), int(d["hidden_size"]),
                   float(d["embedding_std"]), float(d.get("alpha", 1.0)), float(d.get("sigma", 1.0)))


class Projection:
    """z (d,) or Z (P, d) -> prompt embeddings (P, n_prompt_tokens, hidden)."""

    def __init__(self, spec: ProjectionSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, PROJECTION_STREAM])
        rows = spec.n_prompt_tokens * spec.hidden_size
        self.A = rng.standard_normal((rows, spec.intrinsic_dim), dtype=np.float32)
        self.A *= np.float32(spec.std)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float32)
        if z.ndim == 1:
            z = z[None]
        if z.shape[1] != self.spec.intrinsic_dim:
            raise ValueError(f"z has dimension {z.shape[1]}, the projection expects {self.spec.intrinsic_dim}")
        return (z @ self.A.T).reshape(len(z), self.spec.n_prompt_tokens, self.spec.hidden_size)


# ----------------------------------------------------------------------------- saving and loading


def save_prompt(folder: Path, z: np.ndarray, projection, meta: dict) -> Path:
    """Write z, its prompt embeddings (and a deep prompt's per-layer offsets, `deep_embeds`) and
    everything needed to reuse them. `projection`: a Projection, or a DeepProjection for z (L, d)."""
    z = np.asarray(z, dtype=np.float32)
    doc = {"format": "fedtune-fedbpt-prompt/1", "projection": projection.spec.to_json(), **meta}
    out = projection(z)
    arrays = {"z": z, "prompt_embeds": out[0][0], "deep_embeds": out[1][0]} if isinstance(out, tuple) \
        else {"z": z, "prompt_embeds": out[0]}

    def fill(tmp: Path) -> None:  # a new folder swapped in whole: never half written
        save_file(arrays, str(tmp / "prompt.safetensors"))
        (tmp / "prompt.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")

    return atomic.publish_dir(folder, fill)


def load_prompt(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(z, prompt embeddings, metadata) of a saved prompt; every inconsistency is an error."""
    folder = Path(folder)
    js, st = folder / "prompt.json", folder / "prompt.safetensors"
    if not js.is_file() or not st.is_file():
        raise FedtuneError(f"{folder}: not a saved FedBPT prompt (expected prompt.json and prompt.safetensors)")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
        arrays = load_file(str(st))
    except Exception as e:  # JSON and safetensors errors: a damaged folder
        raise FedtuneError(f"{folder}: cannot read the saved prompt: {e}") from None
    deep = meta.get("deep")
    want = {"z", "prompt_embeds"} | ({"deep_embeds"} if deep else set())
    if set(arrays) != want:
        raise FedtuneError(f"{st}: expected arrays {sorted(want)}, found {sorted(arrays)}")
    spec = ProjectionSpec.from_json(meta["projection"])
    z, emb = arrays["z"], arrays["prompt_embeds"]
    z_shape = (int(deep["layers"]), spec.intrinsic_dim) if deep else (spec.intrinsic_dim,)
    if z.shape != z_shape or emb.shape != (spec.n_prompt_tokens, spec.hidden_size) or \
            (deep and arrays["deep_embeds"].shape != (z_shape[0] - 1, spec.n_prompt_tokens, spec.hidden_size)):
        raise FedtuneError(f"{st}: shapes z {z.shape}, prompt_embeds {emb.shape} do not match prompt.json")
    if deep:
        meta = {**meta, "deep_embeds": arrays["deep_embeds"]}
    return z, emb, meta
