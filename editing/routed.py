"""The routed FFN: the edit layer's FFN output plus gate x residual of the best-matching edit.

One module serves the HF path (wrapping the down-projection, `attach`) and the vLLM path
(called from a routed MLP with the down-projection's input and output). It is built for
compiled and graph-captured execution:
- inputs are flattened `[tokens, d]`;
- the memory lives in fixed-capacity buffers with a valid mask (an additive -inf bias);
  capacity grows by doubling, and only between forward steps;
- the threshold and the on/off switch are tensors;
- `forward` has no `.item()` and no data-dependent branches.
When no token passes the gate (routing off, an empty memory, nothing matching) the output is
bit-identical to the base FFN output (`torch.where` selects the base tensor itself).

For large memories a low-dimensional prefilter scores every row in an r-dimensional
orthonormal basis, keeps the top-`candidates` rows per token, and re-scores those exactly.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import torch
from torch import nn

from editing.routers import Router

# Entries of the per-token score (or gathered candidate) tensors routed at once: a long prefill is routed in
# token chunks, so routing 8,192 tokens against 131,072 slots needs 128 MB at a time, not 4 GB.
ROUTE_CHUNK_ELEMENTS = 1 << 25


class RoutedFFN(nn.Module):
    """Key-value memory and routing for one FFN layer.

    Args:
        router: how keys are scored and gated.
        d_key, d_model: FFN key size (down-projection input) and model size (its output).
        capacity: initial number of slots (grows by doubling).
        threshold: gate threshold (router default when None).
        prefilter_dim: r of the prefilter basis, 0 to always score every row exactly.
        prefilter_min_rows: capacity from which the prefilter is used.
        candidates: rows re-scored exactly per token when prefiltering.
    """

    def __init__(self, router: Router, d_key: int, d_model: int, capacity: int = 64, threshold: float | None = None,
                 prefilter_dim: int = 64, prefilter_min_rows: int = 4096, candidates: int = 16,
                 device=None, dtype=torch.float32):
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.router = router
        self.d_key, self.d_model = d_key, d_model
        self.prefilter_dim, self.prefilter_min_rows, self.candidates = prefilter_dim, prefilter_min_rows, candidates
        thr = router.default_threshold if threshold is None else threshold
        self.register_buffer("threshold", torch.tensor(float(thr), device=device))
        self.register_buffer("enabled", torch.tensor(True, device=device))
        self.register_buffer("rows", torch.zeros(capacity, d_key, device=device, dtype=dtype))
        self.register_buffer("residuals", torch.zeros(capacity, d_model, device=device, dtype=dtype))
        self.register_buffer("bias", torch.full((capacity,), float("-inf"), device=device, dtype=dtype))
        self.register_buffer("gain", torch.zeros(capacity, device=device, dtype=dtype))
        self.register_buffer("basis", torch.zeros(d_key, max(prefilter_dim, 1), device=device, dtype=dtype))
        self.register_buffer("low", torch.zeros(capacity, max(prefilter_dim, 1), device=device, dtype=dtype))
        self.register_buffer("hits", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("tokens", torch.zeros((), dtype=torch.long, device=device))
        self.use_prefilter = False
        self.has_basis = False
        # REP robust keys (`editing.rep.RobustKeys`): rewrites the routing query only, never the FFN output.
        self.query_adapter: nn.Module | None = None
        # Under tensor parallelism the key is split across ranks: partial dot products and
        # squared norms are summed by this all-reduce (identity with one rank).
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.slots: dict[str, int] = {}
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self.lock = threading.RLock()  # held by writers; HF serving holds it around forward
        self.version: int | None = None
        self.memory_name: str | None = None

    # ------------------------------------------------------------------ forward
    def _r(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.reduce is None else self.reduce(x)

    def route(self, key: torch.Tensor):
        """Best row, its gate score and the residual weight for every token.

        key: [T, d_key]. Returns best [T] long, score [T], weight [T] (0 where gated off).
        Tokens are routed in chunks of at most `ROUTE_CHUNK_ELEMENTS` score entries (the same chunks on every
        tensor-parallel rank: T and the capacity are the same there).
        """
        width = max(self.capacity, self.candidates * self.rows.shape[1]) if self.use_prefilter else self.capacity
        step = max(1, ROUTE_CHUNK_ELEMENTS // max(width, 1))
        if key.shape[0] <= step or torch.compiler.is_compiling():  # compiled: one piece (a dynamic token count)
            return self._route(key)
        parts = [self._route(key[i: i + step]) for i in range(0, key.shape[0], step)]
        return tuple(torch.cat(p) for p in zip(*parts))

    def _route(self, key: torch.Tensor):
        """`route` for one chunk of tokens: key [t, d_key] -> best, score, weight [t]."""
        key = key.to(self.rows.dtype)
        if self.query_adapter is not None:
            key = self.query_adapter(key)
        scale = self.router.query_scale(self._r((key * key).sum(-1)))  # [T]
        if self.use_prefilter:
            approx = self._r(key @ self.basis) @ self.low.T + self.bias  # [T, cap]
            cand = approx.topk(min(self.candidates, self.bias.shape[0]), dim=-1).indices  # [T, C]
            exact = self._r(torch.einsum("td,tcd->tc", key, self.rows[cand]))
            exact = exact * scale[:, None] + self.bias[cand]
            score, j = exact.max(dim=-1)
            best = cand.gather(1, j[:, None]).squeeze(1)
        else:
            scores = self._r(key @ self.rows.T) * scale[:, None] + self.bias  # [T, cap]
            score, best = scores.max(dim=-1)
        score = score * self.gain[best]
        weight = self.router.weight(score, self.threshold) * self.enabled
        return best, score, weight

    def forward(self, key: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """FFN output with edits applied.

        key: [T, d_key] down-projection input; base: [T, d_model] its output.
        Returns [T, d_model]: base + weight * residual[best] where the gate is on, base elsewhere.
        """
        best, _score, weight = self.route(key)
        on = weight > 0
        self.hits += on.sum()
        self.tokens += on.numel()
        edited = base + (weight[:, None] * self.residuals[best]).to(base.dtype)
        return torch.where(on[:, None], edited, base)

    # ------------------------------------------------------------------ memory ops (between steps)
    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    @property
    def n_facts(self) -> int:
        return len(self.slots)

    def ensure_capacity(self, n: int) -> None:
        """Grow every slot buffer by doubling until it holds n rows (never inside a step)."""
        cap = self.capacity
        if n <= cap:
            return
        new = cap
        while new < n:
            new *= 2

        def grow(buf: torch.Tensor, fill: float) -> torch.Tensor:
            out = torch.full((new, *buf.shape[1:]), fill, dtype=buf.dtype, device=buf.device)
            out[:cap] = buf
            return out

        # every buffer is allocated before any is swapped in: running out of memory leaves the layer as it was
        rows, residuals, bias = grow(self.rows, 0.0), grow(self.residuals, 0.0), grow(self.bias, float("-inf"))
        gain, low = grow(self.gain, 0.0), grow(self.low, 0.0)
        self.rows, self.residuals, self.bias, self.gain, self.low = rows, residuals, bias, gain, low
        self._free = list(range(new - 1, cap - 1, -1)) + self._free
        self._update_prefilter_switch()

    def _update_prefilter_switch(self) -> None:
        self.use_prefilter = bool(self.prefilter_dim and self.has_basis and self.capacity >= self.prefilter_min_rows)

    def set_basis(self, basis: torch.Tensor) -> None:
        """Set the prefilter basis [d_key, r] (orthonormal columns) and re-project every row."""
        if basis.shape != (self.d_key, self.prefilter_dim):
            raise ValueError(f"basis must be [{self.d_key}, {self.prefilter_dim}], got {tuple(basis.shape)}")
        with self.lock:
            self.basis.copy_(basis.to(self.basis))
            self.low.copy_(self.rows @ self.basis)
            self.has_basis = True
            self._update_prefilter_switch()

    def fit_basis(self, sample: torch.Tensor | None = None) -> None:
        """Fit the prefilter basis to the top principal directions of the stored rows (or `sample` [n, d_key])."""
        if not self.prefilter_dim:
            return
        x = self.rows[torch.isfinite(self.bias)] if sample is None else self.router.derive_rows(sample.to(self.rows))[0]
        if x.shape[0] == 0:
            return
        x = x.float()
        _, vecs = torch.linalg.eigh(x.T @ x)  # float32: the double path is ~20x slower on CPU
        self.set_basis(vecs[:, -self.prefilter_dim:].flip(-1).to(self.rows.dtype))

    def add(self, edit_ids: list[str], keys: torch.Tensor, residuals: torch.Tensor) -> None:
        """Insert or replace edits. keys [n, d_key], residuals [n, d_model]."""
        self.apply(edit_ids, keys, residuals, [])

    def delete(self, edit_ids: Iterable[str]) -> int:
        """Remove edits by id; unknown ids are ignored. Returns how many were removed."""
        return self.apply([], None, None, list(edit_ids))

    def clear(self) -> None:
        self.delete(list(self.slots))

    def apply(self, added_ids: list[str], keys: torch.Tensor | None, residuals: torch.Tensor | None,
              deleted_ids: list[str], version: int | None = None) -> int:
        """Apply one delta atomically with respect to forward steps: deletes, then adds.

        keys [n, d_key], residuals [n, d_model] for the n `added_ids` (an id already present
        is replaced in place). Rows are derived here, so stored derived values are never trusted.
        Returns the number of deleted rows.
        """
        n = len(added_ids)
        if n and (keys is None or residuals is None or keys.shape != (n, self.d_key) or residuals.shape != (n, self.d_model)):
            raise ValueError(
                f"expected keys [{n}, {self.d_key}] and residuals [{n}, {self.d_model}], got "
                f"{None if keys is None else tuple(keys.shape)} and {None if residuals is None else tuple(residuals.shape)}"
            )
        if len(set(added_ids)) != n:
            raise ValueError("duplicate edit ids in one delta")
        with self.lock:
            # Everything that can fail runs before the first write: a router that refuses the keys or a
            # buffer that cannot grow leaves the layer at its old version, not half-way to the new one.
            if n:
                rows, gain = self.router.derive_rows(keys.to(self.rows.device))
                rows = rows.to(self.rows.dtype)
                leaving = {e for e in deleted_ids if e in self.slots}
                self.ensure_capacity(len(self.slots) - len(leaving)
                                     + sum(1 for e in added_ids if e not in self.slots or e in leaving))
            gone = [slot for slot in (self.slots.pop(eid, None) for eid in deleted_ids) if slot is not None]
            if gone:
                idx = torch.tensor(gone, device=self.rows.device)
                self.bias[idx] = float("-inf")  # one indexed write per buffer, not one per row
                self.gain[idx] = 0.0
                self.rows[idx] = 0.0
                self.residuals[idx] = 0.0
                self.low[idx] = 0.0
                self._free.extend(gone)
            removed = len(gone)
            if n:
                for eid in added_ids:
                    if eid not in self.slots:
                        self.slots[eid] = self._free.pop()
                idx = torch.tensor([self.slots[e] for e in added_ids], device=self.rows.device)
                self.rows[idx] = rows
                self.gain[idx] = gain.to(self.gain.dtype)
                self.residuals[idx] = residuals.to(self.residuals)
                self.bias[idx] = 0.0
                if self.has_basis:
                    self.low[idx] = rows @ self.basis
            if version is not None:
                self.version = version
            return removed


class RoutedDownProj(nn.Module):
    """HF integration: a down-projection whose output goes through a `RoutedFFN`.

    Accepts keys of any leading shape [..., d_key] and flattens them to [tokens, d_key].
    """

    def __init__(self, base: nn.Module, routed: RoutedFFN):
        super().__init__()
        self.base = base
        self.routed = routed

    def forward(self, key: torch.Tensor) -> torch.Tensor:
        out = self.base(key)
        flat = self.routed(key.reshape(-1, key.shape[-1]), out.reshape(-1, out.shape[-1]))
        return flat.view(out.shape)


def attach(model, adapter, layer: int, routed: RoutedFFN) -> RoutedFFN:
    """Route `layer`'s FFN of an HF model through `routed` (replacing any earlier memory)."""
    down = adapter.down_proj(layer)
    base = down.base if isinstance(down, RoutedDownProj) else down
    routed.to(adapter.down_weight(layer).device)  # the edit layer's device (a sharded model spans several)
    adapter.set_down_proj(layer, RoutedDownProj(base, routed))
    return routed


def detach(model, adapter, layer: int) -> None:
    """Restore the plain down-projection of `layer`."""
    down = adapter.down_proj(layer)
    if isinstance(down, RoutedDownProj):
        adapter.set_down_proj(layer, down.base)


def attached(adapter, layer: int) -> RoutedFFN | None:
    down = adapter.down_proj(layer)
    return down.routed if isinstance(down, RoutedDownProj) else None
