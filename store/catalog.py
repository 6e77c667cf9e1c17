"""The list of memories in a store, kept in a small Lance dataset so `ls` works on any URI.

A memory is added after its dataset was created. On local stores `names` also scans the
directory, which covers a writer killed between the two steps.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone

import lance
import pyarrow as pa

from .lancefs import NAME_RE, _not_found, append_rows, session

log = logging.getLogger(__name__)

SCHEMA = pa.schema([pa.field("name", pa.string(), nullable=False), pa.field("added_at", pa.timestamp("us", tz="UTC"))])


class Catalog:
    """Names of the memories under one store root."""

    def __init__(self, root: str, is_local: bool, storage_options: dict | None = None):
        self.root, self.is_local, self.storage_options = root, is_local, storage_options
        self.uri = f"{root}/_catalog.lance"

    def add(self, name: str) -> None:
        row = pa.table({"name": [name], "added_at": [datetime.now(timezone.utc)]}, schema=SCHEMA)
        append_rows(self.uri, row, self.storage_options)

    def names(self) -> list[str]:
        found: set[str] = set()
        try:
            ds = lance.dataset(self.uri, session=session(), storage_options=self.storage_options)
            found.update(ds.to_table(columns=["name"]).column("name").to_pylist())
        except (ValueError, OSError) as exc:
            if not _not_found(str(exc)):
                raise
        if self.is_local and os.path.isdir(self.root):
            for entry in os.listdir(self.root):
                stem = entry[: -len(".lance")] if entry.endswith(".lance") else None
                if stem and NAME_RE.match(stem) and os.path.isdir(os.path.join(self.root, entry, "_versions")):
                    found.add(stem)
        return sorted(found)
