"""kvedit serving: a model plus a followed edit memory behind an OpenAI-compatible API.

- `serving.vllm_plugin` / `vllm_models` / `vllm_worker` / `vllm_middleware`: the vLLM integration
  (routed model classes, RPCs, version reporting and prefix-cache salting).
- `serving.hf_server`: the same API over transformers.
- `serving.memory`: checking, loading and following a memory (one implementation for both).
- `serving.cli`: `kvedit serve`. Design: docs/adr/0003-vllm-integration.md.
"""
