"""Small named blobs next to the memories (e.g. covariance statistics keyed by model, layer and corpus).

Stored as rows of a Lance dataset, so a write is one atomic commit on any store URI and
readers never see half a blob. A put of an existing key appends a newer row; `get` returns
the newest one and checks its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import lance
import pyarrow as pa
import pyarrow.compute as pc

from .errors import CorruptMemoryError, StoreError
from .lancefs import _not_found, append_rows, session

SCHEMA = pa.schema([
    pa.field("kind", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("data", pa.large_binary(), nullable=False),
    pa.field("meta", pa.string(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("written_at", pa.timestamp("us", tz="UTC"), nullable=False),
])


def _newest(hits: pa.Table) -> int:
    """Index of the row of `hits` (an index table) written last."""
    return pc.sort_indices(hits, sort_keys=[("written_at", "descending"), ("_rowaddr", "descending")])[0].as_py()


class ArtifactStore:
    """Blobs keyed by (kind, key) under one store root."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.uri = f"{root}/_artifacts.lance"
        self.storage_options = storage_options

    def put(self, kind: str, key: str, data: bytes, meta: dict | None = None) -> str:
        """Store `data` under (kind, key) atomically; returns its SHA-256."""
        if not kind or not isinstance(kind, str) or not isinstance(key, str):
            raise StoreError(f"artifact {kind!r}/{key!r}: kind and key must be non-empty strings")
        try:
            meta_json = json.dumps(meta or {}, sort_keys=True)
        except TypeError as exc:
            raise StoreError(f"artifact {kind}/{key}: meta is not JSON-serialisable: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        row = pa.table(
            {"kind": [kind], "key": [key], "data": [bytes(data)], "meta": [meta_json], "sha256": [digest],
             "written_at": [datetime.now(timezone.utc)]},
            schema=SCHEMA,
        )
        append_rows(self.uri, row, self.storage_options)
        return digest

    def _hits(self, kind: str, key: str, prefix: bool = False):
        """(dataset, index rows of `kind` whose key is `key`, or starts with it) or (None, None) when none."""
        try:
            ds = lance.dataset(self.uri, session=session(), storage_options=self.storage_options)
        except (ValueError, OSError) as exc:
            if _not_found(str(exc)):
                return None, None
            raise CorruptMemoryError(f"artifacts: cannot open {self.uri}: {exc}") from exc
        index = ds.scanner(columns=["kind", "key", "written_at"], with_row_address=True).to_table()
        match = pc.starts_with(index.column("key"), key) if prefix else pc.equal(index.column("key"), key)
        hits = index.filter(pc.and_(pc.equal(index.column("kind"), kind), match))
        return (ds, hits) if hits.num_rows else (None, None)

    def newest_key(self, kind: str, prefix: str) -> str | None:
        """The key under `kind` starting with `prefix` that was written last, or None."""
        _, hits = self._hits(kind, prefix, prefix=True)
        return None if hits is None else hits.column("key")[_newest(hits)].as_py()

    def get(self, kind: str, key: str) -> tuple[bytes, dict] | None:
        """(data, meta) of the newest blob under (kind, key), or None."""
        ds, hits = self._hits(kind, key)
        if hits is None:
            return None
        newest = _newest(hits)
        addr = hits.column("_rowaddr")[newest].as_py()
        row = ds._take_rows([addr], columns=["data", "meta", "sha256"]).to_pylist()[0]
        data = row["data"]
        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise CorruptMemoryError(f"artifact {kind}/{key}: checksum mismatch (corrupt blob)")
        return data, json.loads(row["meta"])


STATS_KIND = "stats"  # artifact kind holding C0 (`editing.stats.SecondMoment`) for the whitened router


def stats_key(fingerprint: str, layer: int, corpus_hash: str) -> str:
    """The artifact key of C0 of (model, layer) over a corpus, as jobs and `edit run` write it."""
    return f"{fingerprint}-L{layer}-{corpus_hash}"


