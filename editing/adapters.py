"""Architecture adapters: where the edit layer's FFN key and output live, per model family.

The FFN *key* is the input of the down-projection ([tokens, d_key]); the FFN *output* is
the down-projection's output ([tokens, d_model]), which every supported family adds
straight into the residual stream. A registry maps HF `model_type`s to adapters, so a new
family is one small class and a `@register_adapter(...)` line.
"""

from __future__ import annotations

import torch
from torch import nn

_ADAPTERS: dict[str, type["ArchAdapter"]] = {}


class UnsupportedModelError(ValueError):
    """A model family kvedit has no adapter for."""


def register_adapter(*model_types: str):
    """Class decorator: register an adapter for HF `config.model_type` values."""

    def deco(cls):
        for mt in model_types:
            _ADAPTERS[mt] = cls
        return cls

    return deco


# Families whose FFN output does not go straight into the residual stream, so a residual added to the
# down-projection's output is not the one the value optimiser fits there (refused rather than edited wrongly).
_REFUSED = {
    "gemma2": "its FFN output passes a post-feedforward norm before the residual add",
    "gemma3": "its FFN output passes a post-feedforward norm before the residual add",
    "gemma3_text": "its FFN output passes a post-feedforward norm before the residual add",
    "olmo2": "its FFN output passes a post-feedforward norm before the residual add",
    "granite": "its FFN output is scaled by residual_multiplier before the residual add",
}


def get_adapter(model: nn.Module) -> "ArchAdapter":
    """The adapter for a loaded HF causal LM (by `config.model_type`)."""
    mt = getattr(model.config, "model_type", None)
    if mt in _REFUSED:
        raise UnsupportedModelError(f"model_type {mt!r} is not supported: {_REFUSED[mt]}")
    if getattr(model.config, "final_logit_softcapping", None):
        raise UnsupportedModelError(f"model_type {mt!r} is not supported: its logits are soft-capped "
                                    "(final_logit_softcapping), which the value optimiser's LM head does not apply")
    if mt not in _ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported; supported: {', '.join(sorted(_ADAPTERS))}"
        )
    return _ADAPTERS[mt](model)


class ArchAdapter:
    """Module paths of one family. Subclasses set the attribute paths below."""

    layers_path: str  # ModuleList of decoder blocks
    mlp_attr: str  # FFN inside a block
    down_attr: str  # down-projection inside the FFN: key in, FFN output out
    final_norm_path: str
    down_is_conv1d: bool = False  # GPT-2's Conv1D stores the weight as [d_in, d_out]

    def __init__(self, model: nn.Module):
        self.model = model

    def _get(self, path: str) -> nn.Module:
        obj = self.model
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    @property
    def layers(self) -> nn.ModuleList:
        return self._get(self.layers_path)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer!r} is out of range: the model has layers 0..{self.n_layers - 1}")
        return layer

    def mlp(self, layer: int) -> nn.Module:
        return getattr(self.layers[self.check_layer(layer)], self.mlp_attr)

    def down_proj(self, layer: int) -> nn.Module:
        return getattr(self.mlp(layer), self.down_attr)

    def set_down_proj(self, layer: int, module: nn.Module) -> None:
        setattr(self.mlp(layer), self.down_attr, module)

    def down_weight(self, layer: int) -> torch.Tensor:
        """The down-projection as a matrix W [d_model, d_key] (so FFN output = W k + b)."""
        down = self.down_proj(layer)
        down = getattr(down, "base", down)  # unwrap a RoutedDownProj
        w = down.weight
        return w.T if self.down_is_conv1d else w

    @property
    def d_key(self) -> int:
        return self.down_weight(0).shape[1]

    @property
    def d_model(self) -> int:
        return self.down_weight(0).shape[0]

    @property
    def final_norm(self) -> nn.Module:
        return self._get(self.final_norm_path)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()


@register_adapter("llama", "qwen2", "mistral", "smollm3", "qwen3", "gemma", "phi3", "olmo", "stablelm")
class LlamaAdapter(ArchAdapter):
    layers_path = "model.layers"
    mlp_attr = "mlp"
    down_attr = "down_proj"
    final_norm_path = "model.norm"


@register_adapter("gpt2")
class GPT2Adapter(ArchAdapter):
    layers_path = "transformer.h"
    mlp_attr = "mlp"
    down_attr = "c_proj"
    final_norm_path = "transformer.ln_f"
    down_is_conv1d = True


@register_adapter("gptj")
class GPTJAdapter(ArchAdapter):
    layers_path = "transformer.h"
    mlp_attr = "mlp"
    down_attr = "fc_out"
    final_norm_path = "transformer.ln_f"


@register_adapter("gpt_neox")
class GPTNeoXAdapter(ArchAdapter):
    layers_path = "gpt_neox.layers"
    mlp_attr = "mlp"
    down_attr = "dense_4h_to_h"
    final_norm_path = "gpt_neox.final_layer_norm"


@register_adapter("phi")
class PhiAdapter(ArchAdapter):
    """Phi-1/1.5/2: attention and FFN in parallel, both added to the block's input."""

    layers_path = "model.layers"
    mlp_attr = "mlp"
    down_attr = "fc2"
    final_norm_path = "model.final_layernorm"


@register_adapter("starcoder2")
class Starcoder2Adapter(ArchAdapter):
    layers_path = "model.layers"
    mlp_attr = "mlp"
    down_attr = "c_proj"
    final_norm_path = "model.norm"
