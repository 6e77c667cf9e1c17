"""Routed vLLM models: a stock vLLM model whose edit-layer MLP calls the core `RoutedFFN`.

Each class subclasses the stock vLLM model and, after it is built, wraps the one MLP of
the edit layer in `RoutedMLP` (reusing its gate_up/down projections, so checkpoint
parameter names do not change):

    key  = act(gate_up_proj(x))      [T, d_key / tp]   (the down-projection input)
    base = down_proj(key)            [T, d_model]      (all-reduced under TP)
    out  = routed(key, base)         [T, d_model]      (editing.routed.RoutedFFN)

The memory is checked against the served model when the model is built (before any weight
is loaded: a wrong memory fails the start), loaded after the weights, and followed by a
watcher thread in the worker (`serving.memory.MemoryFollower`). Staged versions are applied
at the step boundary: the start of the outer `forward` (not compiled; runs once per step in
the worker's main thread) and the `kvedit_sync` RPC (`serving.vllm_worker`), never while a
forward runs.

Tensor parallelism: each rank holds its key columns of every stored row and RoutedFFN's
`reduce` all-reduces partial dot products over the TP group. Only TP rank 0 watches the
store; at each boundary it broadcasts whether it has staged versions and, if so, the
versions themselves, so all ranks apply identical versions at the same step.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    get_tp_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from editing.routed import RoutedFFN
from serving.errors import MemoryMismatchError, ServingConfigError, UnsupportedArchitectureError
from serving.fingerprint import served_fingerprint
from serving.memory import (
    KeyShard,
    MemoryFollower,
    ServedModel,
    ResolvedMemory,
    StagedUpdate,
    build_routed,
    default_capacity,
    next_pow2,
    resolve_memory,
)
from serving.settings import ENV_PREFIX_SALT, MemorySettings

logger = logging.getLogger(__name__)

FIXED_CAPACITY_DEFAULT = 4096  # slots preallocated when buffers cannot grow (compiled / graph-captured)


class RoutedMLP(nn.Module):
    """The edit layer's MLP, routed. Holds the original projections under their original names."""

    def __init__(self, mlp: nn.Module, routed: RoutedFFN):
        super().__init__()
        self.gate_up_proj = mlp.gate_up_proj
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        self.routed = routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_model] -> [T, d_model]."""
        gate_up, _ = self.gate_up_proj(x)  # [T, 2 * d_key / tp]
        key = self.act_fn(gate_up)  # [T, d_key / tp]
        base, _ = self.down_proj(key)  # [T, d_model]
        return self.routed(key, base)


class _TensorParallelSync:
    """Rank 0 of the TP group decides which staged versions every rank applies."""

    def __init__(self):
        self.group = get_tp_group()

    @property
    def leader(self) -> bool:
        return self.group.rank_in_group == 0

    def share(self, obj):
        return self.group.broadcast_object(obj if self.leader else None, src=0)

    def version_range(self, version: int | None) -> tuple[int, int]:
        """(lowest, highest) memory version over the TP group's ranks (None counts as -1)."""
        v = -1 if version is None else int(version)
        both = torch.tensor([v, -v], dtype=torch.int64)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=self.group.cpu_group)
        return -int(both[1]), int(both[0])

    def share_updates(self, updates: list[StagedUpdate]) -> list[StagedUpdate]:
        flag = torch.tensor([1 if updates else 0], dtype=torch.int32)
        torch.distributed.broadcast(flag, src=self.group.ranks[0], group=self.group.cpu_group)
        if not int(flag[0]):
            return []
        return self.share(updates)


def agreed_capacity(resolved: ResolvedMemory, requested: int | None, fixed: bool,
                    tp: _TensorParallelSync | None) -> int:
    """Slots for a memory's routed layer; under TP, rank 0's figure on every rank.

    `requested` (KVEDIT_CAPACITY) wins; buffers that cannot grow (`fixed`: compiled graphs hold their
    addresses) get room for twice the start version's rows. Each rank resolves the memory itself, so a commit
    landing between two ranks' reads would give them different row counts, hence different buffer shapes,
    and the all-reduced partial scores [T, capacity] must agree (a mismatch fails or hangs the collective).
    """
    capacity = requested
    if capacity is None:
        n = resolved.info.n_rows
        capacity = max(FIXED_CAPACITY_DEFAULT, next_pow2(2 * n)) if fixed else default_capacity(n)
    return capacity if tp is None else tp.share(capacity)


