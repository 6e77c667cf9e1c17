"""`ValueOptimiser`: computes the keys and residuals of one batch of edits (one actor = one loaded model)."""

from __future__ import annotations

import logging
import os
import time

from workers.common import EditorCache, table_to_ipc

log = logging.getLogger(__name__)


class ValueOptimiser:
    """Runs `Editor.compute` on batches of validated `EditRequest`s.

    The model is loaded once, on the first call that names it; later batches reuse it.
    """

    def __init__(self, device: str | None = None):
        self.cache = EditorCache(device)

    def ready(self) -> int:
        """The actor's pid (used to check the actor is up)."""
        return os.getpid()

    def describe(self, model: str, overrides: dict | None = None) -> dict:
        """Load `model` (if not yet) and return its memory spec under these settings."""
        spec = self.cache.describe(model, overrides)
        _ = self.cache.editor(model, overrides).templates  # sampled once, before the first batch
        return spec

    def optimise(self, model: str, overrides: dict | None, requests: list, edit_ids: list[str], job_id: str) -> dict:
        """Compute one batch.

        Returns {"table": Arrow IPC bytes of the edit rows, "edit_ids", "loss", "nll", "steps"
        (per edit), "seconds", "pid"}. Raises `EditRecordError` for a bad record (nothing computed).
        """
        ed = self.cache.editor(model, overrides)
        t0 = time.perf_counter()
        edits = ed.compute(requests, edit_ids=edit_ids, job_id=job_id)
        log.info("job %s: optimised %d edits in %.1fs", job_id, len(requests), time.perf_counter() - t0)
        return {
            "table": table_to_ipc(edits.table), "edit_ids": list(edits.edit_ids), "loss": list(edits.loss),
            "nll": list(edits.nll), "steps": list(edits.steps), "seconds": edits.seconds, "pid": os.getpid(),
        }

    def calibrate(self, store: str, redis_url: str | None, memory: str, model: str, overrides: dict | None, table: bytes,
                  requests: dict, stats_key: str | None = None) -> dict | None:
        """The recalibrated router-config patch for committing `table` (Arrow IPC bytes) into `memory`
        (`cluster.commit.calibrated_router`); None unless the memory is calibrated."""
        from cluster.commit import calibrated_router, open_store
        from editing.stats import SecondMoment
        from workers.common import ipc_to_table

        ed = self.cache.editor(model, overrides)
        st = open_store(store, redis_url)
        try:
            blob = st.get_artifact("stats", stats_key) if stats_key else None
            stats = SecondMoment.from_bytes(blob[0]) if blob else None
            return calibrated_router(ed, st, memory, ipc_to_table(table), requests, stats=stats)
        finally:
            st.close()

    def robust_keys(self, store: str, redis_url: str | None, memory: str, model: str, overrides: dict | None,
                    records_by_id: dict) -> dict:
        """Retrain `memory`'s REP adapter on all its rows and commit it (`cluster.robust.train_robust_keys`,
        keeping its settings); `records_by_id` ({edit_id: EditRequest}) are the records of rows whose
        rephrasings are not stored yet."""
        from cluster.commit import open_store
        from cluster.robust import train_robust_keys

        ed = self.cache.editor(model, overrides)
        st = open_store(store, redis_url)
        try:
            return train_robust_keys(ed, st, memory, records_by_id=records_by_id)
        finally:
            st.close()
