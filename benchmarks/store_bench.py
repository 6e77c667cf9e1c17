"""Store benchmarks: `kvedit bench store-delta` and `kvedit bench store-commit`.

store-delta: a replica that is one commit behind reloads the delta (`changes(since)`) instead
of the whole memory. Measured on a 100K-row memory of the default model's sizes
(d_key=1536, d_model=576, about 0.85 GB of vectors) with a 1K-row delta; `speedup` is
full-reload time / delta time in the same run (target >= 20).

store-commit: latency of committing 1K rows (p50, p99) from one writer, and commits/s with 4
writer processes committing 1K-row batches concurrently to one memory.

Both build synthetic rows with `editing.table.build_edit_table` in a temporary store (with its
own embedded Redis) that is removed afterwards. Run directly: `python benchmarks/store_bench.py`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editing.table import MemorySpec  # noqa: E402
from store import MemoryStore, apply_delta, stop_embedded_redis  # noqa: E402
from store.loadgen import run_writer, synthetic_rows  # noqa: E402

SPEC = MemorySpec("bench-fingerprint", 12, 1536, 576)


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_store_delta(n_rows: int = 100_000, delta_rows: int = 1_000, batch: int = 2_000, repeats: int = 5) -> dict:
    """Delta reload vs full reload of a large memory; returns raw timings and `speedup`."""
    root = Path(tempfile.mkdtemp(prefix="kvedit-bench-delta-"))
    try:
        store = MemoryStore(root)
        store.create("bench", SPEC, {"kind": "bench"})
        t0 = time.perf_counter()
        for i in range(n_rows // batch):
            store.commit("bench", synthetic_rows(SPEC, [f"base-{i}-{j}" for j in range(batch)], seed=i))
        build_s = time.perf_counter() - t0
        base = store.info("bench").version
        store.commit("bench", synthetic_rows(SPEC, [f"delta-{j}" for j in range(delta_rows)], seed=10**6),
                     delete_ids=[f"base-0-{j}" for j in range(10)])
        head = store.info("bench").version

        delta_times, full_times = [], []
        delta = None
        for _ in range(repeats):
            t = time.perf_counter()
            delta = store.changes("bench", since=base)
            delta_times.append(time.perf_counter() - t)
        full = None
        for _ in range(3):
            t = time.perf_counter()
            full = store.read("bench")
            full_times.append(time.perf_counter() - t)
        assert delta is not None and full is not None
        assert delta.added.num_rows == delta_rows and len(delta.deleted) == 10
        correct = apply_delta(store.read("bench", base), delta).num_rows == full.num_rows
        delta_s, full_s = statistics.median(delta_times), statistics.median(full_times)
        store.close()
        return {
            "benchmark": "store-delta",
            "rows": full.num_rows,
            "delta_rows_added": delta.added.num_rows,
            "delta_rows_deleted": len(delta.deleted),
            "d_key": SPEC.d_key,
            "d_model": SPEC.d_model,
            "from_version": base,
            "to_version": head,
            "full_reload_s": round(full_s, 4),
            "delta_s": round(delta_s, 4),
            "full_reload_runs_s": [round(x, 4) for x in full_times],
            "delta_runs_s": [round(x, 4) for x in delta_times],
            "speedup": round(full_s / delta_s, 1),
            "target_speedup": 20,
            "passed": full_s / delta_s >= 20 and correct,
            "delta_applied_correctly": correct,
            "build_s": round(build_s, 2),
            "store_bytes": _dir_bytes(root / "bench.lance"),
        }
    finally:
        stop_embedded_redis(root)
        shutil.rmtree(root, ignore_errors=True)


def bench_store_commit(rows_per_commit: int = 1_000, latency_commits: int = 30, writers: int = 4,
                       commits_per_writer: int = 8) -> dict:
    """Commit latency (p50/p99) of 1K-row commits, and commits/s with `writers` concurrent processes."""
    root = Path(tempfile.mkdtemp(prefix="kvedit-bench-commit-"))
    try:
        store = MemoryStore(root)
        store.create("latency", SPEC, {})
        latencies = []
        for c in range(latency_commits):
            table = synthetic_rows(SPEC, [f"l-{c}-{j}" for j in range(rows_per_commit)], seed=c)
            t = time.perf_counter()
            store.commit("latency", table)
            latencies.append(time.perf_counter() - t)

        store.create("concurrent", SPEC, {})
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "pyarrow", "redis", "torch", "editing.table"])
        outs = [root / f"writer-{w}.jsonl" for w in range(writers)]
        procs = [ctx.Process(target=run_writer, args=(str(root), "concurrent", w, commits_per_writer, rows_per_commit, str(outs[w])))
                 for w in range(writers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"store-commit: a writer failed: {[p.exitcode for p in procs]}")
        records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
        window = max(r["ended"] for r in records) - min(r["started"] for r in records)
        versions = sorted(r["version"] for r in records)
        total = writers * commits_per_writer
        n_rows = store.info("concurrent").n_rows
        concurrent_lat = [r["latency_s"] for r in records]
        store.close()
        return {
            "benchmark": "store-commit",
            "rows_per_commit": rows_per_commit,
            "d_key": SPEC.d_key,
            "d_model": SPEC.d_model,
            "latency_commits": latency_commits,
            "latency_p50_s": round(_quantile(latencies, 0.5), 4),
            "latency_p99_s": round(_quantile(latencies, 0.99), 4),
            "latency_mean_s": round(statistics.fmean(latencies), 4),
            "writers": writers,
            "concurrent_commits": total,
            "concurrent_window_s": round(window, 3),
            "commits_per_s": round(total / window, 2),
            "rows_per_s": round(total * rows_per_commit / window, 1),
            "concurrent_latency_p50_s": round(_quantile(concurrent_lat, 0.5), 4),
            "concurrent_latency_p99_s": round(_quantile(concurrent_lat, 0.99), 4),
            "all_commits_landed": versions == list(range(1, total + 1)) and n_rows == total * rows_per_commit,
        }
    finally:
        stop_embedded_redis(root)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    which = sys.argv[1:] or ["store-delta", "store-commit"]
    for name in which:
        fn = {"store-delta": bench_store_delta, "store-commit": bench_store_commit}[name]
        t = time.perf_counter()
        result = fn()
        result["wall_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(result, indent=2))
