"""`kvedit bench NAME`: each benchmark returns one JSON-able dict with its ratios and the raw figures.

Ratios compare against a reference measured in the same run, never against stored seconds.
"""

from __future__ import annotations

from importlib import import_module


def _lazy(module: str, fn: str):
    def run(**kwargs):
        import inspect

        f = getattr(import_module(module), fn)
        accepted = inspect.signature(f).parameters
        return f(**{k: v for k, v in kwargs.items() if k in accepted})

    return run


BENCHMARKS = {
    "value-opt": (_lazy("benchmarks.engine_bench", "bench_value_opt"),
                  "edits/s of the batched, truncated optimiser vs the naive per-edit loop (field: speedup)"),
    "routing-overhead": (_lazy("benchmarks.engine_bench", "bench_routing_overhead"),
                         "prefill tokens/s routed vs base at 1K/10K/100K facts (field: overhead)"),
    "covariance": (_lazy("benchmarks.engine_bench", "bench_covariance"),
                   "tokens/s of statistics collection vs a forward to the edit layer (field: ratio)"),
    "store-delta": (_lazy("benchmarks.store_bench", "bench_store_delta"),
                    "1K-row delta read vs full reload of a 100K-row memory (field: speedup)"),
    "ingest-scaling": (_lazy("benchmarks.jobs_bench", "bench_ingest_scaling"),
                       "edits/s with 2 vs 1 ValueOptimiser actors (field: ratio)"),
    "queue-overhead": (_lazy("benchmarks.jobs_bench", "bench_queue_overhead"),
                       "a 20-edit job through the queue vs the same edits run directly (field: overhead)"),
    "store-commit": (_lazy("benchmarks.store_bench", "bench_store_commit"),
                     "commit latency of 1K rows (p50/p99) and commits/s with 4 writers"),
    "serve-overhead": (_lazy("benchmarks.serve_bench", "bench_serve_overhead"),
                       "vLLM tokens/s routed vs stock MLP at 0/1K/10K facts, same engine (field: overhead)"),
    "reload-latency": (_lazy("benchmarks.serve_bench", "bench_reload_latency"),
                       "commit-to-served p50/p99 of 1K-row deltas into a 10K-row memory under load (fields: p50_s, p99_s)"),
    "gate-scaling": (_lazy("benchmarks.gate_bench", "bench_gate_scaling"),
                     "routing of real edits at T = 1..400, fixed vs calibrated gate: false-gate rate, hit/misrouted/gate-off"),
    "calibration": (_lazy("benchmarks.calibration_bench", "bench_calibration"), "calibrated vs best fixed gate threshold"),
    "multi-memory": (_lazy("benchmarks.multi_bench", "bench_multi_memory"),
                     "vLLM tokens/s, requests spread over 1/4/16 memories vs one memory of as many rows (field: overhead)"),
}
