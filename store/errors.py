"""Typed store errors. Every message names the memory and, where one is involved, the version.

`MemoryMismatchError` is the one from `editing.table`, so callers catch a single type for
"rows or memory built for another model, layer or key/value size", wherever it was raised.
"""

from __future__ import annotations

from editing.table import MemoryMismatchError

__all__ = [
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


def where(memory: str | None, version: int | None = None) -> str:
    """`memory 'prod-facts' v12` — the prefix every store error message starts with."""
    if memory is None:
        return "store"
    return f"memory {memory!r}" + ("" if version is None else f" v{version}")


class StoreError(Exception):
    """Base class of every store error; `memory` and `version` say what it is about."""

    def __init__(self, message: str, memory: str | None = None, version: int | None = None):
        self.memory, self.version = memory, version
        super().__init__(message)

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": str(self), "memory": self.memory, "version": self.version}


class MemoryNotFoundError(StoreError, KeyError):
    """No memory of that name in this store."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class MemoryExistsError(StoreError):
    """`create` of a name that is already taken (without `exist_ok`)."""


class VersionNotFoundError(StoreError, LookupError):
    """The version never existed, or was removed by compaction (older than the retention point)."""


class CorruptMemoryError(StoreError):
    """A manifest, deletion file or data file of the memory cannot be read (truncated, corrupt, missing)."""


class CorruptFileError(StoreError):
    """An import file that is not a readable Parquet or Arrow edit table."""


class InvalidRowsError(StoreError, ValueError):
    """Rows that fit the memory's spec but are malformed (empty or duplicate edit_id, non-finite vectors...)."""


class InvalidNameError(StoreError, ValueError):
    """A memory name that cannot be used as a path component or Redis channel suffix."""


class CommitConflictError(StoreError):
    """A commit kept losing the race against other writers until its deadline, or the router config it was
    conditional on (`router_expect`) changed meanwhile; nothing was written."""


class StoreUnavailableError(StoreError):
    """Redis (embedded or remote) or the storage location cannot be reached."""
