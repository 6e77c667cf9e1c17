"""Ray for the coordinator: joining or starting a cluster, and pools of worker actors.

A pool owns a fixed number of actors of one worker class (`workers/*.py`). An item run on a
pool whose actor dies (killed, OOM, node lost) is retried on another actor of the pool; the
dead actor is replaced by a fresh one, so the pool keeps its size.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from cluster.jobs import JobError

log = logging.getLogger(__name__)

NAMESPACE = "kvedit"


class RayUnavailableError(JobError):
    """The Ray cluster cannot be reached or started."""


class PoolError(JobError):
    """A pool's actors could not be placed or started."""


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast (Ray's own connect retries for minutes) when `host:port` does not accept connections."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailableError(f"--ray-address {address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayUnavailableError(
            f"Ray cluster at {address} is unreachable ({exc}); start it with `ray start --head` "
            "or omit --ray-address to run a local Ray") from exc


def connect_ray(address: str | None = None, num_cpus: int = 2, log_to_driver: bool = True) -> bool:
    """Join the cluster at `address`, or start a local Ray with `num_cpus` CPU slots.

    Returns True when this call initialised Ray (the caller should `ray.shutdown()` it).
    Raises `RayUnavailableError` with what to do when the cluster cannot be reached.
    """
    import warnings

    import ray

    # Ray forks+execs its daemons; lance warns on any fork, which is harmless when the child execs.
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises many types here; all mean "no cluster"
        raise RayUnavailableError(f"cannot {'join Ray at ' + address if address else 'start a local Ray'}: {exc}") from exc
    log.info("Ray %s: %s", "joined" if address else "started", ray.cluster_resources())
    return True


def actor_resources() -> dict:
    """`num_gpus=1` per actor when the cluster has GPUs, else `num_cpus=1`."""
    import ray

    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1}
    return {"num_cpus": 1}


def actor_died(exc: BaseException) -> bool:
    """Whether a Ray error means the actor (its process) is gone, so the work should be retried elsewhere."""
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.WorkerCrashedError, rex.LocalRayletDiedError, rex.OutOfMemoryError))


def task_cause(exc: BaseException) -> BaseException:
    """The exception raised inside the actor method (unwrapping `RayTaskError`)."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError) and getattr(exc, "cause", None) is not None:
        return exc.cause
    return exc


@dataclass
class Slot:
    """One actor of a pool. `generation` counts replacements; `busy` while it runs an item."""

    index: int
    handle: Any
    generation: int = 0
    busy: bool = False
    ready_ref: Any = None  # the actor's first task, `ready()`: resolves to its pid once it is up

    @property
    def pid(self) -> int | None:
        """The actor's process id once it has started (None before)."""
        import ray

        done, _ = ray.wait([self.ready_ref], timeout=0)
        return ray.get(done[0]) if done else None


@dataclass
class Outcome:
    """The end of one item run on a pool: `value`, or `error` (the actor method's exception)."""

    item: Any
    value: Any = None
    error: BaseException | None = None
    attempts: int = 1
    seconds: float = 0.0
    slot: int | None = None


@dataclass
class _Flight:
    item: Any
    slot: Slot
    attempts: int
    started: float = field(default_factory=time.perf_counter)
    generation: int = -1  # the slot's generation when the item was dispatched


