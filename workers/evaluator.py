"""`Evaluator`: checks committed edits against a memory version, with the memory attached to its own model."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)


class Evaluator:
    """Keeps one routed memory attached to each model it loaded and follows its versions.

    Each call brings the attached memory to the requested version (by delta from the last
    version it saw, or a full load), then measures efficacy of the given requests: is the new
    target more likely than the true one after each prompt.
    """

    def __init__(self, device: str | None = None):
        from workers.common import EditorCache

        self.cache = EditorCache(device)
        # model -> (editor, (store, memory), RoutedFFN, version): one memory at a time per model, since editors of
        # one model (other layers or settings) share its weights: a memory left attached at another layer would be
        # measured with the next one, and its buffers never freed.
        self._attached: dict[str, tuple[object, tuple[str, str], object, int]] = {}
        self._stores: dict[tuple[str, str | None], object] = {}

    def ready(self) -> int:
        return os.getpid()

    def warm(self, model: str, layer: int) -> int:
        """Load the model ahead of the first evaluation; returns the pid."""
        self.cache.editor(model, {"layer": layer})
        return os.getpid()

    def _store(self, store: str, redis_url: str | None):
        from store import MemoryStore

        key = (store, redis_url)
        if key not in self._stores:
            self._stores[key] = MemoryStore(store, redis_url=redis_url)
        return self._stores[key]

    def _memory_at(self, model: str, ed, st, memory: str, version: int, stats_key: str | None):
        """The editor's model with `memory` at `version` attached: its rows, its threshold (a calibrated
        memory re-chooses it at every commit) and its REP robust-keys adapter, as a replica serves it."""
        from editing.stats import SecondMoment
        from editing.table import table_tensors
        from store import StoreError
        from store.artifacts import read_robust_keys

        key = (st.root, memory)
        held = self._attached.get(model)
        routed = ed.memory
        if held is not None and held[0] is ed and held[1] == key and held[2] is routed and held[3] <= version:
            if held[3] < version:
                try:
                    delta = st.changes(memory, since=held[3], until=version)
                    ids, k, v = table_tensors(delta.added, ed.spec)
                    adapter = read_robust_keys(st, delta.router, ed.spec.d_key, f"memory {memory!r} v{version}")
                    routed.apply(ids, k, v, list(delta.deleted), version=version)
                    self._set_gate(routed, delta.router, adapter)
                    self._attached[model] = (ed, key, routed, version)
                    return routed
                except StoreError as exc:  # e.g. the base version was compacted away
                    log.info("memory %s: delta from v%d unavailable (%s); reloading", memory, held[3], exc)
            else:
                return routed
        if held is not None:  # another memory, or the same one at another layer: off the shared weights first
            held[0].detach()
            del self._attached[model]
        info, table = st.load(memory, version, spec=ed.spec)
        router = info.router.get("name", "cosine")
        stats = None
        if router == "whitened":
            if stats_key is None:
                raise ValueError(f"memory {memory!r} uses the whitened router but the job has no statistics")
            blob = st.get_artifact("stats", stats_key)
            if blob is None:
                raise ValueError(f"statistics {stats_key} are not in the store")
            stats = SecondMoment.from_bytes(blob[0])
        adapter = read_robust_keys(st, info.router, ed.spec.d_key, f"memory {memory!r} v{version}")
        ed.detach()
        routed = ed.attach(table, router=router, threshold=info.router.get("threshold"), stats=stats)
        self._set_gate(routed, info.router, adapter)
        routed.version = version
        self._attached[model] = (ed, key, routed, version)
        return routed

    @staticmethod
    def _set_gate(routed, router: dict | None, adapter) -> None:
        """The version's threshold (the router's default when it names none) and robust-keys adapter."""
        thr = (router or {}).get("threshold")
        routed.threshold.fill_(routed.router.default_threshold if thr is None else float(thr))
        routed.query_adapter = None if adapter is None else adapter.to(routed.rows.device)

    def evaluate(self, store: str, redis_url: str | None, memory: str, version: int, model: str, layer: int,
                 requests: list, edit_ids: list[str], stats_key: str | None = None) -> dict:
        """Efficacy of `requests` with `memory` at `version` attached.

        Returns {"efficacy": {edit_id: bool}, "version", "seconds"}.
        """
        t0 = time.perf_counter()
        ed = self.cache.editor(model, {"layer": layer})
        st = self._store(store, redis_url)
        self._memory_at(model, ed, st, memory, version, stats_key)
        flags = ed.efficacy(requests)
        return {"efficacy": dict(zip(edit_ids, map(bool, flags))), "version": version,
                "seconds": time.perf_counter() - t0}
