"""The memories one replica serves, and the admin operations on them (both backends).

    memories = ServedMemories(served, settings, layer)
    memories.add(MemoryRef("eu-facts"))          # checked, loaded, followed
    memories.swap(MemoryRef.parse("facts@12"))   # becomes the default memory; the previous default retires
    memories.remove("eu-facts")                  # retires
    memories.choose("eu-facts") / choose(None)   # the memory of one request (None: the default)

Each memory is checked against the served model (fingerprint, layer, sizes) and loaded
*before* anything changes, so a refused or failing memory leaves the replica as it was. The
switch itself (`_install`, `_unload`) is cheap; the owner runs it between forward steps (vLLM:
in a worker RPC; HF: under the generation lock).

The default memory is what a request for the plain model name gets. A replica started with one
memory has it as default (issue 5 behaviour); one started with several has none, so the plain
name is the base model, until a swap names one.

A retired memory stays loaded while requests that chose it may still run (`collect(in_use)`
unloads it once none does and `grace_s` has passed since it retired), so a request is served by
one memory from its first token to its last, even across a swap. New requests cannot choose it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from editing.routed import RoutedFFN
from serving.errors import MemoryFollowError, MemoryMismatchError, ServingConfigError
from serving.memory import MemoryFollower, ResolvedMemory, ServedModel, build_routed, resolve_memory
from serving.settings import MemoryRef, MemorySettings

logger = logging.getLogger(__name__)

RETIRE_GRACE_S = 10.0  # longer than a request takes from the front-end's memory choice to the engine


class UnknownMemoryError(ServingConfigError, KeyError):
    """A request or admin call named a memory this replica does not serve."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


@dataclass
class LoadedMemory:
    """One served memory: its follower (routed layer inside) and, once retired, when."""

    ref: MemoryRef
    follower: MemoryFollower
    handle: object = None  # backend's per-memory object (vLLM: WorkerMemory, with TP agreement)
    retired_at: float | None = None
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.follower.name

    @property
    def routed(self) -> RoutedFFN:
        return self.follower.routed

    def status(self, drain: bool = False) -> dict:
        source = self.handle if hasattr(self.handle, "status") else self.follower
        out = source.status(drain=drain)
        out["retired"] = self.retired_at is not None
        return out


def follow(resolved: ResolvedMemory, settings: MemorySettings, auto_apply: bool = False,
           device: str | None = None) -> MemoryFollower:
    """A follower of a checked memory, its start version loaded and its watcher started."""
    routed = build_routed(resolved, capacity=settings.capacity, device=device)
    follower = MemoryFollower(resolved, routed, poll_seconds=settings.poll_seconds, auto_apply=auto_apply)
    follower.load()
    follower.start()
    return follower


def check_start_memories(settings: MemorySettings, served: ServedModel) -> int | None:
    """Check every start memory against the served model (MemoryMismatchError, store errors); the routed layer.

    Every memory of one replica routes the same layer: KVEDIT_LAYER, else the first memory's.
    """
    from dataclasses import replace

    layer = settings.layer
    for ref in settings.start_memories() if settings.multi else [settings.memory]:
        if ref is None:
            continue
        resolved = resolve_memory(replace(settings, memory=ref, layer=layer), served)
        resolved.store.close()
        layer = resolved.spec.layer
    return layer