class WorkerMemory:
    """One worker's memory: the follower plus, under TP, agreement on what to apply.

    `layer` is the decoder layer whose `mlp` is `routed_mlp`; `stock_mlp` is the MLP it
    wraps (kept, unregistered, so routing can be switched off for A/B measurements).
    """

    def __init__(self, follower: MemoryFollower, tp: _TensorParallelSync | None, layer: nn.Module | None = None,
                 stock_mlp: nn.Module | None = None):
        self.follower = follower
        self.tp = tp
        self.started = False
        self.layer = layer
        self.routed_mlp = None if layer is None else layer.mlp
        self.stock_mlp = stock_mlp

    def start(self) -> None:
        """Load the start version (rank 0's choice under TP) and start following."""
        if self.started:
            return
        version = self.follower.start_version
        if self.tp is not None:
            version = self.tp.share(version)
        self.follower.load(version)
        self.follower.start()
        self.started = True

    def boundary(self) -> None:
        """Apply staged versions; call only between forward steps, on every TP rank alike."""
        if not self.started:
            self.start()
        if self.tp is None:
            self.follower.apply_pending()
            return
        # Rank 0 shares what it staged; each rank serves the adapter through its own key columns.
        if self.tp.leader:
            updates = self.follower.take_pending()
            self.tp.share_updates([self.follower.portable(u) for u in updates])
        else:
            updates = [self.follower.localize(u) for u in self.tp.share_updates([])]
        if updates:
            self.follower.apply(updates)
            self._agree()

    def _agree(self) -> None:
        """After an apply under TP, every rank must hold the same version (each routes on its own key columns
        of the same rows). A rank that could not apply (out of memory on its device) stays where it was, so
        every rank goes back to the lowest version held, and rank 0 stages again from there after its backoff.
        A rank that cannot even load that version fails the step: ranks that disagree must not serve."""
        mine = self.follower.routed.version
        low, high = self.tp.version_range(mine)
        if low == high:
            return
        logger.warning("memory %r: TP ranks hold v%d..v%d after an apply; all go back to v%d",
                       self.follower.name, low, high, low)
        if mine != low:
            self.follower.load(low)
        if self.tp.leader and mine == high:  # rank 0 applied: the failure elsewhere backs it off (its own is counted)
            self.follower.retry_later(f"memory {self.follower.name!r}: another TP rank could not apply v{high}; "
                                      f"serving v{low}", failed=high)

    def status(self, drain: bool = False) -> dict:
        status = self.follower.status(drain=drain)
        status["routing"] = self.routing
        return status

    @property
    def routing(self) -> bool:
        return self.layer is None or self.layer.mlp is self.routed_mlp

    def set_routing(self, on: bool) -> bool:
        """Route the edit layer through the memory (True) or run the stock MLP (False); between steps only.

        For measuring what routing costs on the same engine (`kvedit bench serve-overhead`).
        Eager mode only: a compiled graph has the module it traced baked in.
        """
        if self.layer is None or self.stock_mlp is None:
            raise ServingConfigError("this worker has no routed layer to switch")
        if self.follower.fixed_capacity:
            raise ServingConfigError("routing can only be switched in eager mode (--enforce-eager)")
        self.layer.mlp = self.routed_mlp if on else self.stock_mlp
        return self.routing


def _check_prefix_cache(vllm_config: VllmConfig, settings: MemorySettings) -> None:
    """Refuse prefix caching that could serve KV computed under an older memory version."""
    if settings.pinned or not vllm_config.cache_config.enable_prefix_caching:
        return
    if os.environ.get(ENV_PREFIX_SALT) == "1":
        return
    raise ServingConfigError(
        f"prefix caching is on and memory {settings.memory} follows new versions, so cached KV computed under an "
        "older version would be reused. Start the server with `--middleware serving.vllm_middleware.KveditMiddleware` "
        f"and {ENV_PREFIX_SALT}=1 (what `kvedit serve` does), or with --no-enable-prefix-caching, or pin a version "
        "(KVEDIT_MEMORY=NAME@VERSION)"
    )


