"""Several memories on one FFN layer, chosen per token: the routed layer of a multi-memory replica.

A `MemorySet` holds `RoutedFFN`s in numbered slots (one per memory, each following its own
versions) and a per-token slot index `token_memory[max_tokens]` (long; -1 = no memory, the
base model) that the owner sets between forward steps, the way vLLM's LoRA support sets its
per-token adapter mapping before each step. `forward` routes every token against every
memory with the core `RoutedFFN.route`, then adds `weight x residual` only where the token's
slot is that memory's:

    out[t] = base[t] + w_m[t] * residual_m[best_m[t]]   where token_memory[t] == m and w_m[t] > 0
    out[t] = base[t]                                     elsewhere (the base tensor itself: bit-identical)

Scoring every token against every memory costs what one memory of the same total row count
costs (the same dot products, split into M matrices); the per-memory extras are one query norm
and one fused residual gather-multiply-add per token. Shapes are static and there is no `.item()` and no
data-dependent branch, so the module can run inside a captured graph; adding or removing a
slot changes the module structure and happens only between steps (eager engines).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from editing.routed import RoutedFFN

NO_MEMORY = -1


class MemorySet(nn.Module):
    """Memories in slots plus the per-token slot index of the current step.

    Args:
        max_tokens: tokens one forward can carry (the engine's max batched tokens).
    """

    def __init__(self, max_tokens: int, device=None):
        super().__init__()
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.register_buffer("token_memory", torch.full((max_tokens,), NO_MEMORY, dtype=torch.long, device=device))
        self.slots: list[RoutedFFN | None] = []
        self.names: dict[str, int] = {}

    # ------------------------------------------------------------------ slots (between steps)
    @property
    def max_tokens(self) -> int:
        return self.token_memory.shape[0]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def slot(self, name: str | None) -> int:
        """Slot of a memory name; -1 for None or "" (the base model). KeyError for an unknown name."""
        if not name:
            return NO_MEMORY
        try:
            return self.names[name]
        except KeyError:
            raise KeyError(f"memory {name!r} is not loaded; loaded: {sorted(self.names) or 'none'}") from None

    def memory(self, name: str) -> RoutedFFN:
        return self.slots[self.slot(name)]  # type: ignore[return-value]

    def put(self, name: str, routed: RoutedFFN) -> int:
        """Load `routed` as memory `name` (replacing a memory of that name in its slot). Returns the slot."""
        current = self.names.get(name)
        for i, other in enumerate(self.slots):
            if other is not None and i != current and (other.d_key, other.d_model) != (routed.d_key, routed.d_model):
                raise ValueError(f"memory {name!r} is [{routed.d_key} -> {routed.d_model}], the set holds "
                                 f"[{other.d_key} -> {other.d_model}] memories")
        slot = current
        if slot is None:
            slot = next((i for i, r in enumerate(self.slots) if r is None), len(self.slots))
            if slot == len(self.slots):
                self.slots.append(None)
        self.slots[slot] = routed
        self.add_module(f"m{slot}", routed)  # follows .to() / .float(); replaces the old module of that slot
        self.names[name] = slot
        return slot

    def pop(self, name: str) -> RoutedFFN:
        """Unload memory `name`; tokens still pointing at its slot get the base output."""
        slot = self.slot(name)
        routed = self.slots[slot]
        self.slots[slot] = None
        del self._modules[f"m{slot}"]
        del self.names[name]
        self.token_memory.masked_fill_(self.token_memory == slot, NO_MEMORY)
        return routed  # type: ignore[return-value]

    # ------------------------------------------------------------------ the per-token mapping
    def set_token_memory(self, slots: torch.Tensor | Sequence[int]) -> None:
        """Slot per token of the next step: [T] long (T <= max_tokens); later tokens get -1."""
        slots = torch.as_tensor(slots, dtype=torch.long)
        n = slots.shape[0]
        if n > self.max_tokens:
            raise ValueError(f"{n} tokens do not fit the set's {self.max_tokens} token slots")
        self.token_memory[:n].copy_(slots)
        self.token_memory[n:].fill_(NO_MEMORY)

    def set_request_memory(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        """Per-request slots [R] and token counts [R], requests in batch order (each one's tokens contiguous)."""
        self.set_token_memory(torch.from_numpy(np.repeat(np.asarray(slots, dtype=np.int64),
                                                         np.asarray(tokens, dtype=np.int64))))

    # ------------------------------------------------------------------ forward
    def forward(self, key: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """FFN output with each token's own memory applied.

        key: [T, d_key] down-projection input; base: [T, d_model] its output; T <= max_tokens.
        Returns [T, d_model]. Each memory's `hits`/`tokens` counters count its own tokens only.
        """
        which = self.token_memory[: key.shape[0]]  # [T]
        live = [(slot, r) for slot, r in enumerate(self.slots) if r is not None]
        if not live:
            return base
        # Residuals of every memory accumulate into one [T, d_model] delta: a token's own memory adds
        # w * residual, every other memory adds exactly 0, so delta holds the single-memory product bit for bit.
        delta = torch.zeros(base.shape, dtype=live[0][1].residuals.dtype, device=base.device)
        on_any = torch.zeros_like(which, dtype=torch.bool)
        for slot, routed in live:
            best, _score, weight = routed.route(key)  # [T] each
            mine = which == slot
            on = mine & (weight > 0)
            routed.hits += on.sum()
            routed.tokens += mine.sum()
            delta = torch.addcmul(delta, torch.where(on, weight, torch.zeros_like(weight))[:, None], routed.residuals[best])
            on_any = on_any | on
        return torch.where(on_any[:, None], base + delta.to(base.dtype), base)
