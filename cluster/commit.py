"""Commit computed edits into a named store memory (shared by `edit run` and the job workers)."""

from __future__ import annotations

import pyarrow as pa


def router_config(name: str, threshold: float | None) -> dict:
    """The router configuration a memory is bound to."""
    from editing.routers import ROUTERS

    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(sorted(ROUTERS))}")
    return {"name": name, "threshold": ROUTERS[name].default_threshold if threshold is None else float(threshold)}


def open_store(store: str | None = None, redis_url: str | None = None):
    from store import MemoryStore

    return MemoryStore(store, redis_url=redis_url)


def commit_edits(editor, table: pa.Table, memory: str, store: str | None, redis_url: str | None, router: str,
                 threshold: float | None = None, job_id: str | None = None) -> dict:
    """Create `memory` if needed (bound to the editor's model, layer and router) and commit `table`.

    Returns {"memory", "version", "store"}. Raises the store's errors (mismatched spec or
    router, unreachable Redis) before anything is written.
    """
    st = open_store(store, redis_url)
    st.create(memory, editor.spec, router_config(router, threshold), exist_ok=True)
    v = st.commit(memory, add=table, message=f"edit run: {table.num_rows} edits", job_id=job_id)
    return {"memory": memory, "version": v.version, "store": st.root}
