"""vLLM workers of multi-memory replicas: one routed layer, several memories, each request its own.

Selected by KVEDIT_MEMORIES (what `kvedit serve` sets); `KveditModelMixin` hands over to
`attach_memories` when it is present. The edit layer's MLP becomes the `RoutedMLP` of ADR 0003
with a `MemorySet` in place of the single `RoutedFFN`:

    key  = act(gate_up_proj(x))      [T, d_key / tp]
    base = down_proj(key)            [T, d_model]
    out  = memories(key, base)       [T, d_model]   (editing.multi.MemorySet)

The per-token memory index is set at every step boundary (the model's outer forward, which
runs after the runner prepared the step's inputs, and the kvedit RPCs) the way vLLM's LoRA
support builds its per-token adapter mapping in `_prepare_inputs` -> `set_active_loras`: the
runner's persistent batch lists the scheduled requests in order (`input_batch.req_ids`), each
request's tokens are contiguous (`query_start_loc`), and each request's `SamplingParams.extra_args`
(the OpenAI field `vllm_xargs`, which the kvedit middleware fills from the model field) names its
memory under `kvedit_memory`. No vLLM code is patched; see docs/adr/0007-multi-memory.md.

Memories are added, swapped and removed by worker RPCs (`KveditMultiWorkerExtension`), which
run between steps; each memory is followed like the single memory of ADR 0003 (`WorkerMemory`,
with rank 0 deciding under tensor parallelism).
"""

from __future__ import annotations

import logging
import os
import sys
import weakref

import numpy as np
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    get_tp_group,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.models.utils import PPMissingLayer

from editing.multi import NO_MEMORY, MemorySet
from serving.errors import MemoryMismatchError, ServingConfigError, UnsupportedArchitectureError
from serving.fingerprint import served_fingerprint
from serving.memory import KeyShard, MemoryFollower, ResolvedMemory, ServedModel, build_routed
from serving.memory_set import RETIRE_GRACE_S, ServedMemories, admin_error, check_start_memories
from serving.settings import ENV_PREFIX_SALT, MemoryRef, MemorySettings
from serving.vllm_models import RoutedMLP, WorkerMemory, _TensorParallelSync, agreed_capacity
from serving.vllm_worker import KveditWorkerExtension

logger = logging.getLogger(__name__)

XARG = "kvedit_memory"  # SamplingParams.extra_args key: the request's memory ("" = none; absent = default)
ENV_RETIRE_GRACE_S = "KVEDIT_RETIRE_GRACE_S"  # seconds a retired memory stays loaded at least (default 10)


def find_runner(depth: int = 40):
    """The model runner in the caller frames (the one building or running the model), or None.

    The runner owns the persistent input batch the per-token mapping is read from. It is found
    once, when the model is built inside `runner.load_model()`; RPCs re-bind it from the worker.
    """
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if owner is not None and all(hasattr(owner, a) for a in ("input_batch", "requests", "query_start_loc")):
            return owner
        frame = frame.f_back
    return None


def request_memory(params, default: str | None) -> str | None:
    """The memory name a request's SamplingParams chose (None: the base model)."""
    extra = getattr(params, "extra_args", None) or {}
    name = extra.get(XARG, default) if isinstance(extra, dict) else default
    return name or None


