"""ROME (Meng et al. 2022): a rank-one update of one layer's down-projection.

For an edit with key k (`editing.keys`, context-averaged) and target output v* = W k + r
(r the residual of `editing.values`, optimised on the model as it is when the batch starts):

    ΔW = (v* - W k) (C0^-1 k)^T / (k^T C0^-1 k)

so the edited layer maps k to v* exactly while moving other keys as little as possible in
C0's metric. A batch is applied as successive rank-one updates, each with W the current
weight, so a later update in the batch does not undo an earlier one's target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editing.baselines.base import WeightEditor, register_baseline
from editing.values import optimise_residuals


@dataclass
class RomeSettings:
    layer: int | None = None  # None: the Editor's edit layer
    stats_tokens: int | None = None  # C0 sample size (tokens); None: the Editor's


def rank_one_update(w: torch.Tensor, key: torch.Tensor, target: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """ΔW [d_model, d_key] (float64) with (W + ΔW) key = target.

    w [d_model, d_key], key [d_key], target [d_model], c0 [d_key, d_key].
    """
    k = key.double()
    u = torch.linalg.solve(c0.double(), k)  # C0^-1 k
    return torch.outer(target.double() - w.double() @ k, u) / (u @ k)


@register_baseline("rome")
class Rome(WeightEditor):
    settings_class = RomeSettings

    @property
    def layers(self) -> list[int]:
        return [self.ed.layer if self.hp.layer is None else self.hp.layer]

    def _edit(self, requests, edit_ids) -> None:
        ed, (layer,) = self.ed, self.layers
        keys = ed.keys(requests, layer)  # [n, d_key]
        res = optimise_residuals(ed.model, ed.tok, ed.adapter, layer, requests, ed.templates, ed.config.values)
        w = self.weight(layer)
        targets = keys.double() @ w.double().T + res.residuals.double()  # v* [n, d_model]
        for k, v in zip(keys, targets):
            self.add_delta(layer, rank_one_update(self.weight(layer), k, v, self.c0[layer]))
