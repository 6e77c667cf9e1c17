"""AlphaEdit (Fang et al. 2025): MEMIT's layer range, updates confined to the null space of C0.

P = U0 U0^T, U0 the eigenvectors of C0 whose eigenvalue is below `nullspace_threshold`: keys of
ordinary text have (almost) no component there, so any ΔW = X P leaves their outputs alone.
With K [n, d_key] the batch's keys, R [n, d_model] its residuals (as in MEMIT) and
Kp^T Kp the accumulated k k^T of every earlier batch, each layer gets

    ΔW = R^T K P ((Kp^T Kp + K^T K) P + l2 I)^-1

which equals X P (so ordinary text is untouched) and keeps earlier edits' outputs (the Kp
term). After a batch, its keys (recomputed on the updated model) join Kp^T Kp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editing.baselines.base import register_baseline
from editing.baselines.memit import Memit


@dataclass
class AlphaEditSettings:
    layers: list[int] | None = None  # None: the edit layer and two layers either side
    nullspace_threshold: float = 2e-2  # eigenvalues of C0 below this span the null space
    l2: float = 10.0
    stats_tokens: int | None = None  # C0 sample size (tokens); None: the Editor's


def null_space_projection(c0: torch.Tensor, threshold: float) -> torch.Tensor:
    """P [d_key, d_key] float64 onto the eigenvectors of c0 [d_key, d_key] with eigenvalue < threshold."""
    vals, vecs = torch.linalg.eigh(c0.double())
    u0 = vecs[:, vals < threshold]
    return u0 @ u0.T


def alphaedit_update(residual: torch.Tensor, keys: torch.Tensor, proj: torch.Tensor, kept: torch.Tensor,
                     l2: float) -> torch.Tensor:
    """ΔW = R^T K P ((Kp^T Kp + K^T K) P + l2 I)^-1, float64.

    residual R [n, d_model], keys K [n, d_key], proj P and kept Kp^T Kp [d_key, d_key].
    Returns [d_model, d_key]. Solved in the transposed form (P (Kp^T Kp + K^T K) + l2 I) X = P K^T R.
    """
    k, r, p = keys.double(), residual.double(), proj.double()
    a = p @ (kept.double() + k.T @ k) + l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return torch.linalg.solve(a, p @ k.T @ r).T


@register_baseline("alphaedit")
class AlphaEdit(Memit):
    settings_class = AlphaEditSettings

    def _prepare(self) -> None:
        self.proj = {layer: null_space_projection(c0, self.hp.nullspace_threshold) for layer, c0 in self.c0.items()}
        self.kept = {layer: torch.zeros_like(c0) for layer, c0 in self.c0.items()}

    def null_space_dims(self) -> dict[int, int]:
        """Rank of P per layer."""
        return {layer: int(round(float(p.trace()))) for layer, p in self.proj.items()}

    def layer_update(self, layer, keys, residual):
        return alphaedit_update(residual, keys, self.proj[layer], self.kept[layer], self.hp.l2)

    def _after_batch(self, requests) -> None:
        ed = self.ed
        for layer in self.layers:
            k = ed.keys(requests, layer).double()
            self.kept[layer] += (k.T @ k).to(self.kept[layer])

    def describe(self) -> dict:
        return {**super().describe(), "null_space_dims": self.null_space_dims() if self.active else None}