class WorkerMemories:
    """A worker's memories: the MemorySet in the routed MLP, the followers behind it, the per-token mapping.

    Same step-boundary interface as `WorkerMemory` (`start`, `boundary`, `status`), so the
    model mixin and the RPCs of `KveditWorkerExtension` drive it unchanged.
    """

    def __init__(self, memories: ServedMemories, memset: MemorySet, runner=None, fixed: bool = False,
                 sync: _TensorParallelSync | None = None):
        self.memories = memories
        self.memset = memset
        self.sync = sync  # under tensor parallelism: rank 0 decides which retired memories to unload
        self._runner = None if runner is None else weakref.ref(runner)
        self.fixed = fixed
        self.started = False
        self.unknown_requests = 0  # requests naming a memory not loaded here (served with the base model)

    def bind(self, runner) -> None:
        if runner is not None and (self._runner is None or self._runner() is not runner):
            self._runner = weakref.ref(runner)

    @property
    def runner(self):
        return None if self._runner is None else self._runner()

    def start(self) -> None:
        """Load the start memories (after the weights are loaded)."""
        if not self.started:
            self.started = True
            self.memories.start_all()

    # ------------------------------------------------------------------ step boundary
    def boundary(self) -> None:
        """Apply staged versions, unload retired memories no request uses, set the per-token mapping."""
        if not self.started:
            self.start()
        self.memories.boundary()
        runner = self.runner
        if runner is None:
            self.memset.set_token_memory([])
            return
        if self.memories.retired:  # the same on every rank: retiring is an RPC to all, unloading is agreed here
            in_use = {request_memory(r.sampling_params, self.memories.default) for r in runner.requests.values()}
            if self.sync is None:
                self.memories.collect(in_use)
            else:  # each rank's own clock would end the grace period at a different step
                leader = self.memories.collectable(in_use) if self.sync.leader else None
                self.memories.collect(names=self.sync.share(leader))
        self._set_mapping(runner)

    def _set_mapping(self, runner) -> None:
        batch = runner.input_batch
        n = batch.num_reqs
        counts = np.diff(runner.query_start_loc.np[: n + 1]) if n else np.zeros(0, dtype=np.int64)
        slots = []
        for rid in batch.req_ids[:n]:
            state = runner.requests.get(rid)
            name = request_memory(state.sampling_params if state is not None else None, self.memories.default)
            slot = self.memset.names.get(name, NO_MEMORY) if name else NO_MEMORY
            if name and slot == NO_MEMORY:
                self.unknown_requests += 1
            slots.append(slot)
        if (counts < 0).any() or counts.sum() > self.memset.max_tokens:
            slots, counts = [], []  # not this step's batch (a dummy run): everything unrouted
        self.memset.set_request_memory(slots, counts)

    # ------------------------------------------------------------------ RPC results
    def status(self, drain: bool = False) -> dict:
        """The default memory's status (the single-memory fields), plus every memory's under "memories"."""
        described = self.memories.describe(drain=drain)
        default = next((m for m in described["memories"] if m["memory"] == described["default"]
                        and not m["retired"]), None)
        out = dict(default) if default is not None else {"memory": None, "version": None, "facts": 0,
                                                         "hits": 0, "tokens": 0, "errors": 0, "reload_seconds": []}
        out.update(multi=True, default=described["default"], layer=described["layer"],
                   memories=described["memories"], unknown_requests=self.unknown_requests)
        return out

    def memory_status(self, name: str | None) -> dict:
        """The status of the memory a new request naming `name` gets (None: the default): applies staged versions.

        {"memory": None} for the base model; {"error": ...} for a memory not served here.
        """
        self.boundary()
        try:
            chosen = self.memories.choose(name)
        except KeyError as exc:
            return {"error": {"status": 404, "type": "memory_not_found", "message": str(exc)}}
        return {"memory": None, "version": None} if chosen is None else chosen.status()

    def resident_status(self, name: str) -> dict | None:
        """The status of a loaded or retiring memory (a request's memory after it ran); nothing applied."""
        m = self.memories.find(name)
        return None if m is None else m.status()

    def admin(self, action: str, memory: str, keep_previous: bool = False) -> dict:
        """swap / add / remove, between steps. {"result": described} or {"error": {status, type, message}}."""
        try:
            if self.fixed:
                raise ServingConfigError("this replica runs compiled graphs: its memory set is fixed at start "
                                         "(restart it, or run it eager, to change memories)")
            if action == "remove":
                result = self.memories.remove(memory)
            elif action == "add":
                result = self.memories.add(MemoryRef.parse(memory))
            elif action == "swap":
                result = self.memories.swap(MemoryRef.parse(memory), keep_previous=keep_previous)
            else:
                raise ServingConfigError(f"unknown admin action {action!r}: swap, add or remove")
        except Exception as exc:
            failure = admin_error(exc)
            if failure is None:
                logger.exception("kvedit admin %s %s failed", action, memory)
                failure = (500, "internal_error", f"{type(exc).__name__}: {exc}")
            return {"error": {"status": failure[0], "type": failure[1], "message": failure[2]}}
        self.boundary()
        return {"result": result}


# ---------------------------------------------------------------------------------------------- building


def served_model(vllm_config: VllmConfig) -> ServedModel:
    path = vllm_config.model_config.model
    if not os.path.isdir(path):
        raise ServingConfigError(f"kvedit serves local model folders (to fingerprint them); got {path!r}")
    text = vllm_config.model_config.hf_config.get_text_config()
    return ServedModel(served_fingerprint(path), text.num_hidden_layers, text.intermediate_size, text.hidden_size)


