"""Typed errors of the serving package. Each message says what to change.

A memory built for another model, layer or key/value size is the core
`editing.table.MemoryMismatchError` (re-exported here), so callers catch one type
whether the store, the editor or a replica found the mismatch.
"""

from __future__ import annotations

from editing.table import MemoryMismatchError

__all__ = [
    "ServingError",
    "ServingConfigError",
    "UnsupportedArchitectureError",
    "MemoryFollowError",
    "MemoryMismatchError",
]


class ServingError(RuntimeError):
    """Base class of serving errors."""


class ServingConfigError(ServingError, ValueError):
    """Bad serving settings: an unparsable KVEDIT_* variable, a layer out of range, a missing flag."""


class UnsupportedArchitectureError(ServingError, ValueError):
    """A model family without a routed vLLM variant (or whose MLP has no gate_up/act/down structure)."""


class MemoryFollowError(ServingError):
    """A new memory version that cannot be applied live (e.g. its router changed); the replica keeps its version."""
