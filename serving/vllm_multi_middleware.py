"""ASGI middleware of multi-memory vLLM replicas (`--middleware serving.vllm_multi_middleware.KveditMultiMiddleware`).

Everything `KveditMiddleware` does (sync at the request, per-version prefix-cache salt, the
served memory and version on the response, metrics), per request memory:

- POST /v1/completions, /v1/chat/completions, /v1/responses: the memory is chosen by the model
  field `BASE:MEMORY` or the `x-kvedit-memory` header (plain `BASE`: the default memory). The
  `kvedit_memory_sync` RPC resolves it (the default becomes a concrete name, so a swap during
  the request does not change its memory) and returns its version; the body goes to vLLM with
  `model: BASE` and `vllm_xargs.kvedit_memory: NAME` ("" = the base model), which the workers
  read from `SamplingParams.extra_args` to set the per-token memory index. A memory not served
  keeps the unknown model name, so vLLM answers its usual 404. The response's `model` is the
  name the client asked for.
- GET /v1/models: adds `BASE:MEMORY` for each memory served.
- GET /health: 200 with `{"status", "memory": <default>, "default_memory", "memories": [...]}`.
- GET|POST /admin/memory, DELETE /admin/memory/NAME: swap, add, remove (`kvedit_admin` RPC);
  the bearer API key of the server is required (vLLM's `--api-key` / VLLM_API_KEY); without
  one the admin endpoints answer 403.
"""

from __future__ import annotations

import json
import logging
import os
import secrets

from pydantic import ValidationError

from serving.openai_api import (
    HEADER_MEMORY,
    AdminMemoryRequest,
    MemoryChoiceError,
    ServedVersion,
    error_body,
    model_entries,
    requested_memory,
)
from serving.vllm_middleware import SALTED_PATHS, KveditMiddleware, _Exchange, _first

logger = logging.getLogger(__name__)

ADMIN_PATH = "/admin/memory"
XARG = "kvedit_memory"  # = serving.vllm_multi.XARG (not imported: that module needs the engine's torch setup)


def _header(scope, name: str) -> str | None:
    key = name.encode()
    for k, v in scope.get("headers", []):
        if k.lower() == key:
            return v.decode("latin-1")
    return None


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class KveditMultiMiddleware(KveditMiddleware):
    """Per-request memory choice, admin endpoints and memory reporting for multi-memory workers."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope.get("method"), scope.get("path", "")
        if path == ADMIN_PATH or path.startswith(ADMIN_PATH + "/"):
            return await self.admin(scope, receive, send, method, path)
        if method == "GET" and path in ("/health", "/v1/models"):
            return await _Rewrite(self, scope, receive, send).run()
        if method == "POST" and path in SALTED_PATHS:
            return await _MemoryExchange(self, scope, receive, send).run()
        return await super().__call__(scope, receive, send)

    async def rpc(self, scope, method: str, *args) -> dict | None:
        engine = scope["app"].state.engine_client
        status = _first(await engine.collective_rpc(method, args=args))
        if status is not None and method == "kvedit_sync":
            self.metrics.observe_memories(status)
        return status

    # ------------------------------------------------------------------ identity and auth
    @staticmethod
    def base_name(scope) -> str:
        args = scope["app"].state.args
        names = getattr(args, "served_model_name", None)
        return names[0] if names else args.model

    @staticmethod
    def keys(scope) -> list[str]:
        args = getattr(scope["app"].state, "args", None)
        return [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]

    def authorized(self, scope) -> bool:
        keys = self.keys(scope)
        scheme, _, token = (_header(scope, "authorization") or "").partition(" ")
        return not keys or (scheme.lower() == "bearer" and
                            any(secrets.compare_digest(token.strip().encode(), k.encode()) for k in keys))

    # ------------------------------------------------------------------ admin
    async def admin(self, scope, receive, send, method: str, path: str) -> None:
        if not self.keys(scope):
            return await _respond(send, 403, error_body("the admin endpoints are disabled: start the server with an API "
                                                        "key (--api-key or VLLM_API_KEY)", code="admin_disabled"))
        if not self.authorized(scope):
            return await _respond(send, 401, error_body("invalid or missing API key (send Authorization: Bearer KEY)",
                                                        code="invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        name = path[len(ADMIN_PATH) + 1:]
        if method == "GET" and not name:
            status = await self.rpc(scope, "kvedit_sync")
            return await _respond(send, 200, {k: status.get(k) for k in ("default", "layer", "memories")})
        if method == "DELETE" and name:
            return await self._admin_call(scope, send, "remove", name)
        if method == "POST" and not name:
            raw = await _read_body(receive)
            try:
                req = AdminMemoryRequest.model_validate_json(raw or b"{}")
            except ValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                loc = ".".join(str(x) for x in first.get("loc", ()))
                return await _respond(send, 400, error_body(f"{loc}: {first.get('msg', 'invalid request')}", param=loc))
            return await self._admin_call(scope, send, req.action, req.memory, req.keep_previous)
        return await _respond(send, 405, error_body(f"{method} {path} is not an admin operation: GET|POST {ADMIN_PATH}, "
                                                    f"DELETE {ADMIN_PATH}/NAME"))

    async def _admin_call(self, scope, send, action: str, memory: str, keep_previous: bool = False) -> None:
        out = await self.rpc(scope, "kvedit_admin", action, memory, keep_previous)
        if out is None or "error" in out:
            err = (out or {}).get("error") or {"status": 500, "type": "internal_error", "message": "no memory set"}
            return await _respond(send, err["status"], error_body(err["message"], err["type"], param="memory"))
        try:
            self.metrics.observe_memories(await self.rpc(scope, "kvedit_sync"))
        except Exception as exc:  # the switch is done; metrics catch up at the next scrape
            logger.warning("kvedit: cannot refresh memory metrics: %s", exc)
        return await _respond(send, 200, out["result"])


class _Rewrite:
    """GET /health and /v1/models: the app's answer, completed with the memories served."""

    def __init__(self, mw: KveditMultiMiddleware, scope, receive, send):
        self.mw, self.scope, self.receive, self._send = mw, scope, receive, send
        self.start: dict | None = None
        self.chunks: list[bytes] = []

    async def run(self) -> None:
        await self.mw.app(self.scope, self.receive, self.send)

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            if message["status"] != 200:
                self.start = None
                return await self._send(message)
            return
        if self.start is None or message["type"] != "http.response.body":
            return await self._send(message)
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self.chunks)
        try:
            status = await self.mw.rpc(self.scope, "kvedit_sync")  # applies staged versions: report what is served
            data = self.complete(json.loads(body) if body else {}, status or {})
            body = json.dumps(data).encode()
        except Exception as exc:  # keep the app's answer
            logger.warning("kvedit: cannot add the memories to %s: %s", self.scope.get("path"), exc)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await self._send(dict(self.start, headers=headers))
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    def complete(self, data, status: dict):
        memories = [m for m in status.get("memories") or () if not m.get("retired")]
        if self.scope.get("path") == "/v1/models":
            base = self.mw.base_name(self.scope)
            data["data"] = list(data.get("data") or []) + model_entries(base, sorted(m["memory"] for m in memories))[1:]
            return data
        default = status.get("default")
        out = {"status": "ok", "default_memory": default,
               "memories": [{"memory": m["memory"], "version": m["version"], "facts": m["facts"],
                             "pinned": m.get("pinned"), "default": m["memory"] == default} for m in memories]}
        if default is not None:
            out["memory"] = ServedVersion(default, status.get("version")).body()
        return out


