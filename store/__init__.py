"""kvedit's memory store: named, versioned key-value edit memories.

Rows live in Lance datasets (a local directory by default, or any object-store URI); Redis
caches each memory's current version and publishes `kvedit:memory:<name>` at every commit.
See docs/adr/0002-store-format.md for the format and concurrency design.
"""

from .errors import (
    CommitConflictError,
    CorruptFileError,
    CorruptMemoryError,
    InvalidNameError,
    InvalidRowsError,
    MemoryExistsError,
    MemoryMismatchError,
    MemoryNotFoundError,
    StoreError,
    StoreUnavailableError,
    VersionNotFoundError,
)
from .memory_store import MemoryStore
from .model import MemoryDelta, MemoryInfo, MemoryVersion, apply_delta
from .redisconn import Subscription, channel, connect_redis, embedded_url, stop_embedded_redis

__all__ = [
    "MemoryStore",
    "MemoryVersion",
    "MemoryInfo",
    "MemoryDelta",
    "apply_delta",
    "connect_redis",
    "stop_embedded_redis",
    "embedded_url",
    "channel",
    "Subscription",
    "StoreError",
    "MemoryNotFoundError",
    "MemoryExistsError",
    "VersionNotFoundError",
    "CorruptMemoryError",
    "CorruptFileError",
    "InvalidRowsError",
    "InvalidNameError",
    "CommitConflictError",
    "StoreUnavailableError",
    "MemoryMismatchError",
]
