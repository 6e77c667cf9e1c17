"""A replica's memory: check it against the served model, load a version, follow new ones.

One implementation serves both backends:

    resolved = resolve_memory(settings, served)       # store + spec check; fails fast at start
    routed = build_routed(resolved)                    # the core RoutedFFN, empty
    follower = MemoryFollower(resolved, routed, ...)
    follower.load()                                    # the start version, applied now
    follower.start()                                   # watcher thread (not for NAME@VERSION)
    ...
    follower.step_boundary()                           # apply staged versions (no forward running)

The watcher thread never touches the routed buffers while a forward may run: it fetches
`MemoryStore.changes(since)` deltas, turns them into tensors and *stages* them. They are
applied by `step_boundary()` (or `apply()`), which holds `routed.lock` and applies every
staged version in order, so each forward step sees exactly one version. The HF backend
lets the watcher apply directly (`auto_apply=True`) once no request holds `routed.lock`
(each request also applies what is staged when it starts); vLLM applies at the model's outer forward and at the `kvedit_sync` RPC.

The watcher subscribes to the memory's Redis channel. When Redis is unreachable it polls
the store (which needs no Redis to read) every `poll_seconds` and retries Redis with
exponential backoff; after (re)subscribing it checks the store head, so commits announced
while it was disconnected are never missed. Even while subscribed it re-checks the head
every `RESYNC_SECONDS` (a writer killed between commit and notification publishes nothing).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

import redis
import torch

from editing.models import cache_dir
from editing.routed import RoutedFFN
from editing.routers import ROUTERS, Router, make_router
from editing.stats import SecondMoment
from editing.table import MemoryMismatchError, MemorySpec, table_tensors
from serving.errors import MemoryFollowError, ServingConfigError
from serving.settings import MemorySettings
from store import MemoryInfo, MemoryStore, StoreError, StoreUnavailableError, VersionNotFoundError
from store.artifacts import read_robust_keys, read_second_moment

logger = logging.getLogger(__name__)

RESYNC_SECONDS = 15.0  # head check while subscribed (missed notifications)
MAX_BACKOFF_SECONDS = 30.0  # longest wait between Redis reconnection attempts (at most 10 polls)
MAX_PENDING = 8  # staged deltas beyond this are collapsed into one snapshot
MAX_APPLY_FAILURES = 5  # a version that fails to apply this many times in a row stops following (restart the replica)


@dataclass(frozen=True)
class ServedModel:
    """What a replica serves: fingerprint, layer count and full (unsharded) FFN sizes."""

    fingerprint: str
    n_layers: int
    d_key: int
    d_model: int


@dataclass(frozen=True)
class KeyShard:
    """This tensor-parallel rank's key columns [start, end) and an all-gather over the TP group.

    `gather` maps [n, end - start] on every rank to [n, d_key] (ranks concatenated in order).
    """

    start: int
    end: int
    gather: Callable[[torch.Tensor], torch.Tensor]


class ShardedAdapter(torch.nn.Module):
    """A REP adapter on one tensor-parallel rank: gathers the full key, adapts it, keeps this rank's columns.

    forward: key [T, end - start] -> [T, end - start].
    """

    def __init__(self, adapter: torch.nn.Module, shard: "KeyShard"):
        super().__init__()
        self.adapter, self.shard = adapter, shard

    def forward(self, key: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.shard.gather(key))[:, self.shard.start:self.shard.end]


@dataclass
class ResolvedMemory:
    """A memory checked against the served model: its store, the version to load first, the spec."""

    store: MemoryStore
    info: MemoryInfo
    spec: MemorySpec
    pinned: bool

    @property
    def name(self) -> str:
        return self.info.name


def resolve_memory(settings: MemorySettings, served: ServedModel) -> ResolvedMemory:
    """Open the store and check the memory's spec (fingerprint, layer, sizes) against the served model.

    Raises `MemoryMismatchError` for a memory built for another model or layer (or when
    KVEDIT_LAYER disagrees with it), `store.MemoryNotFoundError` / `VersionNotFoundError`
    for a missing memory or version.
    """
    if settings.memory is None:
        raise ServingConfigError("no memory to serve (set KVEDIT_MEMORY=NAME[@VERSION] or pass --memory)")
    ref = settings.memory
    store = MemoryStore(settings.store, settings.redis_url)
    info = store.info(ref.name, ref.version)
    layer = info.spec.layer
    where = f"memory {ref.name!r} v{info.version}"
    if settings.layer is not None and settings.layer != layer:
        raise MemoryMismatchError(
            f"{where} is bound to layer {layer}, but the replica was told to edit layer {settings.layer} "
            f"(KVEDIT_LAYER); unset KVEDIT_LAYER or serve a memory built for layer {settings.layer}"
        )
    if not 0 <= layer < served.n_layers:
        raise MemoryMismatchError(f"{where} is bound to layer {layer}, but the served model has {served.n_layers} layers")
    expected = MemorySpec(served.fingerprint, layer, served.d_key, served.d_model)
    try:
        info.check(expected)
    except MemoryMismatchError as exc:
        raise MemoryMismatchError(
            f"{exc}. This replica serves model {served.fingerprint} (d_key={served.d_key}, d_model={served.d_model}); "
            "serve the model the memory was built on, or rebuild the memory on this model"
        ) from exc
    return ResolvedMemory(store, info, expected, pinned=ref.version is not None)


# ---------------------------------------------------------------------------------------------- routers


def load_second_moment(spec: MemorySpec, store: MemoryStore | None, key: str | None = None) -> SecondMoment:
    """C0 of the edit layer for the whitened router (`store.artifacts.read_second_moment`: the artifact
    `key` names, else the newest of the model and layer in the store, else the local cache)."""
    try:
        found = read_second_moment(store, spec.model_fingerprint, spec.layer, key)
    except StoreError as exc:
        raise ServingConfigError(f"the whitened router's statistics: {exc}") from exc
    if found is None:
        raise ServingConfigError(
            f"the whitened router needs C0 statistics of layer {spec.layer} of model {spec.model_fingerprint}: "
            f"none in the store nor in {cache_dir() / 'stats'}; "
            "compute them once with Editor.stats() on this host or put them in the store"
        )
    return found


def make_memory_router(config: dict, spec: MemorySpec, store: MemoryStore | None) -> tuple[Router, float | None]:
    """(router, threshold) from a memory's router config `{"name", "threshold", **router kwargs}`.

    A missing name means "cosine"; a missing threshold means the router's default. Keys the
    router's constructor does not take are ignored.
    """
    cfg = dict(config or {})
    name = cfg.pop("name", None) or "cosine"
    threshold = cfg.pop("threshold", None)
    if name not in ROUTERS:
        raise ServingConfigError(f"memory router {name!r} is unknown; known: {', '.join(sorted(ROUTERS))}")
    params = inspect.signature(ROUTERS[name].__init__).parameters
    kwargs = {k: v for k, v in cfg.items() if k in params and k not in ("self", "c0", "stats")}
    stats = load_second_moment(spec, store, cfg.get("stats")) if name == "whitened" else None
    return make_router(name, stats=stats, **kwargs), (None if threshold is None else float(threshold))


class ShardedRouter(Router):
    """A router for one tensor-parallel rank holding key columns [start, end).

    Rows are derived from the *full* keys (all-gathered from the ranks' slices: cosine and
    whitened rows are not separable by columns), then sliced. Query scales and gates are
    the inner router's; RoutedFFN's `reduce` all-reduces partial dot products and norms.
    """

    def __init__(self, inner: Router, shard: KeyShard):
        super().__init__()
        self.inner = inner
        self.shard = shard
        self.name = inner.name
        self.default_threshold = inner.default_threshold

    def derive_rows(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys [n, end - start] (this rank's slice) -> rows [n, end - start], gains [n]."""
        rows, gain = self.inner.derive_rows(self.shard.gather(keys))
        return rows[:, self.shard.start:self.shard.end].contiguous(), gain

    def query_scale(self, sq_norm: torch.Tensor) -> torch.Tensor:
        return self.inner.query_scale(sq_norm)

    def weight(self, score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return self.inner.weight(score, threshold)

    def config(self) -> dict:
        return self.inner.config()


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def default_capacity(n_rows: int) -> int:
    """Slots of a routed layer whose buffers can grow: the next power of two holding n_rows (at least 64)."""
    return next_pow2(max(64, n_rows))


def build_routed(resolved: ResolvedMemory, capacity: int | None = None, shard: KeyShard | None = None,
                 device: torch.device | str | None = None) -> RoutedFFN:
    """An empty RoutedFFN for the memory's router and sizes (this rank's key slice under TP).

    Default capacity: `default_capacity` of the start version's rows.
    """
    router, threshold = make_memory_router(resolved.info.router, resolved.spec, resolved.store)
    if shard is not None:
        router = ShardedRouter(router, shard)
    d_key = resolved.spec.d_key if shard is None else shard.end - shard.start
    cap = capacity or default_capacity(resolved.info.n_rows)
    routed = RoutedFFN(router, d_key, resolved.spec.d_model, capacity=cap, threshold=threshold, device=device)
    routed.float()  # fp32 memory and threshold whatever the model's default dtype (bool/long buffers stay)
    routed.memory_name = resolved.name
    return routed


# ---------------------------------------------------------------------------------------------- following


@dataclass
class StagedUpdate:
    """One memory version, ready to apply.

    `base_version` None means a snapshot: after applying, the memory holds exactly these rows.
    keys [n, d_key] (full width), residuals [n, d_model], float32 CPU.
    """

    version: int
    base_version: int | None
    added_ids: list[str]
    keys: torch.Tensor
    residuals: torch.Tensor
    deleted_ids: list[str]
    router: dict
    n_rows: int
    committed_at: float | None = None  # unix seconds
    staged_at: float = field(default_factory=time.time)
    query_adapter: torch.nn.Module | None = None  # REP robust keys named by `router` (loaded while staging)
    problem: str | None = None  # why this version cannot be served (e.g. its adapter cannot be read)


def _timestamp(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


class MemoryFollower:
    """Loads a memory into a RoutedFFN and keeps it at the store's latest version.

    Args:
        resolved: the checked memory (`resolve_memory`).
        routed: the RoutedFFN the model calls (`build_routed`).
        poll_seconds: store polling interval while Redis is unreachable.
        auto_apply: apply staged versions from the watcher thread once `routed.lock` is free (the
            HF backend, whose requests hold it and apply at their start); otherwise the owner calls
            `step_boundary()`.
        shard: this rank's key slice under tensor parallelism.
        fixed_capacity: never grow the buffers (compiled graphs / CUDA graphs hold their
            addresses); a version with more rows than `routed.capacity` is refused.
        watch: run the watcher (False on TP ranks that receive updates from rank 0).
    """

    def __init__(self, resolved: ResolvedMemory, routed: RoutedFFN, *, poll_seconds: float = 2.0,
                 auto_apply: bool = False, shard: KeyShard | None = None, fixed_capacity: bool = False,
                 watch: bool = True):
        self.store = resolved.store
        self.name = resolved.name
        self.spec = resolved.spec
        self.start_version = resolved.info.version
        self.pinned = resolved.pinned
        self.routed = routed
        self.poll_seconds = poll_seconds
        self.max_backoff = min(MAX_BACKOFF_SECONDS, 10 * poll_seconds)
        self.auto_apply = auto_apply
        self.shard = shard
        self.fixed_capacity = fixed_capacity
        self.watch = watch and not resolved.pinned
        self.router_name = (resolved.info.router or {}).get("name") or "cosine"
        self._pending: list[StagedUpdate] = []
        self._basis: torch.Tensor | None = None  # prefilter basis fitted by the watcher, set at the next boundary
        self.basis_pending = False  # a basis is being fitted or waits for the boundary
        self._stage_lock = threading.Lock()
        # Taking staged versions and applying them is one step: the watcher (auto_apply) and request threads
        # (step boundaries) both apply, and a later delta applied before an earlier one would be refused.
        self._apply_lock = threading.RLock()
        self._staged_version: int | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=1024)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.redis_connected = False
        self.errors = 0
        self.last_error: str | None = None
        self.blocked_version: int | None = None
        self._adapter_key: str | None = None  # artifact of the last REP adapter read, and the module
        self._adapter: torch.nn.Module | None = None
        self._problem_version: int | None = None  # the last version refused by `_unservable`
        self._resync_at: float | None = None  # re-stage from the loaded version at the watcher's turn after this
        self._apply_failures = 0  # consecutive failed applies of `_failing_version` (backoff, then blocked)
        self._failing_version: int | None = None

    # ------------------------------------------------------------------ reading the store
    def _with_adapter(self, u: StagedUpdate) -> StagedUpdate:
        """Load the REP adapter `u.router["robust_keys"]` names (once per artifact), off the step path."""
        ref = (u.router or {}).get("robust_keys")
        if not ref:
            return u
        key = ref.get("artifact") if isinstance(ref, dict) else None
        if key is not None and key == self._adapter_key:
            u.query_adapter = self._adapter
            return u
        try:
            adapter = read_robust_keys(self.store, u.router, self.spec.d_key, f"memory {self.name!r} v{u.version}")
        except StoreError as exc:  # missing, torn or foreign: refuse the version, keep serving the last one
            u.problem = str(exc)
            return u
        adapter = adapter.to(self.routed.rows.device)
        if self.shard is not None:
            adapter = ShardedAdapter(adapter, self.shard)
        self._adapter_key, self._adapter = key, adapter
        u.query_adapter = adapter
        return u

    def portable(self, u: StagedUpdate) -> StagedUpdate:
        """`u` as rank 0 sends it to the other tensor-parallel ranks (pickled): the unsharded adapter, on the CPU.

        This rank's `ShardedAdapter` holds an all-gather closure and this rank's columns; neither may travel.
        """
        adapter = u.query_adapter
        if isinstance(adapter, ShardedAdapter):
            adapter = adapter.adapter
        if adapter is not None:
            adapter = copy.deepcopy(adapter).cpu()
        return dataclasses.replace(u, query_adapter=adapter)

    def localize(self, u: StagedUpdate) -> StagedUpdate:
        """A `portable` update received from rank 0, with its adapter on this rank's device and key columns."""
        adapter = u.query_adapter
        if adapter is not None:
            adapter = adapter.to(self.routed.rows.device)
            if self.shard is not None:
                adapter = ShardedAdapter(adapter, self.shard)
        return dataclasses.replace(u, query_adapter=adapter)

    def _snapshot(self, version: int | None) -> StagedUpdate:
        info, table = self.store.load(self.name, version, spec=self.spec)
        ids, keys, res = table_tensors(table, self.spec)
        return self._with_adapter(StagedUpdate(info.version, None, ids, keys, res, [], info.router, info.n_rows,
                                               committed_at=_timestamp(info.committed_at)))

    def _delta(self, since: int, until: int | None, committed_at: float | None) -> StagedUpdate | None:
        try:
            d = self.store.changes(self.name, since, until)
        except VersionNotFoundError:  # `since` was compacted away: read the whole version instead
            logger.info("memory %r: v%d is no longer in the store; reloading the whole memory", self.name, since)
            return self._snapshot(until)
        if d.to_version <= since:
            return None
        ids, keys, res = table_tensors(d.added, self.spec)
        if committed_at is None or until != d.to_version:
            committed_at = _timestamp(self.store.info(self.name, d.to_version).committed_at)
        return self._with_adapter(StagedUpdate(d.to_version, since, ids, keys, res, list(d.deleted), d.router,
                                               d.n_rows, committed_at=committed_at))

    # ------------------------------------------------------------------ staging and applying
    def load(self, version: int | None = None) -> None:
        """Read one version whole (the resolved start version by default) and apply it now."""
        update = self._snapshot(self.start_version if version is None else version)
        with self._apply_lock:
            with self._stage_lock:
                self._pending.clear()
                self._staged_version = update.version
            self.apply([update], measure=False)
        r = self.routed
        if r.version != update.version:
            raise MemoryFollowError(self.last_error or f"memory {self.name!r} v{update.version} could not be loaded")
        if r.prefilter_dim and r.n_facts >= r.prefilter_min_rows and not self.fixed_capacity and self.shard is None:
            r.fit_basis()  # not per TP rank: each would fit its own basis to its own key columns
        logger.info("memory %r v%d loaded: %d facts at layer %d", self.name, update.version, r.n_facts, self.spec.layer)

    def stage(self, update: StagedUpdate, replace: bool = False) -> None:
        """Queue a version for the next step boundary (`replace`: drop what is queued, `update` is a snapshot)."""
        with self._stage_lock:
            if replace:
                self._pending = [update]
            else:
                self._pending.append(update)
            self._staged_version = update.version
        logger.info("memory %r v%d staged (%d added, %d deleted)", self.name, update.version,
                    len(update.added_ids), len(update.deleted_ids))
        if self.auto_apply:
            self._apply_when_idle()
        self._fit_basis(update)

    def take_pending(self) -> list[StagedUpdate]:
        """Remove and return the staged versions, oldest first."""
        if not self._pending:  # cheap check on every step
            return []
        with self._stage_lock:
            out, self._pending = self._pending, []
        return out

    def step_boundary(self) -> bool:
        """Apply every staged version. Call only when no forward is running. True if the version changed."""
        return self.apply_pending()

    def apply_pending(self) -> bool:
        if not self._pending and self._basis is None:  # cheap check on every step
            return False
        with self._apply_lock:
            updates = self.take_pending()
            changed = self.apply(updates) if updates else False
            if self._basis is not None:
                with self._stage_lock:
                    basis, self._basis = self._basis, None
                self.routed.set_basis(basis)  # re-projects every row: once, when the memory first grows large
                self.basis_pending = False
                logger.info("memory %r: prefilter basis set (%d facts)", self.name, self.routed.n_facts)
        return changed

    def _apply_when_idle(self) -> None:
        """The watcher's apply (auto_apply): wait until no request holds `routed.lock`, then apply.

        The staged versions stay queued while it waits, so a request that starts first applies them
        at its own boundary; taking them and then waiting for the lock would let a stream of requests
        run on the old version. Lock order elsewhere is `_apply_lock` then `routed.lock`, so here the
        apply lock is only tried: when a request thread holds it, that thread is applying anyway.
        """
        r = self.routed
        while (self._pending or self._basis is not None) and not self._stop.is_set():
            if not r.lock.acquire(timeout=0.05):
                continue
            try:
                if self._apply_lock.acquire(blocking=False):
                    try:
                        self.apply_pending()
                    finally:
                        self._apply_lock.release()
                    return
            finally:
                r.lock.release()
            time.sleep(0.001)

    def apply(self, updates: list[StagedUpdate], measure: bool = True) -> bool:
        """Apply versions in order under `routed.lock` (one atomic change for the forward)."""
        r = self.routed
        applied: list[StagedUpdate] = []
        t0 = time.time()
        with r.lock:
            for u in updates:
                if u.version <= (r.version if r.version is not None else -1) and u.base_version is not None:
                    continue
                if u.base_version is not None and u.base_version != r.version:
                    self._restage(f"memory {self.name!r}: delta v{u.base_version}->v{u.version} does not start at "
                                  f"the loaded v{r.version}; staging again from v{r.version}")
                    break
                problem = self._refusal(u)
                if problem:
                    self._fail(problem)
                    self.blocked_version = u.version
                    break
                keys = u.keys if self.shard is None else u.keys[:, self.shard.start:self.shard.end]
                if u.base_version is None:
                    keep = set(u.added_ids)
                    deleted = [e for e in r.slots if e not in keep]
                else:
                    deleted = u.deleted_ids
                try:
                    r.apply(u.added_ids, keys, u.residuals, deleted, version=u.version)
                except (RuntimeError, ValueError) as exc:  # out of memory, rows the router refuses: unchanged
                    self._restage(f"memory {self.name!r}: v{u.version} could not be applied ({exc}); serving "
                                  f"v{r.version}", failed=u.version)
                    break
                self._apply_failures, self._failing_version = 0, None
                thr = (u.router or {}).get("threshold")
                r.threshold.fill_(r.router.default_threshold if thr is None else float(thr))
                r.query_adapter = u.query_adapter
                applied.append(u)
        now = time.time()
        for u in applied:
            if measure and u.committed_at is not None:
                self._latencies.append(max(0.0, now - u.committed_at))
            logger.info("memory %r v%d applied (%d facts; staged %.3fs after the commit, waited %.3fs for the "
                        "boundary, applied in %.3fs)", self.name, u.version, r.n_facts,
                        u.staged_at - (u.committed_at or u.staged_at), t0 - u.staged_at, now - t0)
        return bool(applied)

    def retry_later(self, message: str, failed: int) -> None:
        """`failed` did not apply elsewhere (another TP rank): stage again from the loaded version after the
        backoff `_restage` keeps, as if it had failed here."""
        with self.routed.lock:
            self._restage(message, failed=failed)

    def _restage(self, message: str, failed: int | None = None) -> None:
        """A staged version did not apply and left the layer as it was: drop what is staged (later deltas
        build on it) and have the watcher stage again from the loaded version. Under `routed.lock`.

        `failed`: the version whose apply raised. It is tried again after a backoff that doubles from
        `poll_seconds` (up to `max_backoff`); after `MAX_APPLY_FAILURES` failures in a row the replica
        stops following (`blocked_version`) and keeps serving what it has. A newer commit is tried at once.
        """
        delay = 0.0
        if failed is not None:
            self._apply_failures = self._apply_failures + 1 if failed == self._failing_version else 1
            self._failing_version = failed
            if self._apply_failures >= MAX_APPLY_FAILURES:
                message += f"; {self._apply_failures} failures in a row: not following any more (restart the replica)"
                self.blocked_version = failed
            else:
                delay = min(self.max_backoff, self.poll_seconds * 2 ** (self._apply_failures - 1))
                message += f"; trying again in {delay:.1f}s"
        self._fail(message)
        with self._stage_lock:
            self._pending.clear()
            self._staged_version = self.routed.version
        self._resync_at = time.monotonic() + delay

    def _resync_due(self) -> bool:
        """True (once) when `_restage` asked for the versions to be staged again and its backoff is over."""
        at = self._resync_at
        if at is None or time.monotonic() < at:
            return False
        self._resync_at = None
        return True

    def _refusal(self, u: StagedUpdate) -> str | None:
        """Why `u` can never be served by this replica (it stops following until restarted), or None."""
        if u.problem:
            return u.problem
        r = self.routed
        name = (u.router or {}).get("name") or "cosine"
        if name != self.router_name:
            return (f"memory {self.name!r} v{u.version} switched router {self.router_name!r} -> {name!r}; "
                    "a replica cannot change routers live: restart it to serve this version")
        if self.fixed_capacity and u.n_rows > r.capacity:
            return (f"memory {self.name!r} v{u.version} has {u.n_rows} rows but this replica's buffers are fixed at "
                    f"{r.capacity} (compiled graph); restart with KVEDIT_CAPACITY >= {u.n_rows} or in eager mode")
        return None

    def _fail(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        logger.error("%s", message)

    # ------------------------------------------------------------------ watching
    def start(self) -> None:
        """Start the watcher thread (no-op for a pinned version or a non-watching rank)."""
        if not self.watch or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"kvedit-follow-{self.name}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.store.close()

    def _is_ours(self, msg: dict) -> bool:
        # Stores sharing one Redis share the channel name; the message carries the store URI.
        return msg.get("memory", self.name) == self.name and msg.get("store", self.store.root) == self.store.root

    def catch_up(self, version: int | None = None, committed_at: float | None = None) -> bool:
        """Stage everything after the staged version, up to `version` (latest if None). True if staged."""
        base = self._staged_version
        if base is None:
            raise MemoryFollowError(f"memory {self.name!r}: load() must run before following")
        if version is not None and version <= base:
            return False
        if self.blocked_version is not None:
            return False
        if len(self._pending) >= MAX_PENDING:
            update = self._snapshot(version)
            if update.version <= base or self._unservable(update):
                return False
            self.stage(update, replace=True)
            return True
        update = self._delta(base, version, committed_at)
        if update is None or self._unservable(update):
            return False
        self.stage(update, replace=update.base_version is None)
        return True

    def _unservable(self, update: StagedUpdate) -> bool:
        """A version that cannot be served (its adapter cannot be read) is not staged: the replica keeps
        its version and stages the next good one as one delta from there. Reported once per version."""
        if not update.problem:
            return False
        if update.version != self._problem_version:
            self._problem_version = update.version
            self._fail(update.problem)
        return True

    def _fit_basis(self, update: StagedUpdate) -> None:
        """Fit the prefilter basis off the step path when deltas grew the memory past the prefilter size.

        `load()` fits it for a memory that starts large; one that grows through deltas would
        otherwise score every row exactly forever. The fit (an eigendecomposition, seconds on
        CPU) runs here in the watcher, on a scratch RoutedFFN over the version's keys; the next
        step boundary only sets it. Not under tensor parallelism (ranks would have to agree)
        nor with fixed buffers (a compiled graph has `use_prefilter` baked in).
        """
        r = self.routed
        if (self.shard is not None or self.fixed_capacity or not r.prefilter_dim or r.has_basis
                or self._basis is not None or update.n_rows < r.prefilter_min_rows):
            return
        self.basis_pending = True
        t0 = time.perf_counter()
        try:
            keys = update.keys if update.base_version is None else self._snapshot(update.version).keys
            scratch = RoutedFFN(r.router, r.d_key, r.d_model, capacity=1, prefilter_dim=r.prefilter_dim)
            scratch.fit_basis(keys)
        except BaseException:
            self.basis_pending = False  # tried again with the next version
            raise
        with self._stage_lock:
            self._basis = scratch.basis
        logger.info("memory %r: prefilter basis fitted on v%d's %d keys in %.1fs", self.name, update.version,
                    keys.shape[0], time.perf_counter() - t0)
        if self.auto_apply:
            self._apply_when_idle()

    def _run(self) -> None:
        sub = None
        backoff = self.poll_seconds
        next_connect = 0.0
        next_resync = 0.0
        outage_logged = False
        while not self._stop.is_set():
            try:
                if sub is None and time.monotonic() >= next_connect:
                    sub = self.store.subscribe(self.name)
                    self.redis_connected = True
                    backoff = self.poll_seconds
                    if outage_logged:
                        logger.info("memory %r: Redis is back; following notifications again", self.name)
                    outage_logged = False
                    self.catch_up()  # whatever was committed while we were not subscribed
                    next_resync = time.monotonic() + RESYNC_SECONDS
                if sub is None:  # Redis down: poll the store
                    if self._stop.wait(self.poll_seconds):
                        break
                    if self._resync_at is None or self._resync_due():  # not during a failed apply's backoff
                        self.catch_up()
                    continue
                msg = sub.get(timeout=min(self.poll_seconds, 1.0))
                resync = self._resync_due()
                if msg is not None and not resync:
                    if self._is_ours(msg):
                        self.catch_up(int(msg["version"]), _timestamp(msg.get("committed_at")))
                elif resync or (time.monotonic() >= next_resync and self._resync_at is None):
                    self.catch_up()
                    next_resync = time.monotonic() + RESYNC_SECONDS
            except (redis.RedisError, StoreUnavailableError, ConnectionError) as exc:
                if sub is not None:
                    sub.close()
                    sub = None
                self.store.close()  # drop the dead client; the next subscribe reconnects
                self.redis_connected = False
                if not outage_logged:
                    logger.warning("memory %r: Redis unreachable (%s); serving v%s, polling the store every %.1fs "
                                   "and retrying Redis", self.name, exc, self.routed.version, self.poll_seconds)
                    outage_logged = True
                next_connect = time.monotonic() + backoff
                backoff = min(backoff * 2, self.max_backoff)
            except (StoreError, MemoryFollowError, MemoryMismatchError, ValueError, OSError) as exc:
                self._fail(f"memory {self.name!r}: cannot follow new versions: {exc}")
                self._stop.wait(self.poll_seconds)
            except Exception:  # never let the watcher die silently
                logger.exception("memory %r: watcher error", self.name)
                self.errors += 1
                self._stop.wait(self.poll_seconds)
        if sub is not None:
            sub.close()
        self.store.close()  # a client opened after close() gave up waiting for this thread

    # ------------------------------------------------------------------ reporting
    def status(self, drain: bool = False) -> dict:
        """Version, size, router counters and (drained) reload latencies, JSON/msgpack-friendly."""
        r = self.routed
        latencies: list[float] = []
        if drain:
            while self._latencies:
                latencies.append(self._latencies.popleft())
        return {
            "memory": self.name,
            "version": r.version,
            "pinned": self.pinned,
            "facts": r.n_facts,
            "capacity": r.capacity,
            "prefilter": r.use_prefilter,
            "prefilter_pending": self.basis_pending,
            "robust_keys": self._adapter_key if r.query_adapter is not None else None,
            "layer": self.spec.layer,
            "hits": int(r.hits),
            "tokens": int(r.tokens),
            "staged_version": self._staged_version,
            "redis": self.redis_connected,
            "errors": self.errors,
            "last_error": self.last_error,
            "reload_seconds": latencies,
        }
