"""How edit rows are validated on the way in and stored in Lance.

The stored table is `editing.table.edit_schema` plus one internal column, `_batch`: a random
id of the write that produced the row. (edit_id, _batch) identifies a row's content, so a
delta computed by comparing two versions never confuses a replaced row with its old copy.

Every data fragment also starts with one *anchor* row (`_batch = -1`, empty edit_id, zero
vectors) that is never deleted. Lance refuses to keep a fragment whose rows are all deleted
in an operation that lists the full fragment set (the `Merge` commits this store uses, see
docs/adr/0002-store-format.md), so the anchor keeps every fragment non-empty. Anchors are
filtered out of every read (`LIVE_FILTER`) and dropped by compaction.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from editing.table import MemoryMismatchError, MemorySpec, edit_schema

from .errors import InvalidRowsError, where

log = logging.getLogger(__name__)

BATCH = "_batch"
ANCHOR_BATCH = -1
LIVE_FILTER = f"{BATCH} >= 0"
FORMAT = b"1"
STATE_KEY = b"kvedit.state"
REQUIRED = ("edit_id", "created_at", "subject", "prompt", "target_new", "key", "residual")


def user_schema(spec: MemorySpec) -> pa.Schema:
    """The public edit schema of a memory (what `read` returns and `commit` accepts)."""
    return edit_schema(spec.d_key, spec.d_model, spec)


def stored_schema(spec: MemorySpec, name: str, state: dict | None = None) -> pa.Schema:
    """The Lance schema: the edit schema plus `_batch`; the metadata carries spec, name and version state."""
    base = user_schema(spec)
    meta = dict(spec.to_metadata())
    meta[b"kvedit.format"] = FORMAT
    meta[b"kvedit.memory"] = name.encode()
    if state is not None:
        meta[STATE_KEY] = json.dumps(state, sort_keys=True).encode()
    return pa.schema(list(base) + [pa.field(BATCH, pa.int64(), nullable=False)], metadata=meta)


def new_batch_id() -> int:
    """A random positive 62-bit id for one write."""
    return secrets.randbits(62) + 1


def to_user_table(stored: pa.Table, spec: MemorySpec) -> pa.Table:
    """Drop the internal column and give the rows the memory's public schema (with spec metadata)."""
    schema = user_schema(spec)
    return stored.select(schema.names).cast(schema)


def anchor_row(spec: MemorySpec) -> pa.Table:
    """The never-deleted first row of a fragment (see module docstring)."""
    schema = stored_schema(spec, "")
    cols = {
        "edit_id": [""],
        "job_id": [None],
        "created_at": [datetime(1970, 1, 1, tzinfo=timezone.utc)],
        "subject": [""],
        "prompt": [""],
        "target_new": [""],
        "target_true": [None],
        "layer": [spec.layer],
        "key": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(spec.d_key, np.float32)), spec.d_key),
        "residual": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(spec.d_model, np.float32)), spec.d_model),
        "model_fingerprint": [spec.model_fingerprint],
        "source": [None],
        "case_id": [None],
        BATCH: [ANCHOR_BATCH],
    }
    return pa.table({n: cols[n] for n in schema.names}, schema=schema.remove_metadata())


def _first_bad(ids, bad) -> str:
    """`edit_id 'x' (row i)` of the first row where the boolean array `bad` is true."""
    row = int(np.flatnonzero(np.asarray(bad))[0])
    return f"edit_id {ids[row].as_py()!r} (row {row})" if ids is not None else f"row {row}"


