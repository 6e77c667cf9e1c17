"""Edit tables as files: Parquet (for pandas, duckdb, Spark...) and Arrow IPC, local or any fsspec URI.

Exported files carry the memory's spec, router config, version and metadata in the schema
metadata, so `import` of an exported file into an empty store recreates the memory.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from editing.table import MemoryMismatchError, MemorySpec

from .errors import CorruptFileError, StoreError

FORMATS = ("parquet", "arrow")


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def write_table_file(table: pa.Table, out: str | os.PathLike, fmt: str = "parquet") -> int:
    """Write `table` to `out` as Parquet or Arrow IPC; local files appear atomically. Returns bytes written."""
    if fmt not in FORMATS:
        raise StoreError(f"export: unknown format {fmt!r} (use one of {', '.join(FORMATS)})")
    out = str(out)

    def write(sink) -> None:
        if fmt == "parquet":
            pq.write_table(table, sink, compression="zstd")
        else:
            with ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)

    if _is_local(out):
        path = Path(_local(out))
        if path.is_dir():
            raise StoreError(f"{out}: is a directory; give a file name to write the table to")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # unique per writer thread
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(tmp), "wb") as sink:
                write(sink)
            with open(tmp, "rb+") as fh:  # on disk before the rename makes it visible
                os.fsync(fh.fileno())
            tmp.replace(path)
        except OSError as exc:
            raise StoreError(f"{out}: cannot write the table: {exc}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        return path.stat().st_size
    with fsspec.open(out, "wb") as fh:  # object stores make a single PUT visible atomically
        sink = pa.PythonFile(fh, mode="w")
        write(sink)
        return sink.tell()


def read_table_file(path: str | os.PathLike, memory: str | None = None, version: int | None = None) -> tuple[MemorySpec | None, pa.Table]:
    """(spec from the file's metadata or None, table) of a Parquet or Arrow IPC (file or stream) edit table.

    Raises `CorruptFileError` naming the file and the memory/version it was meant for when the
    file is missing, truncated or not a table.
    """
    path = str(path)
    target = f" (import into memory {memory!r}" + (f" at v{version})" if version is not None else ")") if memory else ""
    try:
        with fsspec.open(path, "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise CorruptFileError(f"{path}: no such file{target}", memory, version) from exc
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read{target}: {exc}", memory, version) from exc
    buf = pa.py_buffer(data)
    try:
        if data[:4] == b"PAR1":
            table = pq.read_table(pa.BufferReader(buf))
        elif data[:6] == b"ARROW1":
            table = ipc.open_file(buf).read_all()
        else:
            table = ipc.open_stream(buf).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CorruptFileError(f"{path}: corrupt or truncated edit table{target}: {exc}", memory, version) from exc
    meta = table.schema.metadata or {}
    spec = None
    if b"kvedit.spec" in meta:
        try:
            spec = MemorySpec.from_metadata(meta)
        except (MemoryMismatchError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{path}: unreadable kvedit.spec metadata{target}: {exc}", memory, version) from exc
    return spec, table


def file_router(table: pa.Table) -> dict | None:
    """The router config an exported file carries, if any."""
    raw = (table.schema.metadata or {}).get(b"kvedit.router")
    return None if raw is None else json.loads(raw)
