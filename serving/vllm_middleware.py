"""ASGI middleware for vLLM's OpenAI server (`--middleware serving.vllm_middleware.KveditMiddleware`).

For POST /v1/completions, /v1/chat/completions and /v1/responses it:
1. when the handler reads the request body (so after vLLM's API-key check), calls the
   `kvedit_sync` worker RPC: staged memory versions are applied now, between steps, and
   the version the request will be served with comes back;
2. salts the request's prefix-cache key with that version (`cache_salt`, appended to any
   salt the client gave), so KV cached under another memory version is never reused;
3. when the response is complete, asks `kvedit_status` again and adds the served version
   to the response: headers `x-kvedit-memory` / `x-kvedit-memory-version` and body field
   `kvedit: {"memory", "version"}` (plus `first_version` if a new version was applied
   while the request ran). Streaming responses get the headers only, with the start version;
4. records the kvedit Prometheus metrics (`serving.metrics`) in vLLM's registry; GET
   /metrics first refreshes the memory gauges through `kvedit_sync`.

If the RPC fails (e.g. the server was started without the worker extension), the request
still runs, with a random one-off cache salt (no stale prefix reuse) and version "unknown".
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from prometheus_client import REGISTRY

from serving.metrics import INFERENCE_PATHS, ServingMetrics
from serving.openai_api import ServedVersion, cache_salt

logger = logging.getLogger(__name__)

SALTED_PATHS = INFERENCE_PATHS
# GET /metrics waits this long for the memory refresh (an RPC that runs between engine steps, so a long prefill
# delays it); past it the scrape gets the last values and the refresh lands when the step ends.
METRICS_REFRESH_S = 2.0


def _log_refresh_error(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("kvedit: cannot refresh memory metrics: %s", task.exception())


def _first(results) -> dict | None:
    for r in results or ():
        if r is not None:
            return r
    return None


class KveditMiddleware:
    """Pure ASGI middleware: memory-version sync, prefix-cache salting, version reporting, metrics."""

    def __init__(self, app):
        self.app = app
        self.metrics = ServingMetrics.shared(REGISTRY)
        self.metrics.declare_endpoints(SALTED_PATHS)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope.get("method"), scope.get("path", "")
        if method == "GET" and path == "/metrics":
            await self.refresh_metrics(scope)
            return await self.app(scope, receive, send)
        if method != "POST" or path not in SALTED_PATHS:
            return await self.app(scope, receive, send)
        await _Exchange(self, scope, receive, send).run()

    async def refresh_metrics(self, scope, timeout: float = METRICS_REFRESH_S) -> bool:
        """Refresh the memory metrics through `kvedit_sync`, waiting at most `timeout` s (a scrape must not
        time out behind a long step). A refresh still running goes on and updates the metrics when the step
        ends (its drained reload latencies are not lost). True if it finished in time."""
        task = asyncio.ensure_future(self.rpc(scope, "kvedit_sync"))
        task.add_done_callback(_log_refresh_error)
        done, _ = await asyncio.wait({task}, timeout=timeout)  # never raises: errors are logged by the callback
        if not done:
            logger.debug("kvedit: memory metrics refresh still running after %.1f s; last values served", timeout)
        return bool(done) and task.exception() is None

    async def rpc(self, scope, method: str) -> dict | None:
        """Call a kvedit worker RPC; the first worker's answer (TP ranks agree). Updates metrics."""
        engine = scope["app"].state.engine_client
        status = _first(await engine.collective_rpc(method))
        if status is not None and method == "kvedit_sync":
            self.metrics.observe_memory(status)
        return status


class _Exchange:
    """One completion request going through the middleware."""

    def __init__(self, mw: KveditMiddleware, scope, receive, send):
        self.mw, self.scope, self._receive, self._send = mw, scope, receive, send
        self.t0 = time.perf_counter()
        self.synced = False
        self.failed = False
        self.before: dict | None = None
        self.start: dict | None = None
        self.chunks: list[bytes] = []
        self.buffering = False

    async def run(self) -> None:
        await self.mw.app(self.scope, self.receive, self.send)

    # ------------------------------------------------------------------ request
    async def receive(self):
        if self.synced:
            return await self._receive()
        self.synced = True
        chunks: list[bytes] = []
        while True:
            msg = await self._receive()
            if msg["type"] != "http.request":
                return msg  # client went away
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        try:
            self.before = await self.mw.rpc(self.scope, "kvedit_sync")
        except Exception as exc:
            self.failed = True
            logger.warning("kvedit: memory sync failed (%s); serving with a one-off cache salt", exc)
        return {"type": "http.request", "body": self._salted(b"".join(chunks)), "more_body": False}

    def _salted(self, body: bytes) -> bytes:
        if self.failed:
            salt = f"kvedit-unknown-{uuid.uuid4().hex}"
        elif self.before is not None and self.before.get("version") is not None:
            salt = cache_salt(self.before["memory"], self.before["version"])
        else:
            return body  # no memory: nothing can go stale
        try:
            data = json.loads(body)
        except ValueError:
            return body  # vLLM answers the malformed body with its own 400
        if not isinstance(data, dict):
            return body
        user = data.get("cache_salt")
        data["cache_salt"] = f"{salt}-{user}"[:128] if isinstance(user, str) and user else salt
        return json.dumps(data).encode()

    # ------------------------------------------------------------------ response
    def _served(self, after: dict | None) -> ServedVersion | None:
        if self.failed:
            return ServedVersion(None, None, unknown=True)
        return ServedVersion.from_status(self.before, after)

    async def send(self, message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
            headers = {k.lower(): v for k, v in message.get("headers", [])}
            ctype = headers.get(b"content-type", b"").decode("latin-1")
            if self.synced and message["status"] == 200 and "application/json" in ctype:
                self.buffering = True
                return
            if self.synced and message["status"] == 200:  # streaming: headers only, start version
                served = self._served(None)
                if served is not None:
                    message = dict(message, headers=self._headers(message, served))
            return await self._send(message)
        if kind != "http.response.body":
            return await self._send(message)
        if not self.buffering:
            if not message.get("more_body", False):
                self._observe(self.start["status"] if self.start else 500, None)
            return await self._send(message)
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        await self._finish()

    async def status_after(self) -> dict | None:
        """The memory status once the response is complete (subclasses ask about their memory)."""
        return await self.mw.rpc(self.scope, "kvedit_status")

    def annotate(self, data: dict, served: ServedVersion) -> None:
        """Add the served memory to a JSON response body."""
        data["kvedit"] = served.body()

    async def _finish(self) -> None:
        body = b"".join(self.chunks)
        after = None
        if not self.failed and self.before is not None:
            try:
                after = await self.status_after()
            except Exception as exc:
                logger.warning("kvedit: memory status after the request failed: %s", exc)
        served = self._served(after)
        usage = None
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            usage = data.get("usage")
            if served is not None:
                self.annotate(data, served)
                body = json.dumps(data).encode()
        start = dict(self.start)
        headers = self._headers(start, served) if served is not None else list(start.get("headers", []))
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        start["headers"] = headers
        self._observe(start["status"], usage)
        await self._send(start)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    @staticmethod
    def _headers(start: dict, served: ServedVersion) -> list[tuple[bytes, bytes]]:
        extra = served.headers()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower().decode("latin-1") not in extra]
        headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        return headers

    def _observe(self, status: int, usage: dict | None) -> None:
        self.mw.metrics.observe_request(self.scope.get("path", ""), status, time.perf_counter() - self.t0, usage)
