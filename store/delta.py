"""Differences between two versions of a memory, read from Lance fragments rather than full scans.

Commits never rewrite data files: they add fragments and replace deletion files. So between
versions A and B, only fragments that are new in B or whose deletion file changed can hold a
difference, and reading those is proportional to the change, not to the memory. When a
fragment of A is gone from B (compaction rewrote it), the diff falls back to comparing the
(edit_id, _batch) keys of both versions (small columns only) and fetching the added rows.
"""

from __future__ import annotations

import threading

import lance
import pyarrow as pa
import pyarrow.compute as pc

from .rows import BATCH, LIVE_FILTER

ADDR = "_rowaddr"


def live_keys(ds: lance.LanceDataset, fragments: list | None = None) -> pa.Table:
    """edit_id, _batch and row address of every live edit row (anchors excluded)."""
    return ds.scanner(
        columns=["edit_id", BATCH], filter=LIVE_FILTER, with_row_address=True, fragments=fragments
    ).to_table()


def _deletion_key(meta) -> tuple | None:
    """Identity of a fragment's deletion file (its path is derived from these and the fragment id)."""
    d = meta.deletion_file
    return None if d is None else (d.read_version, d.id, d.file_type, d.num_deleted_rows)


def take_rows(ds: lance.LanceDataset, addrs: pa.Array, columns: list[str]) -> pa.Table:
    """Rows at the given row addresses, in address order."""
    if len(addrs) == 0:
        return ds.schema.empty_table().select(columns)
    ordered = pc.sort_indices(addrs)
    sorted_addrs = pc.take(addrs, ordered).to_pylist()
    return ds._take_rows(sorted_addrs, columns=columns)


def _key(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(table.column("edit_id"), pc.cast(table.column(BATCH), pa.string()), "\x1f")


def diff(a: lance.LanceDataset, b: lance.LanceDataset, columns: list[str], counts_only: bool = False) -> tuple[pa.Table | None, list[str], int]:
    """(rows added, edit_ids deleted, number added) going from version `a` to version `b`.

    `columns` must include `_batch`. Applying the deletions then the additions to `a` gives `b`.
    A row that disappears and reappears unchanged (same edit_id and _batch, e.g. a rollback
    across a compaction) is left out of both lists. With `counts_only` the added rows are not
    read (the table is None) — rollback uses this to report its size cheaply.
    """
    fa = {f.fragment_id: f for f in a.get_fragments()}
    fb = {f.fragment_id: f for f in b.get_fragments()}
    if any(fid not in fb for fid in fa):
        return _full_diff(a, b, columns, counts_only)
    new = [fb[i] for i in fb if i not in fa]
    da = {i: _deletion_key(fa[i].metadata) for i in fb if i in fa}
    changed = [i for i in da if da[i] != _deletion_key(fb[i].metadata)]
    added_keys: list[pa.Table] = []
    parts: list[pa.Table] = []
    gone_rows = pa.table({"edit_id": pa.array([], pa.string()), BATCH: pa.array([], pa.int64())})
    if new:
        if counts_only:
            added_keys.append(b.scanner(columns=["edit_id", BATCH], filter=LIVE_FILTER, fragments=new).to_table())
        else:
            parts.append(b.scanner(columns=columns, filter=LIVE_FILTER, fragments=new).to_table())
    if changed:
        ka = live_keys(a, [fa[i] for i in changed])
        kb = live_keys(b, [fb[i] for i in changed])
        gone_rows = ka.filter(pc.invert(pc.is_in(ka.column(ADDR), value_set=kb.column(ADDR).combine_chunks())))
        gone_rows = gone_rows.select(["edit_id", BATCH])
        back = kb.filter(pc.invert(pc.is_in(kb.column(ADDR), value_set=ka.column(ADDR).combine_chunks())))
        if back.num_rows:
            if counts_only:
                added_keys.append(back.select(["edit_id", BATCH]))
            else:
                parts.append(take_rows(b, back.column(ADDR).combine_chunks(), columns))
    if counts_only:
        keys = pa.concat_tables(added_keys) if added_keys else gone_rows.schema.empty_table()
        deleted, kept = _cancel(gone_rows, keys)
        return None, deleted, kept.num_rows
    added = pa.concat_tables(parts) if parts else b.schema.empty_table().select(columns)
    deleted, added = _cancel(gone_rows, added)
    return added, deleted, added.num_rows


def _cancel(gone: pa.Table, added: pa.Table) -> tuple[list[str], pa.Table]:
    """Drop rows present in both `gone` and `added` (same edit_id and _batch)."""
    if gone.num_rows == 0 or added.num_rows == 0:
        return gone.column("edit_id").to_pylist(), added
    kg, ka = _key(gone), _key(added)
    deleted = gone.filter(pc.invert(pc.is_in(kg, value_set=ka))).column("edit_id").to_pylist()
    return deleted, added.filter(pc.invert(pc.is_in(ka, value_set=kg)))


def _full_diff(a: lance.LanceDataset, b: lance.LanceDataset, columns: list[str], counts_only: bool) -> tuple[pa.Table | None, list[str], int]:
    ka, kb = live_keys(a), live_keys(b)
    key_a, key_b = _key(ka), _key(kb)
    deleted = ka.filter(pc.invert(pc.is_in(key_a, value_set=key_b))).column("edit_id").to_pylist()
    new_rows = kb.filter(pc.invert(pc.is_in(key_b, value_set=key_a)))
    if counts_only:
        return None, deleted, new_rows.num_rows
    added = take_rows(b, new_rows.column(ADDR).combine_chunks(), columns)
    return added, deleted, added.num_rows


def _fragment_key(meta) -> tuple:
    """What identifies a fragment's live rows: its data files (immutable, uniquely named) and deletion file."""
    return (tuple(getattr(f, "_path", None) or str(f.path) for f in meta.files), _deletion_key(meta))


class LiveKeyCache:
    """`live_keys` of successive versions of one dataset, recomputed only for fragments that changed.

    A writer needs the live edit_ids of the head at every commit (to skip existing rows and find
    the rows to delete). Scanning every fragment each time costs O(fragments) file reads; between
    two versions only new fragments and fragments with a new deletion file differ, so only those
    are rescanned.
    """

    def __init__(self) -> None:
        self.uri: str | None = None
        self.table: pa.Table | None = None
        self.fragments: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def get(self, ds: lance.LanceDataset) -> pa.Table:
        with self._lock:
            return self._get(ds)

    def _get(self, ds: lance.LanceDataset) -> pa.Table:
        frags = {f.fragment_id: f for f in ds.get_fragments()}
        keys = {fid: _fragment_key(f.metadata) for fid, f in frags.items()}
        if self.table is None or self.uri != ds.uri:
            table = live_keys(ds)
        else:
            drop = [fid for fid, k in self.fragments.items() if keys.get(fid) != k]
            scan = [fid for fid, k in keys.items() if self.fragments.get(fid) != k]
            table = self.table
            if drop:
                owner = pc.shift_right(table.column(ADDR), 32)
                table = table.filter(pc.invert(pc.is_in(owner, value_set=pa.array(drop, pa.uint64()))))
            if scan:
                table = pa.concat_tables([table, live_keys(ds, [frags[i] for i in scan])])
        self.uri, self.table, self.fragments = ds.uri, table, keys
        return table
