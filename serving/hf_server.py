"""OpenAI-compatible server over transformers (`kvedit serve --backend hf`), for hosts without vLLM.

    GET  /health               200 once the model and memory are loaded (always open)
    GET  /metrics              Prometheus text (always open; serving.metrics)
    GET  /v1/models            the base name and BASE:MEMORY for each memory served
    POST /v1/completions       non-streaming; greedy when temperature == 0
    POST /v1/chat/completions  non-streaming; the tokenizer's chat template
    GET|POST /admin/memory, DELETE /admin/memory/{name}   swap, add, remove memories (API key)

With `api_key`, every endpoint but /health and /metrics needs `Authorization: Bearer KEY`; the
admin endpoints exist only with a key. Bad requests get OpenAI-style `{"error": {...}}` bodies
(400; 401 for auth; 404 for an unknown model or memory; 409 for a memory of another model).

A request chooses its memory with the model field `BASE:MEMORY` or the `x-kvedit-memory`
header; the plain name gets the default memory (`serving.memory_set`). Each memory is followed
by the same `serving.memory.MemoryFollower` as in vLLM workers; the watcher applies new
versions itself under `routed.lock` when idle, and each request applies what is staged before it
starts, so a stream of requests cannot starve a version. Requests are served one at a time: each holds the
generation lock, attaches its memory's routed layer and holds that memory's `routed.lock` for
its whole generation, so it sees exactly one memory and version, the ones it reports. Admin
switches take the generation lock too, so they happen between two requests.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import torch
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from editing.adapters import get_adapter
from editing.models import load_model, resolve_model
from editing.routed import attach, detach
from serving.fingerprint import served_fingerprint
from serving.memory import ServedModel
from serving.memory_set import ServedMemories, UnknownMemoryError, admin_error, follow
from serving.metrics import ServingMetrics
from serving.openai_api import (
    AdminMemoryRequest,
    ChatCompletionRequest,
    CompletionRequest,
    MemoryChoiceError,
    ServedVersion,
    chat_response,
    completion_response,
    error_body,
    model_entries,
    requested_memory,
)
from serving.settings import MemoryRef, MemorySettings

logger = logging.getLogger(__name__)

CHAT_DEFAULT_MAX_TOKENS = 512  # chat requests without max_tokens (bounded: CPU serving)
HF_PATHS = ("/v1/completions", "/v1/chat/completions")  # the inference endpoints this backend serves


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, headers=headers)


@dataclass
class Generation:
    """One generated choice: token ids, text and why it stopped."""

    tokens: list[int]
    text: str
    finish_reason: str


class HFBackend:
    """A transformers model with the memories it serves.

    Every start memory is checked against the model (fingerprint of the folder, layer, sizes)
    and loaded before the weights are, so a wrong memory fails fast.
    """

    def __init__(self, model: str, settings: MemorySettings | None = None, device: str = "cpu"):
        self.name = model
        path = resolve_model(model)
        settings = settings or MemorySettings()
        self.lock = threading.RLock()  # one generation (or one memory switch) at a time
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path).get_text_config()
        served = ServedModel(served_fingerprint(path), cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size)
        self.memories = ServedMemories(
            served, settings, settings.layer, grace_s=0.0, switch_lock=self.lock,
            open_memory=lambda resolved: (follow(resolved, settings, auto_apply=True, device=device), None))
        try:
            self.memories.start_all()
            self.model, self.tok = load_model(model, device=device)
        except BaseException:
            self.memories.close()
            raise
        self.adapter = get_adapter(self.model)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.device = device

    def close(self) -> None:
        self.memories.close()

    @property
    def follower(self):
        """The default memory's follower (None without one)."""
        m = self.memories.choose(None)
        return None if m is None else m.follower

    def served(self) -> ServedVersion | None:
        """The default memory and its version (None: the plain name gets the base model)."""
        m = self.memories.choose(None)
        return None if m is None else ServedVersion(m.name, m.routed.version)

    def describe(self, drain: bool = False) -> dict:
        return self.memories.describe(drain=drain)

    @contextlib.contextmanager
    def serving(self, memory: str | None):
        """Hold the model for one request routed through `memory` (None: the default; "": none).

        Yields the ServedVersion to report. Raises ApiError 404 for a memory not served here.
        """
        with self.lock:
            # Versions staged while the last request ran are applied here, at the request boundary: the
            # watcher's own apply competes for `routed.lock` with back-to-back requests and can starve.
            self.memories.boundary()
            try:
                chosen = self.memories.choose(memory)
            except UnknownMemoryError as exc:
                raise ApiError(404, str(exc), "NotFoundError", param="model", code="model_not_found") from exc
            layer = self.memories.layer
            if chosen is None:
                if layer is not None:
                    detach(self.model, self.adapter, layer)
                yield ServedVersion.base()
                return
            with chosen.routed.lock:  # the watcher applies versions under it: none during this request
                attach(self.model, self.adapter, layer, chosen.routed)
                yield ServedVersion(chosen.name, chosen.routed.version)

    def admin(self, req: AdminMemoryRequest) -> dict:
        """Swap to or add a memory (checked and loaded first; switched between two requests)."""
        ref = MemoryRef.parse(req.memory)
        if req.action == "add":
            self.memories.add(ref)
            return self._collected()
        previous = self.memories.swap(ref, keep_previous=req.keep_previous)["previous"]
        return {**self._collected(), "previous": previous}

    def remove(self, name: str) -> dict:
        self.memories.remove(name)
        return self._collected()

    def _collected(self) -> dict:
        """Unload retired memories now (no request can hold one: switches wait for the generation lock)."""
        self.memories.collect()
        return self.describe()

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    @torch.no_grad()
    def generate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
                 stops: list[str]) -> Generation:
        """Continue token ids [n]. Greedy when temperature == 0. Call under `self.lock`."""
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) + max_tokens > self.max_len:
            raise ApiError(400, f"this model's maximum context length is {self.max_len} tokens; the prompt has "
                                f"{len(ids)} and max_tokens is {max_tokens}", param="max_tokens")
        x = torch.tensor([ids], device=self.device)
        kwargs: dict = {"max_new_tokens": max_tokens, "attention_mask": torch.ones_like(x),
                        "pad_token_id": self.tok.pad_token_id}
        if temperature == 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            if seed is not None:
                torch.manual_seed(seed)
        if stops:
            kwargs.update(stop_strings=stops, tokenizer=self.tok)
        out = self.model.generate(x, **kwargs)[0, len(ids):].tolist()
        if out and out[-1] in self.eos_ids:
            return Generation(out, self.tok.decode(out[:-1], skip_special_tokens=True), "stop")
        text = self.tok.decode(out, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            return Generation(out, text[:cut], "stop")
        return Generation(out, text, "length" if len(out) >= max_tokens else "stop")


def _prompts(req: CompletionRequest, backend: HFBackend) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [backend.encode(p)]
    if not p:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(x, str) for x in p):
        return [backend.encode(x) for x in p]
    prompts = [list(p)] if all(isinstance(x, int) for x in p) else [list(x) for x in p]
    vocab = int(backend.model.get_input_embeddings().num_embeddings)
    for i, ids in enumerate(prompts):
        if not ids:
            raise ApiError(400, f"prompt {i} has no tokens", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
    return prompts


def create_app(model: str, settings: MemorySettings | None = None, api_key: str | None = None,
               served_model_name: str | None = None, device: str = "cpu",
               backend: HFBackend | None = None) -> FastAPI:
    """Load the model and memory now and return the app (ready: /health answers 200)."""
    backend = backend or HFBackend(model, settings, device=device)
    name = served_model_name or model
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)
    metrics.declare_endpoints(HF_PATHS)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        backend.close()

    app = FastAPI(title="kvedit (transformers backend)", lifespan=lifespan)
    app.state.backend = backend
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        return ApiError(400, f"{loc}: {msg}" if loc else msg, param=loc or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        if request.method == "POST" and request.url.path in HF_PATHS:  # as the vLLM middleware counts
            metrics.observe_request(request.url.path, response.status_code, time.perf_counter() - t0,
                                    getattr(request.state, "usage", None))
        return response

    def check_key(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def check_admin(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            raise ApiError(403, "the admin endpoints are disabled: start the server with --api-key", code="admin_disabled")
        check_key(authorization)

    def check_common(req, header: str | None) -> str | None:
        """The memory the request chose (see `requested_memory`)."""
        if req.stream:
            raise ApiError(400, "streaming is not supported by the hf backend", param="stream")
        try:
            return requested_memory(req.model, name, header)
        except MemoryChoiceError as exc:
            if exc.status == 404:
                raise ApiError(404, str(exc), "NotFoundError", param="model", code="model_not_found") from exc
            raise ApiError(exc.status, str(exc), param="model") from exc

    @app.get("/health")
    def health():
        described = backend.describe()
        default = backend.served()
        return {"status": "ok", "model": name, **({"memory": default.body()} if default else {}),
                "default_memory": described["default"],
                "memories": [_brief(m, described["default"]) for m in described["memories"]]}

    @app.get("/metrics")
    def prometheus():
        metrics.observe_memories(backend.describe(drain=True))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def models():
        return {"object": "list", "data": model_entries(name, sorted(backend.memories.loaded))}

    def admin_call(fn, *args) -> JSONResponse:
        try:
            return JSONResponse(fn(*args))
        except Exception as exc:
            failure = admin_error(exc)
            if failure is None:
                raise
            status, kind, message = failure
            raise ApiError(status, message, kind, param="memory") from exc

    @app.get("/admin/memory", dependencies=[Depends(check_admin)])
    def admin_list():
        return backend.describe()

    @app.post("/admin/memory", dependencies=[Depends(check_admin)])
    def admin_memory(req: AdminMemoryRequest):
        return admin_call(backend.admin, req)

    @app.delete("/admin/memory/{memory}", dependencies=[Depends(check_admin)])
    def admin_remove(memory: str):
        return admin_call(backend.remove, memory)

    @app.post(HF_PATHS[0], dependencies=[Depends(check_key)])
    def completions(req: CompletionRequest, request: Request, x_kvedit_memory: str | None = Header(default=None)):
        memory = check_common(req, x_kvedit_memory)
        if req.logprobs is not None:
            raise ApiError(400, "logprobs are not supported by the hf backend", param="logprobs")
        prompts = _prompts(req, backend)
        max_tokens = req.max_tokens or 16
        choices, n_in, n_out = [], 0, 0
        with backend.serving(memory) as served:
            for i, ids in enumerate(prompts):
                g = backend.generate(ids, max_tokens, req.temperature, req.top_p, req.seed, req.stops())
                text = (backend.tok.decode(ids) + g.text) if req.echo else g.text
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": g.finish_reason})
                n_in, n_out = n_in + len(ids), n_out + len(g.tokens)
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        request.state.usage = usage
        return JSONResponse(completion_response(req.model, choices, usage, served), headers=served.headers())

    @app.post(HF_PATHS[1], dependencies=[Depends(check_key)])
    def chat(req: ChatCompletionRequest, request: Request, x_kvedit_memory: str | None = Header(default=None)):
        memory = check_common(req, x_kvedit_memory)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = backend.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template that rejects the conversation
            raise ApiError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        ids = backend.encode(text, special=False)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(CHAT_DEFAULT_MAX_TOKENS, backend.max_len - len(ids))
        with backend.serving(memory) as served:
            g = backend.generate(ids, max(1, max_tokens), req.temperature, req.top_p, req.seed, req.stops())
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(g.tokens), "total_tokens": len(ids) + len(g.tokens)}
        request.state.usage = usage
        choice = {"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                  "finish_reason": g.finish_reason}
        return JSONResponse(chat_response(req.model, [choice], usage, served), headers=served.headers())

    return app


def _brief(status: dict, default: str | None) -> dict:
    """A memory's line in /health."""
    return {"memory": status["memory"], "version": status["version"], "facts": status["facts"],
            "pinned": status["pinned"], "default": status["memory"] == default, "retired": status["retired"]}


def run(model: str, settings: MemorySettings | None, host: str = "127.0.0.1", port: int = 8000,
        api_key: str | None = None, served_model_name: str | None = None, device: str = "cpu") -> None:
    """Load, then serve until interrupted."""
    import uvicorn

    app = create_app(model, settings, api_key=api_key, served_model_name=served_model_name, device=device)
    uvicorn.run(app, host=host, port=port, log_level="info")


def main(argv: list[str] | None = None) -> None:
    """`python -m serving.hf_server --model M [--memory NAME[@V]] ...` (also `kvedit serve --backend hf`)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--memory", action="append", default=None,
                   help="NAME[@VERSION]; repeat for several memories (then the plain model name is the base model)")
    p.add_argument("--store", default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serving.cli import memory_settings

    settings = memory_settings(a.memory, a.store, a.redis_url, a.layer)
    run(a.model, settings, a.host, a.port, a.api_key)


if __name__ == "__main__":
    main()