class ActorPool:
    """`size` actors of `worker_cls`, each requesting `actor_resources()` (one CPU, or one GPU).

    Args:
        worker_cls: a plain worker class; it is wrapped with `ray.remote` here.
        size: number of actors.
        name: label for logs and the actor-restart metric.
        on_restart: called with the pool name when a dead actor is replaced.
    """

    def __init__(self, worker_cls: type, size: int, name: str, on_restart: Callable[[str], None] | None = None,
                 resources: dict | None = None):
        if size < 1:
            raise ValueError(f"pool {name}: size must be >= 1")
        self.worker_cls, self.size, self.name = worker_cls, size, name
        self.on_restart = on_restart
        self.resources = resources
        self.slots: list[Slot] = []
        self.restarts = 0
        self._rr = 0

    def _new_actor(self):
        import ray

        resources = self.resources or actor_resources()
        remote_cls = ray.remote(self.worker_cls)
        return remote_cls.options(max_restarts=0, max_task_retries=0, **resources).remote()

    def _fill(self, slot: Slot) -> None:
        slot.handle = self._new_actor()
        slot.ready_ref = slot.handle.ready.remote()

    def start(self) -> "ActorPool":
        if not self.slots:
            self.slots = [Slot(i, None) for i in range(self.size)]
            for slot in self.slots:
                self._fill(slot)
            log.info("pool %s: started %d actors", self.name, self.size)
        return self

    def wait_ready(self, timeout: float = 600.0, on_tick: Callable[[], None] | None = None) -> list[int]:
        """Wait until every actor answers (raises `PoolError` if one cannot be placed or fails to start)."""
        import ray

        self.start()
        refs = {slot.ready_ref: slot for slot in self.slots}
        deadline = time.monotonic() + timeout
        while refs:
            done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=1.0)
            for ref in done:
                slot = refs.pop(ref)
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - reported as a pool error
                    raise PoolError(f"pool {self.name}: actor {slot.index} failed to start: {exc}") from exc
            if on_tick:
                on_tick()
            if refs and time.monotonic() > deadline:
                raise PoolError(
                    f"pool {self.name}: {len(refs)} actor(s) not running after {timeout:.0f}s; the cluster may lack "
                    f"the resources {self.resources or actor_resources()} for {self.size} actors")
        return [s.pid for s in self.slots]  # type: ignore[misc]

    def replace(self, slot: Slot) -> None:
        """Kill the actor of `slot` (if still alive) and put a fresh one in its place."""
        import ray

        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self._fill(slot)
        slot.generation += 1
        slot.busy = False
        self.restarts += 1
        log.warning("pool %s: actor %d died; replaced it (generation %d)", self.name, slot.index, slot.generation)
        if self.on_restart:
            self.on_restart(self.name)

    def next_slot(self) -> Slot:
        """Round-robin choice (for fire-and-forget calls)."""
        self.start()
        slot = self.slots[self._rr % len(self.slots)]
        self._rr += 1
        return slot

    def broadcast(self, method: str, *args, on_tick: Callable[[], None] | None = None, timeout: float = 1800.0,
                  **kwargs) -> list:
        """Run `method` on every actor at once and return the results in slot order.

        An actor that dies is replaced and asked once more; an exception raised by the method
        itself is re-raised (unwrapped). Raises `PoolError` past `timeout` (actors that cannot
        be placed never answer).
        """
        import ray

        self.start()
        results: list = [None] * len(self.slots)
        retried: set[int] = set()
        refs = {getattr(s.handle, method).remote(*args, **kwargs): s for s in self.slots}
        deadline = time.monotonic() + timeout
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
            if on_tick:
                on_tick()
            for ref in done:
                slot = refs.pop(ref)
                try:
                    results[slot.index] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - sorted below
                    if actor_died(exc) and slot.index not in retried:
                        retried.add(slot.index)
                        self.replace(slot)
                        refs[getattr(slot.handle, method).remote(*args, **kwargs)] = slot
                        continue
                    raise task_cause(exc) from exc
            if refs and time.monotonic() > deadline:
                for slot in {id(s): s for s in refs.values()}.values():  # a hung call would block every later one
                    self.replace(slot)
                raise PoolError(f"pool {self.name}: {method} did not finish within {timeout:.0f}s on {len(refs)} actor(s); "
                                f"the cluster may lack the resources {self.resources or actor_resources()}")
        return results

    def run(
        self,
        items: Iterable[Any],
        submit: Callable[[Any, Any], Any],
        *,
        max_attempts: int = 3,
        poll: float = 1.0,
        should_stop: Callable[[], bool] = lambda: False,
        on_tick: Callable[[], None] | None = None,
        on_dispatch: Callable[[Any, Slot], None] | None = None,
        item_timeout: float | None = None,
    ) -> Iterator[Outcome]:
        """Run every item on the pool, one item per idle actor, yielding outcomes as they finish.

        `submit(actor_handle, item)` starts the item and returns its ObjectRef. An item whose
        actor died is retried (up to `max_attempts` runs) on the next idle actor while the dead
        one is replaced. An item running longer than `item_timeout` seconds counts as a hung
        actor: the actor is killed and replaced and the item retried the same way (then failed
        with a `PoolError`). Once `should_stop()` is true no new item starts; running ones finish
        and are yielded. `on_tick()` runs about every `poll` seconds (leases, cancel checks).
        """
        self.start()
        queue: list[tuple[Any, int]] = [(item, 0) for item in items]
        queue.reverse()  # pop() from the end keeps submission order
        flights: dict[Any, _Flight] = {}
        try:
            yield from self._run(queue, flights, submit, max_attempts, poll, should_stop, on_tick, on_dispatch,
                                 item_timeout)
        finally:  # the consumer stopped early: leave no slot marked busy (its actor finishes, unobserved)
            for fl in flights.values():
                fl.slot.busy = False

    def _run(self, queue, flights, submit, max_attempts, poll, should_stop, on_tick, on_dispatch,
             item_timeout) -> Iterator[Outcome]:
        import ray

        while queue or flights:
            stopping = should_stop()
            while queue and not stopping:
                idle = next((s for s in self.slots if not s.busy), None)
                if idle is None:
                    break
                item, attempts = queue.pop()
                idle.busy = True
                ref = submit(idle.handle, item)
                flights[ref] = _Flight(item, idle, attempts + 1, generation=idle.generation)
                if on_dispatch:
                    on_dispatch(item, idle)
            if not flights:
                break
            done, _ = ray.wait(list(flights), num_returns=1, timeout=poll)
            for ref in done:
                fl = flights.pop(ref)
                seconds = time.perf_counter() - fl.started
                try:
                    value = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - sorted below
                    if actor_died(exc):
                        log.warning("pool %s: actor %d died during an item (attempt %d/%d): %s",
                                    self.name, fl.slot.index, fl.attempts, max_attempts, type(exc).__name__)
                        if fl.slot.generation == fl.generation:  # not already replaced (e.g. by another caller)
                            self.replace(fl.slot)
                        if fl.attempts < max_attempts:
                            queue.append((fl.item, fl.attempts))
                            continue
                    else:
                        fl.slot.busy = False
                    yield Outcome(fl.item, error=task_cause(exc), attempts=fl.attempts, seconds=seconds, slot=fl.slot.index)
                    continue
                fl.slot.busy = False
                yield Outcome(fl.item, value=value, attempts=fl.attempts, seconds=seconds, slot=fl.slot.index)
            if item_timeout is not None:
                yield from self._expire(queue, flights, item_timeout, max_attempts)
            if on_tick and (queue or flights):  # after the finished items are read: a tick that raises (a
                on_tick()                        # stopping consumer) never discards a result already in hand

    def _expire(self, queue, flights, item_timeout: float, max_attempts: int) -> Iterator[Outcome]:
        """Kill and replace the actors of items running longer than `item_timeout`; retry or fail the items."""
        import ray

        now = time.perf_counter()
        late = [ref for ref, fl in flights.items() if now - fl.started > item_timeout]
        if not late:
            return
        # A result that arrived while the consumer handled another one is read on the next pass, not discarded.
        ready = set(ray.wait(late, num_returns=len(late), timeout=0)[0])
        for ref in late:
            fl = flights[ref]
            if ref in ready:
                continue
            del flights[ref]  # its result, if the killed actor ever sends one, is not read
            log.warning("pool %s: actor %d hung on an item for over %.0fs (attempt %d/%d); replacing it",
                        self.name, fl.slot.index, item_timeout, fl.attempts, max_attempts)
            if fl.slot.generation == fl.generation:
                self.replace(fl.slot)
            if fl.attempts < max_attempts:
                queue.append((fl.item, fl.attempts))
                continue
            yield Outcome(fl.item, error=PoolError(f"pool {self.name}: an item did not finish within {item_timeout:.0f}s "
                                                   f"in {fl.attempts} attempts"),
                          attempts=fl.attempts, seconds=now - fl.started, slot=fl.slot.index)

    def shutdown(self) -> None:
        import ray

        for slot in self.slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead, or Ray already shut down
                pass
        self.slots = []


def local_cpu_slots(*pool_sizes: int) -> int:
    """CPU slots for a local Ray: 2, or enough for every actor to be placed at once."""
    return max(2, sum(pool_sizes))


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
