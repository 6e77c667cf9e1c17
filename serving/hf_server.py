"""OpenAI-compatible server over transformers (`kvedit serve --backend hf`), for hosts without vLLM.

    GET  /health               200 once the model and memory are loaded (always open)
    GET  /metrics              Prometheus text (always open; serving.metrics)
    GET  /v1/models
    POST /v1/completions       non-streaming; greedy when temperature == 0
    POST /v1/chat/completions  non-streaming; the tokenizer's chat template

With `api_key`, every endpoint but /health and /metrics needs `Authorization: Bearer KEY`.
Bad requests get OpenAI-style `{"error": {...}}` bodies (400; 401 for auth; 404 for an
unknown model).

The memory is followed by the same `serving.memory.MemoryFollower` as in vLLM workers. Here
the watcher applies new versions itself under `routed.lock`, and each request holds that
lock for its whole generation, so a request sees exactly one version, the one it reports.
Requests are served one at a time (one model, one lock).
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
from editing.routed import attach
from serving.fingerprint import served_fingerprint
from serving.memory import MemoryFollower, ServedModel, build_routed, resolve_memory
from serving.metrics import ServingMetrics
from serving.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    ServedVersion,
    chat_response,
    completion_response,
    error_body,
)
from serving.settings import MemoryRef, MemorySettings

logger = logging.getLogger(__name__)

CHAT_DEFAULT_MAX_TOKENS = 512  # chat requests without max_tokens (bounded: CPU serving)


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
    """A transformers model with its routed memory.

    The memory is checked against the model (fingerprint of the folder, layer, sizes) before
    the weights are loaded, so a wrong memory fails fast.
    """

    def __init__(self, model: str, settings: MemorySettings | None = None, device: str = "cpu"):
        self.name = model
        path = resolve_model(model)
        resolved = None
        if settings is not None and settings.memory is not None:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path).get_text_config()
            served = ServedModel(served_fingerprint(path), cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size)
            resolved = resolve_memory(settings, served)
        self.model, self.tok = load_model(model, device=device)
        self.adapter = get_adapter(self.model)
        self.follower: MemoryFollower | None = None
        self.lock: threading.RLock = threading.RLock()
        if resolved is not None:
            routed = build_routed(resolved, capacity=settings.capacity, device=device)
            attach(self.model, self.adapter, resolved.spec.layer, routed)
            self.follower = MemoryFollower(resolved, routed, poll_seconds=settings.poll_seconds, auto_apply=True)
            self.follower.load()
            self.follower.start()
            self.lock = routed.lock  # held by each generation; the watcher applies under it
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.device = device

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()

    def served(self) -> ServedVersion | None:
        """The version in force (call under `self.lock` to keep it for a whole request)."""
        if self.follower is None:
            return None
        return ServedVersion(self.follower.name, self.follower.routed.version)

    def status(self, drain: bool = False) -> dict | None:
        return None if self.follower is None else self.follower.status(drain=drain)

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
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    return [list(x) for x in p]


def create_app(model: str, settings: MemorySettings | None = None, api_key: str | None = None,
               served_model_name: str | None = None, device: str = "cpu",
               backend: HFBackend | None = None) -> FastAPI:
    """Load the model and memory now and return the app (ready: /health answers 200)."""
    backend = backend or HFBackend(model, settings, device=device)
    name = served_model_name or model
    registry = CollectorRegistry()
    metrics = ServingMetrics(registry)

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
        if request.url.path.startswith("/v1/"):
            metrics.observe_request(request.url.path, response.status_code, time.perf_counter() - t0,
                                    getattr(request.state, "usage", None))
        return response

    def check_key(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(requested: str) -> None:
        if requested != name:
            raise ApiError(404, f"the model `{requested}` does not exist; this server serves `{name}`",
                           "NotFoundError", param="model", code="model_not_found")

    def check_common(req) -> None:
        check_model(req.model)
        if req.stream:
            raise ApiError(400, "streaming is not supported by the hf backend", param="stream")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name, **({"memory": backend.served().body()} if backend.follower else {})}

    @app.get("/metrics")
    def prometheus():
        metrics.observe_memory(backend.status(drain=True))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "kvedit"}]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    def completions(req: CompletionRequest, request: Request):
        check_common(req)
        if req.logprobs is not None:
            raise ApiError(400, "logprobs are not supported by the hf backend", param="logprobs")
        prompts = _prompts(req, backend)
        max_tokens = req.max_tokens or 16
        choices, n_in, n_out = [], 0, 0
        with backend.lock:
            served = backend.served()
            for i, ids in enumerate(prompts):
                g = backend.generate(ids, max_tokens, req.temperature, req.top_p, req.seed, req.stops())
                text = (backend.tok.decode(ids) + g.text) if req.echo else g.text
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": g.finish_reason})
                n_in, n_out = n_in + len(ids), n_out + len(g.tokens)
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        request.state.usage = usage
        return JSONResponse(completion_response(name, choices, usage, served),
                            headers=served.headers() if served else None)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    def chat(req: ChatCompletionRequest, request: Request):
        check_common(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = backend.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template that rejects the conversation
            raise ApiError(400, f"cannot apply the chat template: {exc}", param="messages") from exc
        ids = backend.encode(text, special=False)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(CHAT_DEFAULT_MAX_TOKENS, backend.max_len - len(ids))
        with backend.lock:
            served = backend.served()
            g = backend.generate(ids, max(1, max_tokens), req.temperature, req.top_p, req.seed, req.stops())
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(g.tokens), "total_tokens": len(ids) + len(g.tokens)}
        request.state.usage = usage
        choice = {"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                  "finish_reason": g.finish_reason}
        return JSONResponse(chat_response(name, [choice], usage, served), headers=served.headers() if served else None)

    return app


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
    p.add_argument("--memory", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = MemorySettings.from_env()
    settings = MemorySettings(
        memory=MemoryRef.parse(a.memory) if a.memory else env.memory, store=a.store or env.store,
        redis_url=a.redis_url or env.redis_url, layer=a.layer if a.layer is not None else env.layer,
        capacity=env.capacity, poll_seconds=env.poll_seconds,
    )
    run(a.model, settings, a.host, a.port, a.api_key)


if __name__ == "__main__":
    main()
