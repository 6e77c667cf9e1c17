"""What every worker actor shares: one loaded model per process, and Arrow tables as IPC bytes.

Workers are plain classes: `cluster.runtime` turns them into Ray actors, and tests or
benchmarks can use them in-process. They call `editing` for all of the math.
"""

from __future__ import annotations

import json
import logging
import os
import threading

import pyarrow as pa
import pyarrow.ipc as ipc

log = logging.getLogger(__name__)


def table_to_ipc(table: pa.Table) -> bytes:
    """An Arrow table as IPC stream bytes (schema metadata included)."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(data: bytes) -> pa.Table:
    return ipc.open_stream(pa.py_buffer(data)).read_all()


def default_device() -> str:
    """`cuda` when this actor was given a GPU, else `cpu`."""
    try:
        import ray

        if ray.is_initialized() and ray.get_gpu_ids():
            return "cuda"
    except Exception:  # noqa: BLE001 - outside Ray, or no runtime context
        pass
    return "cpu"


def quiet_libraries() -> None:
    """No download/progress bars from worker processes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - transformers missing is reported by the model load itself
        pass


class EditorCache:
    """Loads each model once per process and hands out `Editor`s for per-job settings.

    Editors for different settings share the loaded weights and tokenizer; each keeps its own
    config (layer, optimiser steps...) and context templates.
    """

    def __init__(self, device: str | None = None):
        quiet_libraries()
        self.device = device or default_device()
        self._models: dict[str, tuple] = {}
        self._editors: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def editor(self, model: str, overrides: dict | None = None):
        from editing import EditConfig, Editor
        from editing.models import load_model

        key = (model, json.dumps(overrides or {}, sort_keys=True))
        with self._lock:
            ed = self._editors.get(key)
            if ed is not None:
                return ed
            if model not in self._models:
                log.info("loading model %s on %s (pid %d)", model, self.device, os.getpid())
                self._models[model] = load_model(model, device=self.device)
            m, tok = self._models[model]
            ed = Editor(m, tok, EditConfig.for_model(model, **(overrides or {})), model_name=model)
            self._editors[key] = ed
            return ed

    def describe(self, model: str, overrides: dict | None = None) -> dict:
        """The memory spec (model fingerprint, layer, key/value sizes) of `model` under these settings."""
        ed = self.editor(model, overrides)
        return dict(ed.spec.__dict__)
