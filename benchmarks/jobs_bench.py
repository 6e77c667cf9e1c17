"""Job-path benchmarks: ingest scaling with optimiser actors, and the cost of going through the queue.

Both run on a local Ray with a temporary store and its embedded Redis. Actors are warmed (model
loaded, context templates sampled) before any timing, so the figures are steady-state rates.
Optimiser steps are cut down (`steps`) and early stopping is off, so every edit does the same work.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager


def _records(n: int, offset: int = 0) -> list:
    from editing.data import data_file

    return json.loads(data_file("counterfact_valid.json").read_text())[offset: offset + n]


@contextmanager
def _local_env(num_cpus: int):
    """A temp store with its embedded Redis, and a local Ray (if none is running)."""
    import ray

    from cluster.runtime import connect_ray
    from store import connect_redis, embedded_url, stop_embedded_redis

    root = tempfile.mkdtemp(prefix="kvedit-jobs-bench-")
    connect_redis(None, root).close()
    owns = connect_ray(None, num_cpus=num_cpus, log_to_driver=False)
    try:
        yield root, embedded_url(root)
    finally:
        if owns:
            ray.shutdown()
        stop_embedded_redis(root)


def _timed_job(root: str, url: str, model: str, records: list, optimisers: int, edit_config: dict, batch_size: int,
               job_id: str) -> dict:
    """Warm a coordinator with `optimisers` actors, then time one job from submit to its final state."""
    from cluster.coordinator import Coordinator, CoordinatorConfig
    from cluster.jobs import JobSpec

    cfg = CoordinatorConfig(store=root, redis_url=url, optimisers=optimisers, evaluators=0, consumer=f"bench-{job_id}",
                            poll_seconds=0.2)
    spec = JobSpec(memory=f"bench-{job_id}", records=records, job_id=job_id, model=model, edit_config=edit_config,
                   batch_size=batch_size)
    with Coordinator(cfg) as coord:
        coord.value_pool().broadcast("describe", model, spec.editor_overrides())
        coord.tokenizer(model)
        t0 = time.perf_counter()
        submitted = time.time()
        coord.jobs.submit(spec)
        coord.run(until=lambda: coord.jobs.get(job_id).terminal)
        seconds = time.perf_counter() - t0
        st = coord.jobs.get(job_id)
    if st.state != "succeeded":
        raise RuntimeError(f"benchmark job {job_id} ended {st.state}: {st.error}")
    return {"seconds": seconds, "committed": st.n_committed, "edits_per_s": st.n_committed / seconds,
            "queue_wait": st.started_at - submitted, "actor_seconds": _histogram_sum(coord.metrics.batch_seconds)}


def _histogram_sum(hist) -> float:
    """Sum of the observations of a prometheus Histogram (here: seconds spent in actor batches)."""
    return next(s.value for s in hist.collect()[0].samples if s.name.endswith("_sum"))


def _spin(seconds: float) -> int:
    """Single-threaded float work for `seconds`; returns the number of matmuls done."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)
        n += 1
    return n


def _machine_ratio(seconds: float = 4.0) -> float:
    """Throughput of 2 concurrent one-CPU Ray tasks over 1: the best ratio this machine allows right now."""
    import ray

    spin = ray.remote(num_cpus=1)(_spin)
    one = ray.get(spin.remote(seconds))
    two = sum(ray.get([spin.remote(seconds), spin.remote(seconds)]))
    return two / one


def bench_ingest_scaling(model: str = "smollm2-135m", n_edits: int = 16, steps: int = 5, batch_size: int = 4) -> dict:
    """Edits/s of a job with 2 ValueOptimiser actors vs 1 (field: ratio), same records and settings.

    Each actor has one CPU (one torch thread), so on an idle machine with >= 2 free cores the ideal
    ratio is 2. `machine_ratio` measures what the machine gives right now (2 vs 1 concurrent
    single-threaded matmul loops on the same Ray); `scaling_efficiency` = ratio / machine_ratio.
    """
    import os

    records = _records(n_edits)
    cfg = {"values": {"steps": steps, "stop_loss": 0.0}}
    with _local_env(num_cpus=2) as (root, url):
        machine = _machine_ratio()
        one = _timed_job(root, url, model, records, 1, cfg, batch_size, "scale-1")
        two = _timed_job(root, url, model, records, 2, cfg, batch_size, "scale-2")
    ratio = two["edits_per_s"] / one["edits_per_s"]
    return {
        "benchmark": "jobs-ingest-scaling", "ratio": round(ratio, 3),
        "machine_ratio": round(machine, 3), "scaling_efficiency": round(ratio / machine, 3),
        "edits_per_s_1_actor": round(one["edits_per_s"], 4), "edits_per_s_2_actors": round(two["edits_per_s"], 4),
        "seconds_1_actor": round(one["seconds"], 2), "seconds_2_actors": round(two["seconds"], 2),
        "n_edits": n_edits, "batch_size": batch_size, "steps": steps, "cpu_count": os.cpu_count(),
    }


def bench_queue_overhead(model: str = "smollm2-135m", n_edits: int = 20, steps: int = 5, batch_size: int | None = None) -> dict:
    """Time of an n-edit job through the queue (submit -> Redis -> Ray actor -> store commit -> final state)
    over the same edits computed in-process with `Editor.compute` (field: overhead; 1.0 = no overhead).

    Both sides use one torch thread (an actor gets one CPU) and the same editor settings; the
    job runs as one batch unless `batch_size` is given.
    """
    import torch

    from editing import Editor
    from editing.records import parse_record

    records = _records(n_edits, offset=50)
    cfg = {"values": {"steps": steps, "stop_loss": 0.0}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ed = Editor.load(model, values=cfg["values"])
        _ = ed.templates
        reqs = [parse_record(r, i) for i, r in enumerate(records)]
        t0 = time.perf_counter()
        ed.compute(reqs)
        direct = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    del ed
    with _local_env(num_cpus=2) as (root, url):
        queued = _timed_job(root, url, model, records, 1, cfg, batch_size or n_edits, "overhead")
    return {
        "benchmark": "jobs-queue-overhead", "overhead": round(queued["seconds"] / direct - 1, 3),  # fraction: 0.05 = 5% slower through the queue
        "queue_seconds": round(queued["seconds"], 3), "direct_seconds": round(direct, 3),
        "actor_seconds": round(queued["actor_seconds"], 3), "queue_wait_seconds": round(queued["queue_wait"], 3),
        "extra_seconds": round(queued["seconds"] - direct, 3), "n_edits": n_edits, "steps": steps,
        "batch_size": batch_size or n_edits,
    }


if __name__ == "__main__":  # pragma: no cover
    import sys

    fn = {"ingest": bench_ingest_scaling, "overhead": bench_queue_overhead}[sys.argv[1] if len(sys.argv) > 1 else "ingest"]
    print(json.dumps(fn()))
