"""vLLM general plugin (`vllm.general_plugins` entry point `kvedit = serving.vllm_plugin:register`).

vLLM calls `register()` in every process it starts (front-end, engine core, workers, the
model-inspection subprocess), so it only registers class *names*: the routed model module
is imported lazily, by the process that builds the model.

A routed variant is selected with
`--hf-overrides '{"architectures": ["RoutedLlamaForCausalLM"]}'` (see `routed_architecture`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# HF architecture -> routed vLLM architecture registered by this plugin.
ROUTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "RoutedLlamaForCausalLM",  # Llama, SmolLM, and most Llama-shaped checkpoints
    "MistralForCausalLM": "RoutedMistralForCausalLM",
    "Qwen2ForCausalLM": "RoutedQwen2ForCausalLM",
    "Qwen3ForCausalLM": "RoutedQwen3ForCausalLM",
}
MODELS_MODULE = "serving.vllm_models"
WORKER_EXTENSION = "serving.vllm_worker.KveditWorkerExtension"
MIDDLEWARE = "serving.vllm_middleware.KveditMiddleware"
# Multi-memory replicas (KVEDIT_MEMORIES; what `kvedit serve` starts): supersets of the two above.
MULTI_WORKER_EXTENSION = "serving.vllm_multi.KveditMultiWorkerExtension"
MULTI_MIDDLEWARE = "serving.vllm_multi_middleware.KveditMultiMiddleware"


def routed_architecture(model_dir: str | Path) -> str:
    """The routed architecture for a model folder (from its config.json `architectures`)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ROUTED_ARCHITECTURES:
            return ROUTED_ARCHITECTURES[arch]
    from serving.errors import UnsupportedArchitectureError  # lazily: register() must stay light

    raise UnsupportedArchitectureError(
        f"{model_dir}: architectures {archs} have no routed vLLM variant; supported: "
        f"{', '.join(sorted(ROUTED_ARCHITECTURES))} (or serve it with --backend hf)"
    )


def hf_overrides(model_dir: str | Path) -> dict:
    """The `--hf-overrides` value that selects the routed variant of a model folder."""
    return {"architectures": [routed_architecture(model_dir)]}


def _share_vllm_log_handlers() -> None:
    """Send `serving.*` INFO logs through vLLM's handlers (vLLM configures only its own logger)."""
    ours = logging.getLogger("serving")
    if ours.handlers:
        return
    handlers = logging.getLogger("vllm").handlers
    if handlers:
        for h in handlers:
            ours.addHandler(h)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def register() -> None:
    """Register the routed architectures with vLLM's model registry (idempotent, cheap)."""
    from vllm import ModelRegistry

    _share_vllm_log_handlers()
    known = set(ModelRegistry.get_supported_archs())
    for arch in ROUTED_ARCHITECTURES.values():
        if arch not in known:
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")
