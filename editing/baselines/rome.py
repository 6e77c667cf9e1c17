"""ROME (Meng et al. 2022): a rank-one update of one layer's down-projection.

For an edit with key k (`editing.keys`, context-averaged) and target output v* = W k + r
(r the residual of `editing.values`, optimised on the model as it is when the batch starts):

    ΔW = (v* - W k) (C0^-1 k)^T / (k^T C0^-1 k)

so the edited layer maps k to v* exactly while moving other keys as little as possible in
C0's metric. A batch of n edits (keys K [n, d_key], targets V* [n, d_model]) gets the rank-n
update with the same two properties for every key at once,

    ΔW = (V* - K W^T)^T (K C0^-1 K^T)^+ (C0^-1 K^T)^T

(successive rank-one updates would each move the earlier keys of the batch off their targets by
k_j^T C0^-1 k_i; for n = 1 both are the update above). Two edits of one key with different targets
cannot both be met, and two edits of one subject give keys that differ by rounding or little more:
the pseudo-inverse drops directions of K C0^-1 K^T below `GRAM_RTOL` of its largest eigenvalue, so
such pairs get the mean of their targets instead of an update that grows without bound (on 64 zsRE
keys the smallest eigenvalues were 7e-18 and 6e-4 of the largest, from repeated subjects; on 64
CounterFact keys of distinct subjects the smallest was 9e-3, so those are met exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editing.baselines.base import WeightEditor, register_baseline
from editing.values import optimise_residuals


GRAM_RTOL = 1e-3  # relative eigenvalue cut of the batch's key Gram matrix (see the module doc)


@dataclass
class RomeSettings:
    layer: int | None = None  # None: the Editor's edit layer
    stats_tokens: int | None = None  # C0 sample size (tokens); None: the Editor's


def rank_one_update(w: torch.Tensor, key: torch.Tensor, target: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """ΔW [d_model, d_key] (float64) with (W + ΔW) key = target.

    w [d_model, d_key], key [d_key], target [d_model], c0 [d_key, d_key].
    """
    return batch_update(w, key[None], target[None], c0)


def batch_update(w: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """ΔW [d_model, d_key] (float64) with (W + ΔW) k_i = v*_i for every row, of least C0-weighted size
    (in the least-squares sense where keys nearly coincide: `GRAM_RTOL`).

    w [d_model, d_key], keys K [n, d_key], targets V* [n, d_model], c0 [d_key, d_key].
    """
    k = keys.double()
    u = torch.linalg.solve(c0.double(), k.T)  # C0^-1 K^T [d_key, n]
    gram = k @ u  # K C0^-1 K^T [n, n], symmetric
    resid = targets.double() - k @ w.double().T  # [n, d_model]
    return resid.T @ torch.linalg.pinv(gram, rtol=GRAM_RTOL, hermitian=True) @ u.T


@register_baseline("rome")
class Rome(WeightEditor):
    settings_class = RomeSettings
    revision = 2  # 2026-12-07: a batch is one joint update (was successive rank-one updates)

    @property
    def layers(self) -> list[int]:
        return [self.ed.layer if self.hp.layer is None else self.hp.layer]

    def _edit(self, requests, edit_ids) -> None:
        ed, (layer,) = self.ed, self.layers
        keys = ed.keys(requests, layer)  # [n, d_key]
        res = optimise_residuals(ed.model, ed.tok, ed.adapter, layer, requests, ed.templates, ed.config.values)
        w = self.weight(layer)
        targets = keys.double() @ w.double().T + res.residuals.double()  # v* [n, d_model]
        self.add_delta(layer, batch_update(w, keys, targets, self.c0[layer]))