class _MemoryExchange(_Exchange):
    """One completion request: its memory chosen, resolved and reported."""

    def __init__(self, *args):
        super().__init__(*args)
        self.requested_model: str | None = None
        self.memory: str | None = None

    async def receive(self):
        if self.synced:
            return await self._receive()
        self.synced = True
        raw = await _read_body(self._receive)
        return {"type": "http.request", "body": await self._choose(raw), "more_body": False}

    async def _choose(self, raw: bytes) -> bytes:
        try:
            data = json.loads(raw)
        except ValueError:
            return raw  # vLLM answers the malformed body with its own 400
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            return raw
        base = self.mw.base_name(self.scope)
        header = _header(self.scope, HEADER_MEMORY)
        try:
            name = requested_memory(data["model"], base, header)
        except MemoryChoiceError:
            return raw if header is None else self._unknown(data, base, header)
        try:
            self.before = await self.mw.rpc(self.scope, "kvedit_memory_sync", name)
        except Exception as exc:
            self.failed = True
            logger.warning("kvedit: memory sync failed (%s); serving with a one-off cache salt", exc)
        if self.before is not None and "error" in self.before:
            return self._unknown(data, base, name or "")
        self.memory = name if self.before is None else self.before.get("memory")
        self.requested_model = data["model"]
        data["model"] = base
        xargs = data.get("vllm_xargs") if isinstance(data.get("vllm_xargs"), dict) else {}
        if not (self.failed and name is None):  # unresolved default: leave it to the worker's default
            xargs = {**xargs, XARG: self.memory or ""}
        data["vllm_xargs"] = xargs
        return self._salted(json.dumps(data).encode())

    def _unknown(self, data: dict, base: str, name: str) -> bytes:
        """Keep (or make) the model name unknown to vLLM, which answers 404 naming it."""
        self.before = None
        data["model"] = f"{base}:{name}"
        return json.dumps(data).encode()

    async def status_after(self) -> dict | None:
        if not self.memory:
            return self.before
        return await self.mw.rpc(self.scope, "kvedit_memory_status", self.memory)

    def annotate(self, data: dict, served: ServedVersion) -> None:
        super().annotate(data, served)
        if self.requested_model is not None:
            data["model"] = self.requested_model
