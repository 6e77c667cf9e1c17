"""kvedit serving: a model plus a followed edit memory behind an OpenAI-compatible API.

- `serving.vllm_plugin` / `vllm_models` / `vllm_worker` / `vllm_middleware`: the vLLM integration
  (routed model classes, RPCs, version reporting and prefix-cache salting).
- `serving.hf_server`: the same API over transformers.
- `serving.memory`: checking, loading and following a memory (one implementation for both).
- `serving.memory_set`: the memories one replica serves (default, swap, add, remove), both backends;
  `serving.vllm_multi` / `vllm_multi_middleware`: per-request memory choice inside vLLM.
- `serving.cli`: `kvedit serve`; `serving.replica_cli`: `kvedit replica swap|add|remove|ls`.
  Design: docs/adr/0003-vllm-integration.md, docs/adr/0007-multi-memory.md.
"""
