"""Value types returned by the store: versions, memory descriptions and deltas."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from editing.table import MemorySpec


@dataclass(frozen=True)
class MemoryVersion:
    """One entry of a memory's history: what a commit did and the size it left.

    `op` is create, commit, delete, rollback, import or compact; `target` is the version a
    rollback restored. A call that changed nothing returns op "noop" with the head's version and
    no rows added or deleted.
    """

    memory: str
    version: int
    committed_at: datetime
    op: str
    message: str = ""
    n_added: int = 0
    n_deleted: int = 0
    n_rows: int = 0
    job_id: str | None = None
    target: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["committed_at"] = self.committed_at.isoformat()
        return d


@dataclass(frozen=True)
class MemoryInfo:
    """A memory at one version: what it is bound to, its size and its free per-version metadata."""

    name: str
    spec: MemorySpec
    router: dict
    version: int
    n_rows: int
    created_at: datetime
    committed_at: datetime
    metadata: dict = field(default_factory=dict)
    uri: str = ""
    oldest_version: int = 0

    def check(self, spec: MemorySpec) -> None:
        """Raise `MemoryMismatchError` naming this memory and version unless it fits `spec`'s model and layer."""
        spec.check(self.spec, what=f"memory {self.name!r} v{self.version}")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "spec": dict(self.spec.__dict__),
            "router": self.router,
            "version": self.version,
            "n_rows": self.n_rows,
            "created_at": self.created_at.isoformat(),
            "committed_at": self.committed_at.isoformat(),
            "metadata": self.metadata,
            "uri": self.uri,
            "oldest_version": self.oldest_version,
        }


@dataclass(frozen=True)
class MemoryDelta:
    """What changed between two versions: remove `deleted` edit_ids, then append `added` rows.

    Applying it to the snapshot at `from_version` yields the snapshot at `to_version`
    (see `apply_delta`). An edit_id can be in both lists when its row was replaced.
    """

    memory: str
    from_version: int
    to_version: int
    added: pa.Table
    deleted: list[str]
    router: dict
    metadata: dict
    spec: MemorySpec
    n_rows: int

    @property
    def empty(self) -> bool:
        return self.added.num_rows == 0 and not self.deleted

    def summary(self) -> dict:
        return {
            "memory": self.memory,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "n_added": self.added.num_rows,
            "n_deleted": len(self.deleted),
            "n_rows": self.n_rows,
        }


def apply_delta(snapshot: pa.Table, delta: MemoryDelta) -> pa.Table:
    """The snapshot at `delta.to_version`, from the snapshot at `delta.from_version`.

    Rows keep their relative order; added rows go last (same order as a full read only up
    to row order, which the store does not promise across versions).
    """
    if delta.deleted:
        keep = pc.invert(pc.is_in(snapshot.column("edit_id"), value_set=pa.array(delta.deleted, pa.string())))
        snapshot = snapshot.filter(keep)
    if delta.added.num_rows:
        added = delta.added.select(snapshot.schema.names).cast(snapshot.schema)
        snapshot = pa.concat_tables([snapshot, added])
    return snapshot
