"""MEMIT (Meng et al. 2023): one batch of edits spread over a range of layers.

v* is optimised at the last layer of the range (`editing.values`, as the memory's residual r):
the target of the residual stream there is z = h + r, h its value at the subject's last token.
Then, from the lowest layer up, with K [n, d_key] the (context-averaged) keys at layer l on the
model as updated so far and h the current value at the last layer:

    R = (z - h) / (layers left, this one included)
    ΔW_l = R^T K (λ C0_l + K^T K)^-1            (λ = mom2_update_weight)

`layer_update` is the one step subclasses change (`alphaedit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editing.baselines.base import WeightEditor, register_baseline, subject_outputs
from editing.values import optimise_residuals


@dataclass
class MemitSettings:
    layers: list[int] | None = None  # None: the edit layer and two layers either side
    mom2_update_weight: float = 1500.0
    stats_tokens: int | None = None  # C0 sample size (tokens); None: the Editor's


def layer_range(ed, layers: list[int] | None) -> list[int]:
    """The configured layers (sorted), or the edit layer and up to two layers either side."""
    if layers:
        return sorted(int(x) for x in layers)
    return list(range(max(0, ed.layer - 2), min(ed.adapter.n_layers, ed.layer + 3)))


def memit_update(residual: torch.Tensor, keys: torch.Tensor, c0: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔW = R^T K (λ C0 + K^T K)^-1, float64.

    residual R [n, d_model], keys K [n, d_key], c0 [d_key, d_key]. Returns [d_model, d_key].
    """
    k, r = keys.double(), residual.double()
    a = lam * c0.double() + k.T @ k
    return r.T @ torch.linalg.solve(a, k.T).T


@register_baseline("memit")
class Memit(WeightEditor):
    settings_class = MemitSettings

    @property
    def layers(self) -> list[int]:
        return layer_range(self.ed, self.hp.layers)

    def _edit(self, requests, edit_ids) -> None:
        ed, layers = self.ed, self.layers
        top = layers[-1]
        res = optimise_residuals(ed.model, ed.tok, ed.adapter, top, requests, ed.templates, ed.config.values)
        z = subject_outputs(ed.model, ed.tok, ed.adapter, top, requests) + res.residuals  # [n, d_model]
        for i, layer in enumerate(layers):
            keys = ed.keys(requests, layer)  # [n, d_key]
            h = subject_outputs(ed.model, ed.tok, ed.adapter, top, requests)
            resid = (z - h) / (len(layers) - i)
            self.add_delta(layer, self.layer_update(layer, keys, resid))
        self._after_batch(requests)

    def layer_update(self, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """ΔW of `layer` [d_model, d_key] for keys [n, d_key] and residuals [n, d_model]."""
        return memit_update(residual, keys, self.c0[layer], self.hp.mom2_update_weight)

    def _after_batch(self, requests) -> None:
        """Hook after a batch's update is written: MEMIT keeps no state across batches; AlphaEdit
        accumulates the batch's keys into its null-space projection here."""
