"""The Arrow schema of computed edits: one row per fact, shared by `edit run`, the store and serving.

A row holds the key (FFN activation at the subject's last token, averaged over contexts)
and the residual added to the FFN output when the router gates that key on.
Memory-wide facts (model fingerprint, layer, key/value sizes) are also kept in the schema
metadata, so a file alone says which model and layer it belongs to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

EDIT_FILE = "edits.arrow"


class MemoryMismatchError(ValueError):
    """A memory (or rows) built for another model fingerprint, layer or key/value size."""


@dataclass(frozen=True)
class MemorySpec:
    """What a memory is bound to: a model, a layer and the key/value sizes."""

    model_fingerprint: str
    layer: int
    d_key: int
    d_model: int

    def to_metadata(self) -> dict[bytes, bytes]:
        return {b"kvedit.spec": json.dumps(self.__dict__).encode()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> "MemorySpec":
        if not metadata or b"kvedit.spec" not in metadata:
            raise MemoryMismatchError("table has no kvedit.spec metadata (not a kvedit edit table)")
        return cls(**json.loads(metadata[b"kvedit.spec"]))

    def check(self, other: "MemorySpec", what: str = "memory") -> None:
        """Raise `MemoryMismatchError` naming each field where `other` differs from this spec."""
        diffs = [
            f"{k}: {getattr(other, k)!r} != expected {getattr(self, k)!r}"
            for k in ("model_fingerprint", "layer", "d_key", "d_model")
            if getattr(self, k) != getattr(other, k)
        ]
        if diffs:
            raise MemoryMismatchError(f"{what} does not match: " + "; ".join(diffs))


def edit_schema(d_key: int, d_model: int, spec: MemorySpec | None = None) -> pa.Schema:
    """Arrow schema of edit rows; `key` is float32[d_key] and `residual` float32[d_model]."""
    fields = [
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("job_id", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("target_new", pa.string(), nullable=False),
        pa.field("target_true", pa.string()),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("key", pa.list_(pa.float32(), d_key), nullable=False),
        pa.field("residual", pa.list_(pa.float32(), d_model), nullable=False),
        pa.field("model_fingerprint", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("case_id", pa.string()),
    ]
    return pa.schema(fields, metadata=spec.to_metadata() if spec else None)


def make_edit_id(fingerprint: str, layer: int, subject: str, prompt: str, target_new: str) -> str:
    """Content id of an edit: the same fact on the same model and layer gets the same id."""
    h = hashlib.sha256(json.dumps([fingerprint, layer, subject, prompt, target_new]).encode())
    return h.hexdigest()[:20]


def build_edit_table(
    spec: MemorySpec,
    requests,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    edit_ids: list[str] | None = None,
    job_id: str | None = None,
) -> pa.Table:
    """Rows for computed edits.

    Args:
        requests: n `EditRequest`s.
        keys: [n, d_key] float.
        residuals: [n, d_model] float.
        edit_ids: n ids; content ids (`make_edit_id`) when omitted.
    """
    n = len(requests)
    if keys.shape != (n, spec.d_key) or residuals.shape != (n, spec.d_model):
        raise MemoryMismatchError(
            f"keys {tuple(keys.shape)} / residuals {tuple(residuals.shape)} do not match "
            f"{n} records of d_key={spec.d_key}, d_model={spec.d_model}"
        )
    if edit_ids is None:
        edit_ids = [make_edit_id(spec.model_fingerprint, spec.layer, r.subject, r.prompt, r.target_new) for r in requests]
    now = datetime.now(timezone.utc)
    k = keys.detach().to("cpu", torch.float32).numpy().reshape(-1)
    v = residuals.detach().to("cpu", torch.float32).numpy().reshape(-1)
    schema = edit_schema(spec.d_key, spec.d_model, spec)
    cols = {
        "edit_id": edit_ids,
        "job_id": [job_id] * n,
        "created_at": [now] * n,
        "subject": [r.subject for r in requests],
        "prompt": [r.prompt for r in requests],
        "target_new": [r.target_new for r in requests],
        "target_true": [r.target_true for r in requests],
        "layer": [spec.layer] * n,
        "key": pa.FixedSizeListArray.from_arrays(pa.array(k, pa.float32()), spec.d_key),
        "residual": pa.FixedSizeListArray.from_arrays(pa.array(v, pa.float32()), spec.d_model),
        "model_fingerprint": [spec.model_fingerprint] * n,
        "source": [r.source for r in requests],
        "case_id": [r.case_id for r in requests],
    }
    return pa.table({name: cols[name] for name in schema.names}, schema=schema)


def table_tensors(table: pa.Table, spec: MemorySpec | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(edit_ids, keys [n, d_key], residuals [n, d_model]) of an edit table, as float32 CPU tensors.

    With `spec`, every row's fingerprint and layer are checked against it.
    """
    n = table.num_rows
    if spec is not None and n:
        fps = set(table.column("model_fingerprint").to_pylist())
        layers = set(table.column("layer").to_pylist())
        if fps != {spec.model_fingerprint} or layers != {spec.layer}:
            raise MemoryMismatchError(
                f"rows are for fingerprints {sorted(fps)} and layers {sorted(layers)}, "
                f"not {spec.model_fingerprint} layer {spec.layer}"
            )
    ids = table.column("edit_id").to_pylist()

    def mat(name: str) -> torch.Tensor:
        col = table.column(name).combine_chunks()
        width = col.type.list_size
        flat = col.flatten().to_numpy(zero_copy_only=False) if n else np.zeros(0, np.float32)
        return torch.from_numpy(np.array(flat, dtype=np.float32, copy=True).reshape(n, width))

    return ids, mat("key"), mat("residual")


def write_edit_table(table: pa.Table, out_dir: str | Path) -> Path:
    """Write an edit table as an Arrow IPC file `out_dir/edits.arrow` (atomically, via rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EDIT_FILE
    tmp = path.with_suffix(".arrow.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    tmp.replace(path)
    return path


def read_edit_table(path: str | Path) -> tuple[MemorySpec, pa.Table]:
    """Read `edits.arrow` (or a folder holding it); returns its spec and table."""
    path = Path(path)
    if path.is_dir():
        path = path / EDIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no edit table")
    try:
        with pa.memory_map(str(path)) as src:
            table = ipc.open_file(src).read_all()
    except pa.ArrowInvalid as exc:
        raise MemoryMismatchError(f"{path}: corrupt or truncated edit table: {exc}") from exc
    return MemorySpec.from_metadata(table.schema.metadata), table