class KveditModelMixin:
    """Mixed into a stock vLLM *ForCausalLM: routes the edit layer and follows the memory."""

    kvedit: WorkerMemory | None = None

    def _kvedit_init(self, vllm_config: VllmConfig) -> None:
        self.kvedit = None
        settings = MemorySettings.from_env()
        if settings.multi:  # several memories, chosen per request (issue 8): serving/vllm_multi.py
            from serving.vllm_multi import attach_memories

            self.kvedit = attach_memories(self, vllm_config, settings)
            return
        if settings.memory is None:
            logger.warning("KVEDIT_MEMORY is not set: serving %s without a memory", type(self).__name__)
            return
        model_config = vllm_config.model_config
        path = model_config.model
        if not os.path.isdir(path):
            raise ServingConfigError(f"kvedit serves local model folders (to fingerprint them); got {path!r}")
        text = model_config.hf_config.get_text_config()
        served = ServedModel(served_fingerprint(path), text.num_hidden_layers, text.intermediate_size, text.hidden_size)
        resolved = resolve_memory(settings, served)  # wrong model / layer: the engine does not start
        _check_prefix_cache(vllm_config, settings)
        layer = self.model.layers[resolved.spec.layer]
        if isinstance(layer, PPMissingLayer):
            logger.info("layer %d lives on another pipeline stage; no memory here", resolved.spec.layer)
            return
        mlp = layer.mlp
        missing = [a for a in ("gate_up_proj", "down_proj", "act_fn") if not hasattr(mlp, a)]
        if missing:
            raise UnsupportedArchitectureError(f"{type(mlp).__name__} has no {', '.join(missing)}: cannot route it")
        down = mlp.down_proj
        tp = get_tensor_model_parallel_world_size()
        d_local, d_model = down.input_size_per_partition, down.output_size_per_partition
        if d_local * tp != served.d_key or d_model != served.d_model:
            raise MemoryMismatchError(
                f"layer {resolved.spec.layer} down-projection is [{d_local}x{tp} -> {d_model}], "
                f"not [{served.d_key} -> {served.d_model}] as the config says"
            )
        shard = None
        rank = 0
        if tp > 1:
            rank = get_tp_group().rank_in_group
            shard = KeyShard(rank * d_local, (rank + 1) * d_local,
                             lambda t: tensor_model_parallel_all_gather(t, dim=-1))
        fixed = not model_config.enforce_eager
        sync = _TensorParallelSync() if tp > 1 else None
        capacity = agreed_capacity(resolved, settings.capacity, fixed, sync)
        routed = build_routed(resolved, capacity=capacity, shard=shard)
        if tp > 1:
            routed.reduce = tensor_model_parallel_all_reduce
        layer.mlp = RoutedMLP(mlp, routed)
        follower = MemoryFollower(resolved, routed, poll_seconds=settings.poll_seconds, shard=shard,
                                  fixed_capacity=fixed, watch=rank == 0)
        self.kvedit = WorkerMemory(follower, sync, layer, mlp)
        logger.info("routing layer %d through memory %r (from v%d, capacity %d%s)", resolved.spec.layer,
                    resolved.name, resolved.info.version, routed.capacity, ", fixed" if fixed else "")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        if self.kvedit is not None:
            self.kvedit.start()
        return loaded

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        # The outer forward is not compiled and runs once per step: the step boundary.
        if self.kvedit is not None:
            self.kvedit.boundary()
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


class RoutedLlamaForCausalLM(KveditModelMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._kvedit_init(vllm_config)


class RoutedMistralForCausalLM(KveditModelMixin, MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._kvedit_init(vllm_config)


class RoutedQwen2ForCausalLM(KveditModelMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._kvedit_init(vllm_config)


class RoutedQwen3ForCausalLM(KveditModelMixin, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._kvedit_init(vllm_config)
