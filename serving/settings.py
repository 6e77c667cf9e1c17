"""Serving settings: which memory a replica serves and where it lives.

vLLM starts its engine core and workers as separate processes, so settings travel as
environment variables (every vLLM process inherits them); the HF backend builds the
same `MemorySettings` from its arguments.

    KVEDIT_MEMORY        name[@version]  memory to serve; @version pins it (no reloads). With
                         KVEDIT_MEMORIES: the default memory (what the plain model name gets)
    KVEDIT_MEMORIES      comma-separated name[@version] list: several memories, chosen per request
                         (set, even empty, to run the multi-memory replica: docs/adr/0007-multi-memory.md)
    KVEDIT_STORE         store URI (default: the store's own default, $KVEDIT_STORE or ~/.cache/kvedit/store)
    KVEDIT_REDIS_URL     Redis of the store (default: the store's embedded server)
    KVEDIT_LAYER         edit layer; must equal the memory's layer (default: the memory's)
    KVEDIT_CAPACITY      initial memory slots (grows by doubling in eager mode)
    KVEDIT_POLL_SECONDS  store polling interval while Redis is unreachable (default 2)
    KVEDIT_PREFIX_SALT   "1" when the front-end salts prefix-cache keys per memory version
                         (set by `kvedit serve`; see docs/adr/0003-vllm-integration.md)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from serving.errors import ServingConfigError

ENV_MEMORY = "KVEDIT_MEMORY"
ENV_MEMORIES = "KVEDIT_MEMORIES"
ENV_STORE = "KVEDIT_STORE"
ENV_REDIS_URL = "KVEDIT_REDIS_URL"
ENV_LAYER = "KVEDIT_LAYER"
ENV_CAPACITY = "KVEDIT_CAPACITY"
ENV_POLL_SECONDS = "KVEDIT_POLL_SECONDS"
ENV_PREFIX_SALT = "KVEDIT_PREFIX_SALT"

_REF_RE = re.compile(r"^(?P<name>[^@\s]+)(?:@(?P<version>\d+))?$")


@dataclass(frozen=True)
class MemoryRef:
    """`name` or `name@version` (a pinned version)."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> "MemoryRef":
        m = _REF_RE.match(text.strip())
        if not m:
            raise ServingConfigError(f"memory {text!r}: expected NAME or NAME@VERSION (VERSION a non-negative integer)")
        v = m.group("version")
        return cls(m.group("name"), None if v is None else int(v))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def _int(env: Mapping[str, str], key: str, minimum: int) -> int | None:
    raw = env.get(key, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ServingConfigError(f"{key}={raw!r}: expected an integer") from None
    if value < minimum:
        raise ServingConfigError(f"{key}={value}: must be >= {minimum}")
    return value


@dataclass(frozen=True)
class MemorySettings:
    """What a replica serves. `memory` None means the base model, unedited."""

    memory: MemoryRef | None = None
    store: str | None = None
    redis_url: str | None = None
    layer: int | None = None
    capacity: int | None = None
    poll_seconds: float = 2.0

    memories: tuple[MemoryRef, ...] | None = None  # None: the single-memory replica of KVEDIT_MEMORY

    @property
    def pinned(self) -> bool:
        return self.memory is not None and self.memory.version is not None

    @property
    def multi(self) -> bool:
        """Several memories chosen per request (KVEDIT_MEMORIES set); `memory` is then the default."""
        return self.memories is not None

    def start_memories(self) -> list[MemoryRef]:
        """Every memory loaded at start, the default first (multi-memory replicas)."""
        refs = list(self.memories or ())
        if self.memory is not None and self.memory.name not in [r.name for r in refs]:
            refs.insert(0, self.memory)
        return refs

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "MemorySettings":
        env = os.environ if env is None else env
        raw = env.get(ENV_MEMORY, "").strip()
        poll_raw = env.get(ENV_POLL_SECONDS, "").strip()
        try:
            poll = float(poll_raw) if poll_raw else 2.0
        except ValueError:
            raise ServingConfigError(f"{ENV_POLL_SECONDS}={poll_raw!r}: expected seconds") from None
        if poll <= 0:
            raise ServingConfigError(f"{ENV_POLL_SECONDS}={poll}: must be > 0")
        return cls(
            memory=MemoryRef.parse(raw) if raw else None,
            store=env.get(ENV_STORE) or None,
            redis_url=env.get(ENV_REDIS_URL) or None,
            layer=_int(env, ENV_LAYER, 0),
            capacity=_int(env, ENV_CAPACITY, 1),
            poll_seconds=poll,
            memories=parse_memory_list(env[ENV_MEMORIES]) if ENV_MEMORIES in env else None,
        )

    def to_env(self) -> dict[str, str]:
        """The KVEDIT_* variables that reproduce these settings in another process."""
        out: dict[str, str] = {}
        if self.memory is not None:
            out[ENV_MEMORY] = str(self.memory)
        if self.store:
            out[ENV_STORE] = str(self.store)
        if self.redis_url:
            out[ENV_REDIS_URL] = self.redis_url
        if self.layer is not None:
            out[ENV_LAYER] = str(self.layer)
        if self.capacity is not None:
            out[ENV_CAPACITY] = str(self.capacity)
        out[ENV_POLL_SECONDS] = repr(self.poll_seconds)
        if self.memories is not None:
            out[ENV_MEMORIES] = ",".join(str(r) for r in self.memories)
        return out


def parse_memory_list(text: str) -> tuple[MemoryRef, ...]:
    """"a,b@3" -> (MemoryRef("a"), MemoryRef("b", 3)); "" -> (). A name may appear once."""
    refs = tuple(MemoryRef.parse(part) for part in text.split(",") if part.strip())
    names = [r.name for r in refs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ServingConfigError(f"{ENV_MEMORIES}: memory {dup[0]!r} is listed more than once")
    return refs
