"""AlphaEdit (Fang et al. 2025): MEMIT's layer range, updates confined to the null space of C0.

P = U0 U0^T, U0 the eigenvectors of C0 with the smallest eigenvalues, together holding at most
`nullspace_energy` of C0's trace (the energy of ordinary text's keys): those keys have almost no
component there, so any ΔW = X P leaves their outputs almost alone. (The paper's absolute
eigenvalue cut, 2e-2, is tied to its models' scale: on SmolLM2's layer 6 it kept 1,147 of 1,536
directions holding 31% of the energy, not a null space; `nullspace_threshold` still selects it.)
SmolLM2's keys have no true null space, so the share trades edit success against what text puts there;
measured on the compare cell (counterfact_test, T = 10 in batches of 5; benchmarks/RESULTS.md, 2026-12-07
night): 2% (170 directions at layer 6) edits 4 of 10, 5% 9 of 10 with 63.7% of paraphrases, 10% (593
directions) 9 of 10 with 69.7% and the smallest perplexity change, 20% 72.1%, the old cut 73.3%. Default 10%.
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
    nullspace_energy: float | None = 0.1  # the null space holds at most this share of C0's trace (see the doc)
    nullspace_threshold: float | None = None  # instead: eigenvalues of C0 below this (the paper's 2e-2)
    l2: float = 10.0
    stats_tokens: int | None = None  # C0 sample size (tokens); None: the Editor's


def null_space_projection(c0: torch.Tensor, threshold: float | None = None, energy: float | None = None) -> torch.Tensor:
    """P [d_key, d_key] float64 onto eigenvectors of c0 [d_key, d_key]: those with eigenvalue < `threshold`,
    or the smallest ones whose eigenvalues sum to at most `energy` × trace (give one of the two)."""
    if (threshold is None) == (energy is None):
        raise ValueError("give a null-space eigenvalue threshold or an energy share, not both or neither")
    vals, vecs = torch.linalg.eigh(c0.double())  # ascending
    if threshold is not None:
        keep = vals < threshold
    else:
        if not 0.0 <= energy < 1.0:
            raise ValueError(f"nullspace_energy must be in [0, 1), got {energy}")
        keep = vals.clamp_min(0).cumsum(0) <= energy * vals.clamp_min(0).sum()
    u0 = vecs[:, keep]
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
    revision = 2  # 2026-12-07: the null space by energy share (was the paper's absolute eigenvalue cut)

    def _prepare(self) -> None:
        energy = None if self.hp.nullspace_threshold is not None else self.hp.nullspace_energy
        self.proj = {layer: null_space_projection(c0, self.hp.nullspace_threshold, energy)
                     for layer, c0 in self.c0.items()}
        self.kept = {layer: torch.zeros_like(c0) for layer, c0 in self.c0.items()}

    def null_space_dims(self) -> dict[int, int]:
        """Rank of P per layer."""
        return {layer: int(round(float(p.trace()))) for layer, p in self.proj.items()}

    def null_space_energy(self) -> dict[int, float]:
        """Share of C0's trace inside the null space per layer, tr(P C0) / tr(C0): what ordinary text puts there."""
        return {layer: float(torch.trace(p @ self.c0[layer].double()) / torch.trace(self.c0[layer].double()))
                for layer, p in self.proj.items()}

    def _batch_state(self) -> dict[str, torch.Tensor]:
        return {f"kept{layer}": kept for layer, kept in self.kept.items()}

    def layer_update(self, layer, keys, residual):
        return alphaedit_update(residual, keys, self.proj[layer], self.kept[layer], self.hp.l2)

    def _after_batch(self, requests) -> None:
        ed = self.ed
        for layer in self.layers:
            k = ed.keys(requests, layer).double()
            self.kept[layer] += (k.T @ k).to(self.kept[layer])

    def describe(self) -> dict:
        return {**super().describe(), "null_space_dims": self.null_space_dims() if self.active else None,
                "null_space_energy": self.null_space_energy() if self.active else None}
