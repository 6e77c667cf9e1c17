"""`kvedit bench multi-memory`: what serving several memories from one vLLM engine costs.

One offline `vllm.LLM` (eager, CPU) runs a multi-memory worker (`serving.vllm_multi`). The same
`total` rows (real FFN keys of WikiText tokens at the edit layer with 10% noise, small random
residuals: see `serve_bench._memory_rows`) are stored twice: as one memory "single", and split
evenly into k memories for every k in `counts`. For each k the engine loads the k memories
(admin RPCs, nothing else loaded; their watcher threads are given `settle_s` to subscribe) and runs a fixed batch of greedy requests spread round-robin
across them (`SamplingParams.extra_args["kvedit_memory"]`, the path the OpenAI `model` field
`BASE:MEMORY` takes); the reference loads only "single" and sends every request to it. Runs
alternate k / reference so machine drift hits both; `overhead[k]` is the median over pairs of
(k seconds / reference seconds) - 1.

Total size stays below the prefilter size (4096 rows) by default: a single memory past it scores
rows in 64 dimensions while k memories each below it score exactly, which is a different
comparison (see `prefilter` in raw).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_bench import (  # noqa: E402
    _environ,
    _memory_rows,
    _model_spec,
    _temp_store,
    _wikitext_prompts,
)

SINGLE = "single"


def _names(k: int) -> list[str]:
    return [f"k{k}-m{i}" for i in range(k)]


def bench_multi_memory(model: str = "smollm2-135m", counts: tuple[int, ...] = (1, 4, 16), total: int = 2048,
                       prompts: int = 16, prompt_tokens: int = 64, max_tokens: int = 16, repeats: int = 4,
                       settle_s: float = 6.0) -> dict:
    """Tokens/s with k memories loaded and requests spread across them vs one memory of the same total rows."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from serving.settings import ENV_LAYER, ENV_MEMORIES, ENV_POLL_SECONDS, ENV_STORE
    from serving.vllm_plugin import MULTI_WORKER_EXTENSION, hf_overrides
    from store import embedded_url

    model_dir, spec = _model_spec(model)
    t_keys = time.perf_counter()
    table, tok = _memory_rows(model, spec, total)
    keys_s = time.perf_counter() - t_keys
    batch = [TokensPrompt(prompt_token_ids=ids) for ids in _wikitext_prompts(tok, prompts, prompt_tokens)]
    with _temp_store("kvedit-bench-multi-") as (root, store):
        store.create(SINGLE, spec, {"name": "cosine"})
        store.commit(SINGLE, table)
        for k in counts:
            size = total // k
            for i, name in enumerate(_names(k)):
                store.create(name, spec, {"name": "cosine"})
                store.commit(name, table.slice(i * size, size))
        env = {ENV_MEMORIES: "", ENV_LAYER: str(spec.layer), ENV_STORE: str(root), "KVEDIT_REDIS_URL": embedded_url(root),
               ENV_POLL_SECONDS: "0.5", "KVEDIT_RETIRE_GRACE_S": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_LOGGING_STREAM": "ext://sys.stderr", "TOKENIZERS_PARALLELISM": "false"}
        with _environ(env):
            t0 = time.perf_counter()
            llm = LLM(model=str(model_dir), hf_overrides=hf_overrides(model_dir), dtype="float32", enforce_eager=True,
                      worker_extension_cls=MULTI_WORKER_EXTENSION, enable_prefix_caching=False, seed=0)
            start_s = time.perf_counter() - t0
            try:
                loaded: list[str] = []

                def load(names: list[str]) -> dict:
                    if names == loaded:
                        return llm.collective_rpc("kvedit_sync")[0]
                    for name in loaded:
                        _admin(llm, "remove", name)
                    for name in names:
                        _admin(llm, "add", name)
                    loaded[:] = names
                    time.sleep(settle_s)  # new watchers subscribe (5 s) and check the store head: not in the timing
                    status = llm.collective_rpc("kvedit_sync")[0]  # unloads the removed ones
                    resident = sorted(m["memory"] for m in status["memories"])
                    if resident != sorted(names):
                        raise RuntimeError(f"expected memories {sorted(names)} loaded, the worker has {resident}")
                    return status

                def run(names: list[str]) -> tuple[float, int, dict]:
                    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                             extra_args={"kvedit_memory": names[i % len(names)]})
                              for i in range(len(batch))]
                    before = {m["memory"]: m for m in llm.collective_rpc("kvedit_status")[0]["memories"]}
                    t = time.perf_counter()
                    outs = llm.generate(batch, params, use_tqdm=False)
                    seconds = time.perf_counter() - t
                    after = {m["memory"]: m for m in llm.collective_rpc("kvedit_status")[0]["memories"]}
                    n_tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
                    per_memory = {n: after[n]["tokens"] - before[n]["tokens"] for n in names}
                    return seconds, n_tokens, {"hits": sum(after[n]["hits"] - before[n]["hits"] for n in names),
                                               "tokens": sum(per_memory.values()),
                                               "min_memory_tokens": min(per_memory.values())}

                load([SINGLE])
                run([SINGLE])  # warm-up
                overhead, raw = {}, {}
                n_tokens = 0
                for k in counts:
                    names = _names(k)
                    single_t, multi_t, gate = [], [], {}
                    for r in range(repeats):
                        for side in ((SINGLE, k) if r % 2 == 0 else (k, SINGLE)):
                            status = load([SINGLE] if side == SINGLE else names)
                            seconds, n_tokens, gate_k = run([SINGLE] if side == SINGLE else names)
                            (single_t if side == SINGLE else multi_t).append(seconds)
                            if side != SINGLE:
                                gate = gate_k
                                prefilter = any(m.get("prefilter") for m in status["memories"])
                            else:
                                single_prefilter = any(m.get("prefilter") for m in status["memories"])
                    ratios = [m / s for m, s in zip(multi_t, single_t)]
                    overhead[str(k)] = round(statistics.median(ratios) - 1, 4)
                    raw[str(k)] = {
                        "rows_per_memory": total // k,
                        "single_tokens_per_s": round(n_tokens / statistics.median(single_t), 1),
                        "multi_tokens_per_s": round(n_tokens / statistics.median(multi_t), 1),
                        "single_runs_s": [round(x, 3) for x in single_t], "multi_runs_s": [round(x, 3) for x in multi_t],
                        "gate_rate": round(gate["hits"] / gate["tokens"], 4) if gate.get("tokens") else None,
                        "routed_tokens": gate.get("tokens"), "fewest_tokens_one_memory": gate.get("min_memory_tokens"),
                        "prefilter": {"single": single_prefilter, "multi": prefilter},
                    }
            finally:
                llm.llm_engine.engine_core.shutdown()
                del llm
    top = str(max(counts))
    return {
        "benchmark": "multi-memory", "overhead": overhead, "raw": raw, "total_rows": total,
        "tokens_per_batch": n_tokens, "prompts": prompts, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
        "repeats": repeats, "layer": spec.layer, "target_overhead": 0.10, "passed": overhead[top] <= 0.10,
        "engine_start_s": round(start_s, 1), "keys_s": round(keys_s, 1),
    }


def _admin(llm, action: str, name: str) -> None:
    out = llm.collective_rpc("kvedit_admin", args=(action, name, False))[0]
    if "error" in out:
        raise RuntimeError(f"{action} {name}: {out['error']['message']}")


if __name__ == "__main__":
    import json

    print(json.dumps(bench_multi_memory()))