def attach_memories(model: nn.Module, vllm_config: VllmConfig, settings: MemorySettings) -> WorkerMemories | None:
    """Route `model`'s edit layer through a MemorySet and prepare the start memories (loaded with the weights)."""
    served = served_model(vllm_config)
    layer_index = check_start_memories(settings, served)  # a wrong memory: the engine does not start
    if layer_index is None:
        raise ServingConfigError("a multi-memory replica without start memories needs KVEDIT_LAYER (kvedit serve --layer)")
    if not 0 <= layer_index < served.n_layers:
        raise ServingConfigError(f"layer {layer_index} is out of range: the served model has {served.n_layers} layers")
    if vllm_config.cache_config.enable_prefix_caching and os.environ.get(ENV_PREFIX_SALT) != "1":
        raise ServingConfigError(
            "prefix caching is on, and a multi-memory replica must salt prefix-cache keys per memory version: start it "
            f"with `--middleware serving.vllm_multi_middleware.KveditMultiMiddleware` and {ENV_PREFIX_SALT}=1 (what "
            "`kvedit serve` does) or with --no-enable-prefix-caching")
    layer = model.model.layers[layer_index]
    if isinstance(layer, PPMissingLayer):
        logger.info("layer %d lives on another pipeline stage; no memory here", layer_index)
        return None
    mlp = layer.mlp
    missing = [a for a in ("gate_up_proj", "down_proj", "act_fn") if not hasattr(mlp, a)]
    if missing:
        raise UnsupportedArchitectureError(f"{type(mlp).__name__} has no {', '.join(missing)}: cannot route it")
    tp = get_tensor_model_parallel_world_size()
    d_local = mlp.down_proj.input_size_per_partition
    if d_local * tp != served.d_key or mlp.down_proj.output_size_per_partition != served.d_model:
        raise MemoryMismatchError(f"layer {layer_index} down-projection is [{d_local}x{tp} -> "
                                  f"{mlp.down_proj.output_size_per_partition}], not [{served.d_key} -> {served.d_model}]")
    rank = get_tp_group().rank_in_group if tp > 1 else 0
    shard = None if tp == 1 else KeyShard(rank * d_local, (rank + 1) * d_local,
                                          lambda t: tensor_model_parallel_all_gather(t, dim=-1))
    sync = _TensorParallelSync() if tp > 1 else None
    fixed = not vllm_config.model_config.enforce_eager

    def open_memory(resolved: ResolvedMemory) -> tuple[MemoryFollower, WorkerMemory]:
        capacity = agreed_capacity(resolved, settings.capacity, fixed, sync)
        routed = build_routed(resolved, capacity=capacity, shard=shard, device=memset.token_memory.device)
        if tp > 1:
            routed.reduce = tensor_model_parallel_all_reduce
        follower = MemoryFollower(resolved, routed, poll_seconds=settings.poll_seconds, shard=shard,
                                  fixed_capacity=fixed, watch=rank == 0)
        handle = WorkerMemory(follower, sync)
        handle.start()
        return follower, handle

    max_tokens = max(vllm_config.scheduler_config.max_num_batched_tokens,
                     getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0)
    memset = MemorySet(max_tokens)
    memories = ServedMemories(served, settings, layer_index, open_memory=open_memory, on_load=memset.put,
                              on_unload=lambda name, _routed: memset.pop(name),
                              grace_s=float(os.environ.get(ENV_RETIRE_GRACE_S) or RETIRE_GRACE_S))
    layer.mlp = RoutedMLP(mlp, memset)  # MemorySet.forward(key, base) is RoutedFFN's signature
    logger.info("routing layer %d through a memory set (start: %s; default: %s; up to %d tokens per step%s)",
                layer_index, ", ".join(str(r) for r in settings.start_memories()) or "none", settings.memory,
                max_tokens, ", fixed" if fixed else "")
    runner = find_runner()
    if runner is None:  # bound by the first kvedit RPC instead; until then every token gets the base model
        logger.warning("kvedit: the model runner is not among the callers; waiting for a kvedit RPC to bind it")
    return WorkerMemories(memories, memset, runner, fixed, sync)


# ---------------------------------------------------------------------------------------------- RPCs


class KveditMultiWorkerExtension(KveditWorkerExtension):
    """`--worker-extension-cls serving.vllm_multi.KveditMultiWorkerExtension`: the single-memory RPCs
    (`kvedit_sync`, `kvedit_status`) plus per-memory status and the admin operations."""

    def _kvedit_memory(self):
        memory = super()._kvedit_memory()
        if isinstance(memory, WorkerMemories):
            memory.bind(self.model_runner)  # type: ignore[attr-defined]
        return memory

    def _kvedit_memories(self) -> WorkerMemories:
        memory = self._kvedit_memory()
        if not isinstance(memory, WorkerMemories):
            raise ServingConfigError("this worker serves no memory set (start it with KVEDIT_MEMORIES)")
        return memory

    def kvedit_memory_sync(self, name: str | None = None) -> dict:
        """Apply staged versions; the status of the memory a request naming `name` gets (None: the default)."""
        return self._kvedit_memories().memory_status(name)

    def kvedit_memory_status(self, name: str) -> dict | None:
        """A resident memory's status, nothing applied (None: not resident)."""
        return self._kvedit_memories().resident_status(name)

    def kvedit_admin(self, action: str, memory: str, keep_previous: bool = False) -> dict:
        """swap / add / remove a memory between two steps; {"result": ...} or {"error": ...}."""
        return self._kvedit_memories().admin(action, memory, keep_previous)
