"""The key of an edit: the FFN key (down-projection input) at the subject's last token.

As in ROME's compute_u, the key is averaged over context templates ("{}" plus short
prefixes sampled from the model), so it matches the subject in many contexts. The average may
weight the unprefixed prompt "{}" apart from the prefixes (`context_weights`): a prompt that
starts with its subject puts the subject at position 0 of a tokenizer without BOS (SmolLM2,
GPT-2), where the attention sink changes every later key, and a plain average over 1 + n
contexts leaves that key far from the stored one (docs/adr/0009-unprefixed-key-weight.md).
"""

from __future__ import annotations

import torch

from editing.adapters import ArchAdapter
from editing.hooks import capture_input, run_until
from editing.prompts import encode, pad_batch


@torch.no_grad()
def token_keys(model, adapter: ArchAdapter, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """FFN keys of every token at `layer`, stopping the forward there.

    Args: input_ids, attention_mask: [n, T]. Returns: [n, T, d_key].
    """
    with capture_input(adapter.down_proj(layer), stop=True) as seen:
        run_until(model, input_ids=input_ids, attention_mask=attention_mask)
    return seen[0]


def context_weights(templates: list[str], unprefixed_weight: float | None) -> torch.Tensor | None:
    """Weights [C] of the templates in a key's average: `unprefixed_weight` for "{}" and the rest
    shared equally by the prefixed templates; None (a plain mean) when the weight is None or there
    is no prefixed template.
    """
    n_prefixed = sum(t != "{}" for t in templates)
    if unprefixed_weight is None or n_prefixed == 0 or n_prefixed == len(templates):
        return None
    if not 0.0 <= unprefixed_weight <= 1.0:
        raise ValueError(f"unprefixed_weight must be in [0, 1], got {unprefixed_weight}")
    return torch.tensor([unprefixed_weight if t == "{}" else (1.0 - unprefixed_weight) / n_prefixed for t in templates])


@torch.no_grad()
def compute_keys(
    model, tok, adapter: ArchAdapter, layer: int, requests, templates: list[str], batch_size: int = 64,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Context-averaged keys of the requests' subjects.

    Args:
        requests: n `EditRequest`s (subject must occur in prompt).
        templates: C context templates, each containing "{}" (see `sample_context_templates`).
        weights: [C] weights of the templates, summing to 1 (`context_weights`); None: the mean.
    Returns:
        keys [n, d_key] float32, on the model's device.
    """
    device = next(model.parameters()).device
    encoded = [encode(tok, r.prompt, r.subject, context=t) for r in requests for t in templates]
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i: i + batch_size]
        ids, mask = pad_batch([e.ids for e in chunk], tok.pad_token_id, device)
        k = token_keys(model, adapter, layer, ids, mask)  # [b, T, d_key]
        pos = torch.tensor([e.subject_last for e in chunk], device=device)
        out.append(k[torch.arange(len(chunk), device=device), pos])
    keys = torch.cat(out).view(len(requests), len(templates), -1).float()
    if weights is None:
        return keys.mean(dim=1)
    return torch.einsum("ncd,c->nd", keys, weights.to(keys))
