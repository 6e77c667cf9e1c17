"""Synthetic edit rows and a writer process, for the store's concurrency tests and benchmarks.

`python -m store.loadgen --store DIR --memory NAME --worker 3 --commits 50 --rows 10 --out F`
commits `commits` batches of `rows` synthetic rows (edit_ids `w<worker>-c<i>-r<j>`) and
writes one JSON line per commit to F: version, latency and counts.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow as pa
import torch

from editing.records import EditRequest
from editing.table import MemorySpec, build_edit_table


def synthetic_rows(spec: MemorySpec, ids: list[str], seed: int = 0, subject: str | None = None, job_id: str | None = None) -> pa.Table:
    """Rows for `ids` with random float32 keys/residuals, built by `editing.table.build_edit_table`."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    requests = [
        EditRequest(subject=subject or f"subject {i}", prompt=f"{subject or f'subject {i}'} is located in",
                    target_new=f"place {i}", target_true="nowhere", case_id=str(i), source="synthetic")
        for i in ids
    ]
    keys = torch.from_numpy(rng.standard_normal((n, spec.d_key), dtype=np.float32))
    residuals = torch.from_numpy(rng.standard_normal((n, spec.d_model), dtype=np.float32))
    return build_edit_table(spec, requests, keys, residuals, edit_ids=list(ids), job_id=job_id)


def run_writer(store_uri: str, memory: str, worker: int, commits: int, rows: int, out: str | None = None,
               redis_url: str | None = None, pause_at: str | None = None) -> list[dict]:
    """Make `commits` commits of `rows` rows each; returns (and appends to `out`) one record per commit.

    `pause_at` ("<point>@<marker file>") arms the store's fault-injection pause in this process
    (see `memory_store._pause_point`), for crash tests that SIGKILL the writer mid-commit.
    """
    from .memory_store import PAUSE_ENV, MemoryStore

    if pause_at:
        os.environ[PAUSE_ENV] = pause_at

    store = MemoryStore(store_uri, redis_url=redis_url)
    spec = store.info(memory).spec
    records = []
    sink = open(out, "a") if out else None
    try:
        for c in range(commits):
            ids = [f"w{worker}-c{c}-r{j}" for j in range(rows)]
            table = synthetic_rows(spec, ids, seed=worker * 100_003 + c)
            started = time.time()
            t0 = time.perf_counter()
            mv = store.commit(memory, table, message=f"worker {worker} commit {c}", job_id=f"w{worker}")
            rec = {"worker": worker, "commit": c, "version": mv.version, "n_added": mv.n_added,
                   "latency_s": time.perf_counter() - t0, "pid": os.getpid(), "started": started, "ended": time.time()}
            records.append(rec)
            if sink:
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
    finally:
        if sink:
            sink.close()
        store.close()
    return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", required=True)
    p.add_argument("--memory", required=True)
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--commits", type=int, default=50)
    p.add_argument("--rows", type=int, default=10)
    p.add_argument("--out")
    p.add_argument("--redis-url")
    p.add_argument("--pause-at", help="fault injection: <point>@<marker file>")
    a = p.parse_args(argv)
    run_writer(a.store, a.memory, a.worker, a.commits, a.rows, a.out, a.redis_url, a.pause_at)


if __name__ == "__main__":
    main()
