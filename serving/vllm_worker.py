"""vLLM worker extension (`--worker-extension-cls serving.vllm_worker.KveditWorkerExtension`).

vLLM appends this class to the worker's bases, so its methods are callable with
`engine_client.collective_rpc("kvedit_sync")` from the API server. RPCs run in the
worker's main thread between forward steps, so `kvedit_sync` is a step boundary too:
the middleware calls it before each completion request, which applies any staged
version and tells the request which version it is served with.

Method names are prefixed `kvedit_` so they never clash with the worker's own.
"""

from __future__ import annotations

from torch import nn


class KveditWorkerExtension:
    """RPC methods on every vLLM worker (one result per worker; TP ranks agree)."""

    def _kvedit_memory(self):
        runner = self.model_runner  # type: ignore[attr-defined]
        model: nn.Module = runner.get_model() if hasattr(runner, "get_model") else runner.model
        return getattr(model, "kvedit", None)

    def kvedit_sync(self) -> dict | None:
        """Apply staged versions now (between steps) and return the status, draining reload latencies."""
        memory = self._kvedit_memory()
        if memory is None:
            return None
        memory.boundary()
        return memory.status(drain=True)

    def kvedit_status(self) -> dict | None:
        """The status without applying anything (reload latencies kept for the next sync)."""
        memory = self._kvedit_memory()
        return None if memory is None else memory.status(drain=False)

    def kvedit_set_routing(self, on: bool) -> dict | None:
        """Route the edit layer (True) or run the stock MLP (False), between steps; returns the status.

        A diagnostic for measuring routing's cost on one engine (eager mode only); the memory
        keeps following new versions either way.
        """
        memory = self._kvedit_memory()
        if memory is None:
            return None
        memory.boundary()
        memory.set_routing(bool(on))
        return memory.status(drain=False)
