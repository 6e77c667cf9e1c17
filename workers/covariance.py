"""`CovarianceBuilder`: second-moment statistics of one shard of the corpus at the edit layer."""

from __future__ import annotations

import os
import time

from workers.common import EditorCache


class CovarianceBuilder:
    """Computes partial `SecondMoment`s (sum of k k^T and a token count) that merge exactly."""

    def __init__(self, device: str | None = None):
        self.cache = EditorCache(device)

    def ready(self) -> int:
        return os.getpid()

    def partial(self, model: str, layer: int, chunks: list[list[int]], batch_size: int = 8) -> dict:
        """Statistics of `chunks` (token-id lists) at `layer`: {"stats": SecondMoment bytes, "tokens", "seconds"}."""
        from editing.models import fingerprint
        from editing.stats import collect_second_moment

        ed = self.cache.editor(model, {"layer": layer})
        t0 = time.perf_counter()
        meta = {"model_fingerprint": fingerprint(ed.model), "layer": layer}
        sm = collect_second_moment(ed.model, ed.adapter, layer, chunks, batch_size=batch_size, meta=meta)
        return {"stats": sm.to_bytes(), "tokens": sm.count, "seconds": time.perf_counter() - t0}
