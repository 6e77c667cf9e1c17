"""Routers: per-token choice of the stored edit whose residual applies, and its gate.

Every router picks, per token, the row j maximising `scale(|q|^2) * (q . row_j)` and gates on
`gate score = that score * gain_j`:
- cosine (NeuralDB): rows are unit keys, scale = 1/|q|, gain = 1; gate on cos > gamma.
- whitened (DEPTRAI): the gate score is w_j . q with w_j = C^-1 mu_j, C = C0 + mu_j mu_j^T,
  normalised so a stored key scores exactly 1 against itself. By Sherman-Morrison w_j is
  parallel to C0^-1 mu_j, so the gate score is mu_j^T C0^-1 q / |mu_j|_M^2 (|x|_M^2 = x^T C0^-1 x).
  Selection uses rows C0^-1 mu_j / |mu_j|_M (then gain = 1/|mu_j|_M): by Cauchy-Schwarz in
  the C0^-1 inner product a stored key then selects itself, which the raw w_j . q does not
  guarantee when keys differ in Mahalanobis norm. See docs/adr/0001-routing.md.
- margin (iReVa): cosine match; the single best neuron fires with a shifted GELU of
  (match - theta), normalised to 1 at a perfect match, and is silent below theta.
Rows are derived from raw keys on every load (never trusted from storage). Scores are
scaled dot products, so every reduction over d_key is additive: under tensor parallelism
partial dot products and squared norms are all-reduced and nothing else changes.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS: dict[str, type["Router"]] = {}


def register_router(name: str):
    def deco(cls):
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return deco


class Router(nn.Module):
    """Base router. Subclasses define `derive_rows`, `query_scale` and `weight`."""

    name = "base"
    default_threshold = 0.5
    threshold_range = (-math.inf, math.inf)  # [low, high): a threshold outside it is refused

    @classmethod
    def check_threshold(cls, threshold: float) -> float:
        """`threshold` as a float, or a ValueError naming the router and the range it accepts."""
        lo, hi = cls.threshold_range
        try:
            t = float(threshold)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{cls.name} router: threshold must be a number, got {threshold!r}") from exc
        if not math.isfinite(t) or not lo <= t < hi:
            raise ValueError(f"{cls.name} router: threshold {threshold!r} is outside [{lo:g}, {hi:g})")
        return t

    @abc.abstractmethod
    def derive_rows(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored keys [n, d_key] -> selection rows [n, d_key] and gate gains [n] (float32)."""

    def query_scale(self, sq_norm: torch.Tensor) -> torch.Tensor:
        """Per-token score scale from the query's squared norm [T] -> [T]."""
        return torch.ones_like(sq_norm)

    def weight(self, score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Residual weight per token [T]: 0 where gated off. Threshold is a 0-dim tensor."""
        return (score > threshold).to(score.dtype)

    def config(self) -> dict:
        return {"name": self.name}


@register_router("cosine")
class CosineRouter(Router):
    default_threshold = 0.65
    threshold_range = (-1.0, 1.0)  # a cosine never passes a gate at 1 (and the margin activation divides by gelu(1 - θ))

    def derive_rows(self, keys):
        return F.normalize(keys.float(), dim=-1), torch.ones(keys.shape[0], device=keys.device)

    def query_scale(self, sq_norm):
        return torch.rsqrt(sq_norm.clamp_min(1e-12))


@register_router("whitened")
class WhitenedRouter(Router):
    """Needs C0 = E[k k^T] at the edit layer (`editing.stats.SecondMoment.mean`)."""

    default_threshold = 0.6

    def __init__(self, c0: torch.Tensor, ridge: float = 1e-3):
        super().__init__()
        c0 = c0.double()
        # A small ridge relative to the mean eigenvalue keeps C0 invertible for rarely-firing neurons.
        reg = c0 + ridge * c0.diagonal().mean() * torch.eye(c0.shape[0], dtype=c0.dtype, device=c0.device)
        self.c0_inv = torch.linalg.inv(reg)  # [d_key, d_key] float64, not a buffer: only used on add
        self.ridge = ridge

    def derive_rows(self, keys):
        mu = keys.double().to(self.c0_inv.device)
        w = mu @ self.c0_inv  # [n, d_key]: (C0^-1 mu)^T, C0 symmetric
        m_norm = (w * mu).sum(-1).clamp_min(1e-30).sqrt()  # |mu|_M
        return (w / m_norm[:, None]).float().to(keys.device), (1.0 / m_norm).float().to(keys.device)

    def config(self):
        return {"name": self.name, "ridge": self.ridge}


@register_router("margin")
class MarginRouter(CosineRouter):
    default_threshold = 0.6

    def weight(self, score, threshold):
        act = F.gelu(score - threshold) / F.gelu(1.0 - threshold)
        return torch.where(score > threshold, act, torch.zeros_like(score))


def make_router(name: str, stats=None, **kwargs) -> Router:
    """Build a router by name. `whitened` needs `stats` (a SecondMoment or a C0 tensor)."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(sorted(ROUTERS))}")
    cls = ROUTERS[name]
    if cls is WhitenedRouter:
        if stats is None:
            raise ValueError("the whitened router needs second-moment statistics (C0) of the edit layer")
        c0 = stats.mean if hasattr(stats, "mean") and not isinstance(stats, torch.Tensor) else stats
        return cls(c0, **kwargs)
    return cls(**kwargs)


def mahalanobis_score(c0: torch.Tensor, mu: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The explicit DEPTRAI form, for tests: w = (C0 + mu mu^T)^-1 mu, score = w.q / w.mu.

    c0 [d, d], mu [d], q [T, d] -> [T] (float64).
    """
    c = c0.double() + torch.outer(mu.double(), mu.double())
    w = torch.linalg.solve(c, mu.double())
    return (q.double() @ w) / (w @ mu.double())


def shifted_gelu_weight(score: float, theta: float) -> float:
    """Scalar form of the margin activation, for tests and docs."""
    if score <= theta:
        return 0.0
    gelu = lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    return gelu(score - theta) / gelu(1 - theta)