def read_second_moment(store, fingerprint: str, layer: int, key: str | None = None):
    """C0 (`editing.stats.SecondMoment`) for a whitened memory, or None when there is none.

    `key`: the memory's router config `"stats"` (the artifact its edits were routed with); without
    it the newest "<fingerprint>-L<layer>-*" artifact in `store` (None: no store), then the local
    statistics cache `Editor.stats()` writes (`cache_dir()/stats/<fingerprint>-L<layer>-*.pt`).
    A named artifact that is missing or unreadable is an error (`CorruptMemoryError`), not a fallback.
    """
    from editing.models import cache_dir
    from editing.stats import SecondMoment

    if key is not None:
        found = store.get_artifact(STATS_KIND, key) if store is not None else None
        if found is None:
            raise CorruptMemoryError(f"C0 statistics artifact {key!r} is not in the store")
        try:
            return SecondMoment.from_bytes(found[0])
        except Exception as exc:  # a torn or foreign blob
            raise CorruptMemoryError(f"C0 statistics artifact {key!r} cannot be read: {exc}") from exc
    prefix = stats_key(fingerprint, layer, "")
    newest = store.find_artifact(STATS_KIND, prefix) if store is not None else None
    if newest is not None:
        return SecondMoment.from_bytes(store.get_artifact(STATS_KIND, newest)[0])
    local = sorted((cache_dir() / "stats").glob(f"{prefix}*.pt"), key=lambda p: p.stat().st_mtime)
    return SecondMoment.load(local[-1]) if local else None


REPHRASES_KIND = "rephrases"  # JSON {edit_id: [subject rephrasings]} a REP adapter was trained on (`cluster.robust`)


def read_rephrases(store, router: dict | None, where: str) -> dict[str, list[str]]:
    """{edit_id: subject rephrasings} stored with the adapter a memory version's router config names
    (`robust_keys.rephrases`); {} when it names none. A named artifact that is missing or unreadable is
    `CorruptMemoryError`: retraining without it would silently forget the old rows' rephrasings."""
    key = ((router or {}).get("robust_keys") or {}).get("rephrases")
    if not key:
        return {}
    found = store.get_artifact(REPHRASES_KIND, key)
    if found is None:
        raise CorruptMemoryError(f"{where}: rephrasings artifact {key!r} is not in the store")
    try:
        out = json.loads(found[0])
        if not isinstance(out, dict) or not all(isinstance(v, list) for v in out.values()):
            raise ValueError("not a JSON object of lists")
    except ValueError as exc:
        raise CorruptMemoryError(f"{where}: rephrasings artifact {key!r} cannot be read: {exc}") from exc
    return out


def read_robust_keys(store, router: dict | None, d_key: int, where: str):
    """The REP adapter (`editing.rep.RobustKeys`, on CPU) a memory version's router config names, or None.

    `store`: anything with `get_artifact(kind, key)` (a `MemoryStore`); `router`: the version's router
    config, whose `robust_keys` entry names the artifact; `where` names the version in errors.
    Raises `CorruptMemoryError` when the artifact is missing, unreadable or for another key width.
    """
    from editing.rep import ARTIFACT_KIND, RobustKeys

    ref = (router or {}).get("robust_keys")
    if not ref:
        return None
    key = ref.get("artifact") if isinstance(ref, dict) else None
    found = store.get_artifact(ARTIFACT_KIND, key) if key else None
    if found is None:
        raise CorruptMemoryError(f"{where}: robust-keys artifact {key!r} is not in the store")
    try:
        adapter = RobustKeys.from_bytes(found[0])
    except Exception as exc:  # a torn or foreign file
        raise CorruptMemoryError(f"{where}: robust-keys artifact {key!r} cannot be read: {exc}") from exc
    if adapter.d_key != d_key:
        raise CorruptMemoryError(f"{where}: robust-keys adapter is for d_key {adapter.d_key}, the memory's is {d_key}")
    return adapter
