"""The job queue: a Redis Stream (`kvedit:jobs`) read by coordinators through one consumer group.

An entry is delivered to one coordinator and stays in the group's pending list until that
coordinator acknowledges it, which it does only once the job reached a final state. A
coordinator holds a *lease* on its entry by touching it (XCLAIM to itself) while it works; an
entry idle for longer than the lease belongs to a dead coordinator and is taken over by the
next one that looks (XAUTOCLAIM). Acknowledged entries are deleted, so the stream length is
the queue depth (waiting + in progress).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import redis

from cluster.jobs import GROUP, STREAM, QueueUnavailableError

log = logging.getLogger(__name__)

# Touch an entry only while this consumer still owns it (a coordinator whose lease expired
# must not steal its job back from the one that took it over).
_HEARTBEAT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""

# Acknowledge (and delete) an entry only while this consumer owns it: a coordinator that lost its
# lease and finished anyway must not delete the entry the new owner is working on.
_ACK = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a coordinator. `job_id` is None for an entry whose payload is gone."""

    entry_id: str
    job_id: str | None
    reclaimed: bool = False


class JobQueue:
    """Consumer-group access to the job stream."""

    def __init__(self, client: redis.Redis, stream: str = STREAM, group: str = GROUP):
        self.client, self.stream, self.group = client, stream, group
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._ack_owned = client.register_script(_ACK)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise QueueUnavailableError(f"job queue: Redis error on {self.stream}: {exc}") from exc

    def ensure_group(self) -> None:
        """Create the stream and consumer group if missing (entries added before are delivered too)."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise QueueUnavailableError(f"job queue: cannot create group {self.group}: {exc}") from exc
        except redis.RedisError as exc:
            raise QueueUnavailableError(f"job queue: Redis error on {self.stream}: {exc}") from exc

    @staticmethod
    def _deliveries(entries, reclaimed: bool) -> list[Delivery]:
        out = []
        for entry in entries or []:
            if entry is None:
                continue
            entry_id, fields = entry
            out.append(Delivery(entry_id, (fields or {}).get("job_id"), reclaimed))
        return out

    def read(self, consumer: str, block_ms: int = 1000) -> Delivery | None:
        """The next new entry for `consumer`, waiting up to `block_ms`."""
        res = self._call(self.client.xreadgroup, self.group, consumer, {self.stream: ">"}, count=1, block=block_ms)
        for _, entries in res or []:
            got = self._deliveries(entries, False)
            if got:
                return got[0]
        return None

    def own_pending(self, consumer: str) -> list[Delivery]:
        """Entries delivered to `consumer` and never acknowledged (a restart under the same name)."""
        res = self._call(self.client.xreadgroup, self.group, consumer, {self.stream: "0"}, count=100)
        out = []
        for _, entries in res or []:
            out += self._deliveries(entries, True)
        return out

    def reclaim(self, consumer: str, min_idle_seconds: float, count: int = 10) -> list[Delivery]:
        """Take over entries idle for at least `min_idle_seconds` (their coordinator died) via XAUTOCLAIM."""
        res = self._call(self.client.xautoclaim, self.stream, self.group, consumer,
                         int(min_idle_seconds * 1000), start_id="0-0", count=count)
        entries = res[1] if res and len(res) > 1 else []
        got = self._deliveries(entries, True)
        for d in got:
            log.warning("reclaimed job %s (stream entry %s) from a coordinator idle for over %.0fs",
                        d.job_id, d.entry_id, min_idle_seconds)
        return got

    def heartbeat(self, consumer: str, entry_id: str) -> bool:
        """Renew the lease on an entry; False when another coordinator has taken it over."""
        return bool(self._call(self._heartbeat, keys=[self.stream], args=[self.group, consumer, entry_id]))

    def ack_owned(self, consumer: str, entry_id: str) -> bool:
        """Acknowledge and delete an entry if `consumer` still owns it; False (and nothing done) otherwise."""
        return bool(self._call(self._ack_owned, keys=[self.stream], args=[self.group, consumer, entry_id]))

    def ack(self, entry_id: str) -> None:
        """Acknowledge and delete a finished entry."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.xdel(self.stream, entry_id)
        self._call(pipe.execute)

    def depth(self) -> int:
        """Entries waiting or in progress."""
        return int(self._call(self.client.xlen, self.stream))

    def pending_count(self) -> int:
        """Entries delivered and not yet acknowledged."""
        try:
            info = self.client.xpending(self.stream, self.group)
        except redis.ResponseError:
            return 0
        except redis.RedisError as exc:
            raise QueueUnavailableError(f"job queue: Redis error on {self.stream}: {exc}") from exc
        return int(info.get("pending", 0))


class LeaseKeeper:
    """Renews a consumer's lease on one entry from a background thread, every `interval` seconds.

    The work on a job has long stretches that cannot beat themselves (loading a model, a commit
    waiting for the store, a calibration on Ray); the lease must outlive them. `lost` is set once
    another consumer owns the entry (the worker then stops at its next check); a Redis outage is
    retried at the next interval. Use as a context manager.
    """

    def __init__(self, queue: JobQueue, consumer: str, entry_id: str, interval: float):
        self.queue, self.consumer, self.entry_id, self.interval = queue, consumer, entry_id, interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kvedit-lease-{entry_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.queue.heartbeat(self.consumer, self.entry_id):
                    log.warning("lease on stream entry %s lost to another coordinator", self.entry_id)
                    self.lost.set()
                    return
            except QueueUnavailableError as exc:
                log.warning("lease on stream entry %s not renewed: %s", self.entry_id, exc)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