def _cast(col, typ: pa.DataType, column: str, memory: str, version: int | None, ids=None):
    """`col` cast to `typ`, or an `InvalidRowsError` naming the column and the first row that does not cast."""
    try:
        return col.cast(typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        bad = []
        for v in col.to_pylist():
            try:
                pa.array([v]).cast(typ)
                bad.append(False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                bad.append(True)
        at = f" at {_first_bad(ids, bad)}" if any(bad) else ""
        raise InvalidRowsError(f"{where(memory, version)}: column {column!r} cannot be read as {typ}{at}: {exc}", memory, version) from exc


def _vectors(table: pa.Table, column: str, width: int, what: str, memory: str, version: int | None, ids=None) -> pa.Array:
    """The column as fixed_size_list<float32>[width], or an error naming its real width or the first bad row."""
    arr = table.column(column).combine_chunks() if table.num_rows else pa.array([], pa.list_(pa.float32(), width))
    typ = arr.type
    if pa.types.is_fixed_size_list(typ):
        got = typ.list_size
        if got != width:
            raise MemoryMismatchError(
                f"{where(memory, version)}: rows have {column} of {got} values, the memory expects {what}={width}"
            )
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        lengths = pc.unique(pc.list_value_length(arr)).to_pylist() if len(arr) else []
        bad = [n for n in lengths if n is not None and n != width]
        if bad:
            raise MemoryMismatchError(
                f"{where(memory, version)}: rows have {column} of {bad[0]} values, the memory expects {what}={width}"
            )
    else:
        raise InvalidRowsError(f"{where(memory, version)}: column {column!r} has type {typ}, expected a list of float32", memory, version)
    if arr.null_count:
        at = _first_bad(ids, arr.is_null().to_numpy(zero_copy_only=False))
        raise InvalidRowsError(f"{where(memory, version)}: column {column!r} is null at {at}", memory, version)
    if pc.list_flatten(arr).null_count:  # the error path only: find the row in Python
        at = _first_bad(ids, [None in row for row in arr.to_pylist()])
        raise InvalidRowsError(f"{where(memory, version)}: column {column!r} has a null value at {at}", memory, version)
    target = pa.list_(pa.float32(), width)
    try:
        arr = arr.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidRowsError(f"{where(memory, version)}: column {column!r} cannot be read as float32[{width}]: {exc}", memory, version) from exc
    values = arr.flatten().to_numpy(zero_copy_only=False)
    if values.size and not np.isfinite(values).all():
        at = _first_bad(ids, ~np.isfinite(values.reshape(len(arr), width)).all(axis=1))
        raise InvalidRowsError(f"{where(memory, version)}: column {column!r} has NaN or infinite values at {at}", memory, version)
    return arr


def prepare_rows(
    table: pa.Table | pa.RecordBatch,
    spec: MemorySpec,
    memory: str,
    version: int | None,
    job_id: str | None = None,
    batch_id: int | None = None,
) -> pa.Table:
    """Validate rows against the memory's spec and return them in the stored schema.

    Checks the table's own `kvedit.spec` metadata (if any), the key/residual sizes, that every
    row's fingerprint and layer are the memory's, that edit_ids are present and unique, and that
    vectors are finite. Unknown columns (router-derived ones, for instance) are dropped: the
    store keeps only the edit schema, derived columns are rebuilt by whoever loads the memory.
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise InvalidRowsError(f"{where(memory, version)}: rows must be a pyarrow Table, got {type(table).__name__}", memory, version)
    meta = table.schema.metadata or {}
    if b"kvedit.spec" in meta:
        try:
            theirs = MemorySpec.from_metadata(meta)
        except (TypeError, ValueError, KeyError) as exc:
            raise InvalidRowsError(f"{where(memory, version)}: the rows' schema metadata 'kvedit.spec' is not a "
                                   f"memory spec: {exc}", memory, version) from exc
        spec.check(theirs, what=f"rows for {where(memory, version)}")
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise InvalidRowsError(f"{where(memory, version)}: rows lack column(s) {missing}", memory, version)
    schema = stored_schema(spec, memory).remove_metadata()
    extra = [c for c in table.column_names if c not in schema.names]
    if extra:
        log.debug("%s: ignoring non-schema columns %s", where(memory, version), extra)
    n = table.num_rows

    ids = _cast(table.column("edit_id"), pa.string(), "edit_id", memory, version)
    if ids.null_count or (n and pc.any(pc.equal(pc.utf8_length(ids), 0)).as_py()):
        row = next(i for i, v in enumerate(ids.to_pylist()) if not v)
        raise InvalidRowsError(f"{where(memory, version)}: row {row} has a null or empty edit_id", memory, version)
    if n and pc.count_distinct(ids).as_py() != n:
        counts = pc.value_counts(ids)
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:3]
        raise InvalidRowsError(f"{where(memory, version)}: duplicate edit_id(s) in the rows: {dup}", memory, version)

    def column_or(name: str, default) -> pa.ChunkedArray | pa.Array:
        if name in table.column_names:
            return table.column(name)
        return pa.array([default] * n, schema.field(name).type)

    fps = _cast(column_or("model_fingerprint", spec.model_fingerprint), pa.string(), "model_fingerprint", memory, version, ids)
    layers = _cast(column_or("layer", spec.layer), pa.int64(), "layer", memory, version, ids)
    bad_fp = sorted({f for f in pc.unique(fps).to_pylist() if f != spec.model_fingerprint}, key=str)
    bad_layer = sorted({x for x in pc.unique(layers).to_pylist() if x != spec.layer}, key=str)
    if bad_fp or bad_layer:
        parts = []
        if bad_fp:
            parts.append(f"model_fingerprint {bad_fp[0]!r} != expected {spec.model_fingerprint!r}")
        if bad_layer:
            parts.append(f"layer {bad_layer[0]!r} != expected {spec.layer}")
        raise MemoryMismatchError(f"rows for {where(memory, version)} do not match: " + "; ".join(parts))

    keys = _vectors(table, "key", spec.d_key, "d_key", memory, version, ids)
    residuals = _vectors(table, "residual", spec.d_model, "d_model", memory, version, ids)
    jobs = column_or("job_id", None).cast(pa.string())
    if job_id is not None and n:
        jobs = pc.fill_null(jobs, job_id)
    cols = {
        "edit_id": ids,
        "job_id": jobs,
        "created_at": column_or("created_at", None),
        "subject": column_or("subject", None),
        "prompt": column_or("prompt", None),
        "target_new": column_or("target_new", None),
        "target_true": column_or("target_true", None),
        "layer": layers,
        "key": keys,
        "residual": residuals,
        "model_fingerprint": fps,
        "source": column_or("source", None),
        "case_id": column_or("case_id", None),
        BATCH: pa.array([batch_id if batch_id is not None else new_batch_id()] * n, pa.int64()),
    }
    arrays = []
    for f in schema:
        col = _cast(cols[f.name], f.type, f.name, memory, version, ids)  # names the first row that does not cast
        if not f.nullable and col.null_count:
            raise InvalidRowsError(f"{where(memory, version)}: column {f.name!r} is null at "
                                   f"{_first_bad(ids, pc.is_null(col))}", memory, version)
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=schema)


def sql_str(value: str) -> str:
    """A SQL string literal for Lance filters (single quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def sql_in(column: str, values: list[str]) -> str:
    """`column IN ('a', 'b')` for a non-empty list of strings."""
    return f"{column} IN ({', '.join(sql_str(v) for v in values)})"