class ServedMemories:
    """name -> LoadedMemory, plus the default memory.

    Args:
        served: the served model (fingerprint, layer count, FFN sizes).
        settings: store, Redis, capacity and polling shared by every memory.
        layer: the routed layer; None takes the first memory's (every later one must match).
        open_memory: builds, loads and starts following a checked memory; returns the follower
            and the backend's handle for it (default: `follow`, no handle).
        on_load / on_unload: called when a memory enters or leaves the routed layer (between steps).
        grace_s: how long a retired memory stays loaded at least.
        switch_lock: held while the served set changes (HF: the generation lock, so no request
            is running); `lock` only keeps the bookkeeping consistent for readers.
    """

    def __init__(self, served: ServedModel, settings: MemorySettings, layer: int | None = None, *,
                 open_memory: Callable[[ResolvedMemory], tuple[MemoryFollower, object]] | None = None,
                 on_load: Callable[[str, RoutedFFN], None] | None = None,
                 on_unload: Callable[[str, RoutedFFN], None] | None = None, grace_s: float = RETIRE_GRACE_S,
                 switch_lock: threading.RLock | None = None):
        self.served = served
        self.settings = settings
        self.layer = layer
        self.open_memory = open_memory or (lambda resolved: (follow(resolved, settings), None))
        self.on_load = on_load
        self.on_unload = on_unload
        self.grace_s = grace_s
        self.loaded: dict[str, LoadedMemory] = {}
        self.retired: list[LoadedMemory] = []
        self.default: str | None = None
        self.lock = threading.RLock()  # bookkeeping; held briefly
        self.switch_lock = switch_lock or threading.RLock()

    # ------------------------------------------------------------------ start-up
    def start_all(self) -> None:
        """Load the memories of the settings; the default is `settings.memory` (single-memory: that memory)."""
        for ref in self.settings.start_memories() if self.settings.multi else [self.settings.memory]:
            if ref is not None:
                self._install(self.prepare(ref))
        self.default = self.settings.memory.name if self.settings.memory is not None else None

    # ------------------------------------------------------------------ preparing (no state change)
    def prepare(self, ref: MemoryRef) -> LoadedMemory:
        """Check `ref` against the served model and layer, load its version and start following it.

        Raises MemoryMismatchError (another model, layer or size), store errors (unknown memory
        or version). Nothing the replica serves changes.
        """
        settings = MemorySettings(ref, store=self.settings.store, redis_url=self.settings.redis_url,
                                  layer=self.layer if self.layer is not None else self.settings.layer,
                                  capacity=self.settings.capacity, poll_seconds=self.settings.poll_seconds)
        resolved = resolve_memory(settings, self.served)  # another model or layer: MemoryMismatchError
        try:
            follower, handle = self.open_memory(resolved)
        except BaseException:
            resolved.store.close()
            raise
        return LoadedMemory(ref, follower, handle)

    # ------------------------------------------------------------------ switching (between steps)
    def _install(self, new: LoadedMemory) -> LoadedMemory | None:
        """Serve `new`, replacing a loaded or retiring memory of that name at once; returns the replaced one (closed)."""
        with self.switch_lock, self.lock:
            old = self.loaded.get(new.name)
            self.layer = new.follower.spec.layer if self.layer is None else self.layer
            self.loaded[new.name] = new
            replaced = [m for m in self.retired if m.name == new.name]  # a retiring memory of that name
            self.retired = [m for m in self.retired if m.name != new.name]
            if self.on_load is not None:
                self.on_load(new.name, new.routed)  # takes over the name's slot
        for m in replaced + ([old] if old is not None else []):
            m.follower.close()
        logger.info("memory %s v%s loaded (%d facts)", new.ref, new.routed.version, new.routed.n_facts)
        return old

    def add(self, ref: MemoryRef) -> dict:
        """Load (or reload, e.g. to pin a version) a memory; requests choose it as BASE:NAME."""
        new = self.prepare(ref)
        self._install(new)
        return self.describe()

    def swap(self, ref: MemoryRef, keep_previous: bool = False) -> dict:
        """Make `ref` the default memory; the previous default retires unless `keep_previous`."""
        with self.lock:
            current = self.loaded.get(ref.name)
            reuse = current is not None and current.ref == ref and current.retired_at is None
        if not reuse:
            self._install(self.prepare(ref))
        with self.switch_lock, self.lock:
            if ref.name not in self.loaded:  # a concurrent admin call removed it since it was loaded or checked
                raise UnknownMemoryError(f"memory {ref.name!r} was removed while it was being made the default; "
                                         "nothing changed")
            previous, self.default = self.default, ref.name
            if previous is not None and previous != ref.name and not keep_previous:
                self._retire(previous)
            out = self.describe()
        out["previous"] = previous
        logger.info("default memory: %s -> %s", previous, ref)
        return out

    def remove(self, name: str) -> dict:
        """Retire a memory; if it was the default, the plain model name serves the base model."""
        with self.switch_lock, self.lock:
            self._retire(name)
            if self.default == name:
                self.default = None
            return self.describe()

    def _retire(self, name: str) -> None:
        m = self.loaded.pop(name, None)
        if m is None:
            raise UnknownMemoryError(f"memory {name!r} is not served here; served: {sorted(self.loaded) or 'none'}")
        m.retired_at = time.monotonic()
        self.retired.append(m)
        logger.info("memory %r retired", name)

    def collectable(self, in_use: set[str] | None = None, now: float | None = None) -> list[str]:
        """Retired memories no running request uses whose grace period is over."""
        now = time.monotonic() if now is None else now
        with self.lock:
            return [m.name for m in self.retired
                    if not (in_use and m.name in in_use) and now - (m.retired_at or now) >= self.grace_s]

    def collect(self, in_use: set[str] | None = None, now: float | None = None,
                names: list[str] | None = None) -> list[str]:
        """Unload retired memories: `names` (under tensor parallelism, the leader's `collectable`, so that
        every rank unloads the same ones at the same step), else `collectable(in_use, now)`. Between steps only.

        Their followers are closed after the locks are released: a watcher busy reading the store must not
        hold up requests (on HF the switch lock is the generation lock).
        """
        if not self.retired:
            return []
        names = set(self.collectable(in_use, now) if names is None else names)
        gone: list[LoadedMemory] = []
        with self.switch_lock, self.lock:
            keep = []
            for m in self.retired:
                if m.name not in names:
                    keep.append(m)
                    continue
                if self.on_unload is not None and m.name not in self.loaded:
                    self.on_unload(m.name, m.routed)
                gone.append(m)
            self.retired = keep
        for m in gone:
            m.follower.close()
            logger.info("memory %r unloaded", m.name)
        return [m.name for m in gone]

    # ------------------------------------------------------------------ requests
    def choose(self, name: str | None) -> LoadedMemory | None:
        """The memory a request gets: `name`, or the default when None; None means the base model.

        "" chooses the base model explicitly. Raises UnknownMemoryError for a memory not served.
        """
        with self.lock:
            if name is None:
                name = self.default
            if not name:
                return None
            m = self.loaded.get(name)
            if m is None:
                raise UnknownMemoryError(f"memory {name!r} is not served here; served: {sorted(self.loaded) or 'none'}")
            return m

    def find(self, name: str) -> LoadedMemory | None:
        """A loaded or retired (still resident) memory by name."""
        with self.lock:
            return self.loaded.get(name) or next((m for m in self.retired if m.name == name), None)

    # ------------------------------------------------------------------ reporting
    def all(self) -> list[LoadedMemory]:
        with self.lock:
            return list(self.loaded.values()) + list(self.retired)

    def describe(self, drain: bool = False) -> dict:
        """{"default", "layer", "memories": [status of each loaded memory, then retired ones]}."""
        return {"default": self.default, "layer": self.layer, "memories": [m.status(drain) for m in self.all()]}

    def boundary(self) -> bool:
        """Apply every memory's staged versions (no forward running). True if any changed."""
        changed = False
        for m in self.all():
            boundary = getattr(m.handle, "boundary", None)
            if boundary is not None:
                boundary()
            else:
                changed = m.follower.apply_pending() or changed
        return changed

    def close(self) -> None:
        for m in self.all():
            m.follower.close()
        self.loaded.clear()
        self.retired.clear()


def admin_error(exc: BaseException) -> tuple[int, str, str] | None:
    """(HTTP status, OpenAI error type, message) for an admin failure the caller can act on; None otherwise."""
    from store import MemoryNotFoundError, StoreUnavailableError, VersionNotFoundError
    from store.errors import CorruptMemoryError

    if isinstance(exc, MemoryMismatchError):
        return 409, "memory_mismatch", str(exc)
    if isinstance(exc, MemoryFollowError):  # the version cannot be applied live (router change, capacity, adapter)
        return 409, "memory_not_loadable", str(exc)
    if isinstance(exc, CorruptMemoryError):
        return 409, "memory_corrupt", str(exc)
    if isinstance(exc, (UnknownMemoryError, MemoryNotFoundError, VersionNotFoundError)):
        return 404, "memory_not_found", str(exc)
    if isinstance(exc, StoreUnavailableError):
        return 503, "store_unavailable", str(exc)
    if isinstance(exc, (ServingConfigError, ValueError)):
        return 400, "invalid_request_error", str(exc)
    return None
