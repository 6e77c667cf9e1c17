"""The jobs path end to end: real local Ray, real embedded Redis, real store in a temp dir, real model.

One Ray instance, one Redis and one coordinator (one ValueOptimiser + one Evaluator actor) are
shared by the module; optimiser steps and context templates are cut down so each batch is fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from cluster.jobs import (
    JobConflictError, JobSpec, JobState, JobStateError, QueueUnavailableError, RecordState, job_edit_id,
)

MODEL = "smollm2-135m"
FAST = {"values": {"steps": 3}, "n_contexts": 2}  # keep batches to a few seconds on a shared 2-core box
TIMEOUT = 300


@pytest.fixture(scope="module")
def raw_records():
    from editing.data import data_file

    return json.loads(data_file("counterfact_valid.json").read_text())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A temp store with its embedded Redis, and one local Ray for the module."""
    import ray

    from store import connect_redis, embedded_url, stop_embedded_redis

    root = str(tmp_path_factory.mktemp("jobs-store"))
    connect_redis(None, root).close()  # start the store's embedded server
    ray.init(num_cpus=4, include_dashboard=False, namespace="kvedit", logging_level=logging.WARNING)
    try:
        yield SimpleNamespace(root=root, url=embedded_url(root), address=ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
        stop_embedded_redis(root)


@pytest.fixture(scope="module")
def coord(env):
    from cluster.coordinator import Coordinator, CoordinatorConfig

    port = _free_port()
    c = Coordinator(CoordinatorConfig(store=env.root, redis_url=env.url, optimisers=1, evaluators=1, lease_seconds=3,
                                      poll_seconds=0.5, consumer="test", http_port=port))
    c.start()
    c.port = port
    try:
        yield c
    finally:
        c.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(records, memory: str, **kw) -> JobSpec:
    kw.setdefault("batch_size", 2)
    return JobSpec(memory=memory, records=records, model=MODEL, edit_config=FAST, **kw)


def _run(coord, *job_ids: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    coord.run(until=lambda: all(coord.jobs.get(j).terminal for j in job_ids) or time.monotonic() > deadline)
    for j in job_ids:
        assert coord.jobs.get(j).terminal, f"job {j} did not finish in {timeout}s: {coord.jobs.get(j)}"


def _run_in_thread(coord, job_id: str) -> threading.Thread:
    t = threading.Thread(target=_run, args=(coord, job_id), daemon=True)
    t.start()
    return t


def _wait_for(cond, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _memory_ids(coord, memory: str) -> list[str]:
    return coord.store.read(memory).column("edit_id").to_pylist()


def _assert_exactly_once(coord, memory: str, job_id: str, indices) -> None:
    ids = _memory_ids(coord, memory)
    assert len(ids) == len(set(ids)), "an edit was committed twice"
    records = coord.jobs.spec(job_id).records
    assert sorted(ids) == sorted(job_edit_id(job_id, i, records[i]) for i in indices)


def _running(coord, job_id: str) -> bool:
    st = coord.jobs.get(job_id, records=True)
    return any(r["status"] == RecordState.RUNNING for r in st.records)


def _cli(*args):
    import typer
    from typer.testing import CliRunner

    from cluster.jobs_cli import edit_submit, jobs_app

    app = typer.Typer()
    app.add_typer(jobs_app, name="jobs")
    app.command("submit")(edit_submit)
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------------------- tests


def test_end_to_end_job_then_duplicate_submission(coord, env, raw_records, smol):
    spec = _spec(raw_records[:4], "e2e", job_id="e2e-1")
    status, created = coord.jobs.submit(spec)
    assert created and status.state == JobState.QUEUED
    _run(coord, spec.job_id)

    st = coord.jobs.get(spec.job_id, records=True)
    assert st.state == JobState.SUCCEEDED, st.error
    assert (st.n_committed, st.n_failed, st.batches_done, st.layer) == (4, 0, 2, 6)
    _assert_exactly_once(coord, "e2e", spec.job_id, range(4))
    assert st.version == coord.store.current_version("e2e", refresh=True)
    for r in st.records:
        assert r["status"] == RecordState.COMMITTED and r["steps"] >= 1 and r["loss"] > 0
        assert isinstance(r["efficacy"], bool)
    assert len(st.records) == 4 and st.n_evaluated == 4 and st.efficacy > 0, "the unedited model scores 0 on them"
    # independently of the job's own evaluation: the committed rows change the model's answers
    from editing.metrics import next_token_logits

    info, table = coord.store.load("e2e")
    prompts = [r["prompt"] for r in raw_records[:4]]
    smol.detach()
    base = next_token_logits(smol.model, smol.tok, prompts)
    smol.attach(table, router=info.router["name"], threshold=info.router["threshold"])
    try:
        edited = next_token_logits(smol.model, smol.tok, prompts)
    finally:
        smol.detach()
    assert all(not torch.equal(e, b) for e, b in zip(edited, base)), "every committed edit changes its prompt's logits"
    metrics = coord.metrics.render().decode()
    assert "kvedit_edits_committed_total 4.0" in metrics
    assert 'kvedit_jobs{state="succeeded"} 1.0' in metrics

    # the same job id again: nothing queued, nothing recomputed, the memory is unchanged
    version = coord.store.current_version("e2e")
    again, created = coord.jobs.submit(_spec(raw_records[:4], "e2e", job_id="e2e-1"))
    assert not created and again.state == JobState.SUCCEEDED
    assert coord.queue.depth() == 0
    assert coord.run(idle_exit=True) == 0
    assert coord.store.current_version("e2e") == version
    _assert_exactly_once(coord, "e2e", spec.job_id, range(4))
    with pytest.raises(JobConflictError, match="e2e-1"):
        coord.jobs.submit(_spec(raw_records[:3], "e2e", job_id="e2e-1"))

    # CLI views, and the coordinator's HTTP API on its port
    res = _cli("jobs", "status", spec.job_id, "--json", "--store", env.root, "--redis-url", env.url)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["state"] == "succeeded"
    res = _cli("jobs", "ls", "--json", "--store", env.root, "--redis-url", env.url)
    assert spec.job_id in [j["job_id"] for j in json.loads(res.output)]
    res = _cli("jobs", "watch", spec.job_id, "--json", "--store", env.root, "--redis-url", env.url)
    assert res.exit_code == 0 and json.loads(res.output.splitlines()[-1])["state"] == "succeeded"
    import httpx

    r = httpx.get(f"http://127.0.0.1:{coord.port}/jobs/{spec.job_id}", timeout=10)
    assert r.status_code == 200 and r.json()["n_committed"] == 4


def test_statistics_are_sharded_merged_and_cached(coord, tmp_path, monkeypatch):
    from cluster.runtime import ActorPool
    from editing.stats import SecondMoment
    from workers.covariance import CovarianceBuilder

    spec = coord.value_pool().broadcast("describe", MODEL, _spec([{}], "x").editor_overrides())[0]
    fp, layer = spec["model_fingerprint"], spec["layer"]
    pool = ActorPool(CovarianceBuilder, 1, "covariance")
    try:
        key, meta2 = coord.ensure_statistics(MODEL, layer, fp, 1024, shards=2, use_cache=False, pool=pool)
        two = SecondMoment.from_bytes(coord.store.get_artifact("stats", key)[0])
        key1, meta1 = coord.ensure_statistics(MODEL, layer, fp, 1024, shards=1, use_cache=False, pool=pool)
        one = SecondMoment.from_bytes(coord.store.get_artifact("stats", key)[0])
    finally:
        pool.shutdown()
    assert key1 == key and key.startswith(f"{fp}-L{layer}-")
    assert (meta2["shards"], meta1["shards"]) == (2, 1)
    assert two.count == one.count == meta2["tokens"] > 1000
    assert (two.total - one.total).abs().max() <= 1e-6 * one.total.abs().max()
    assert two.meta["corpus_hash"] == key.rsplit("-", 1)[1]
    # built once: the next call is a cache hit (no actor is started)
    _, meta = coord.ensure_statistics(MODEL, layer, fp, 1024)
    assert meta["cached"] is True
    # a replica on another host (no local statistics cache) finds them in the store
    from editing.table import MemorySpec
    from serving.memory import load_second_moment

    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path))
    got = load_second_moment(MemorySpec(**spec), coord.store)
    assert got.count == one.count and torch.equal(got.total, one.total)


def test_statistics_two_coordinators_need_at_once_are_built_once(coord):
    """A second coordinator that finds the same statistics being built waits for them (one build, one blob
    under the name), and takes the build over if the first one's claim lapses."""
    spec = coord.value_pool().broadcast("describe", MODEL, _spec([{}], "x").editor_overrides())[0]
    fp, layer = spec["model_fingerprint"], spec["layer"]
    coord.tokenizer(MODEL)  # loaded before the threads (two threads importing transformers at once race)
    results, puts = {}, []
    real_put = coord.store.put_artifact
    coord.store.put_artifact = lambda kind, key, data, meta=None: puts.append(key) or real_put(kind, key, data, meta)
    try:
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, coord.ensure_statistics(
            MODEL, layer, fp, 768, job_id=f"job-{n}"))) for n in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join(TIMEOUT)
    finally:
        coord.store.put_artifact = real_put
    (k0, m0), (k1, m1) = results[0], results[1]
    assert k0 == k1 and sorted([m0["cached"], m1["cached"]]) == [False, True], (m0, m1)
    assert puts == [k0], "written once"
    assert not coord.store.redis.exists(f"kvedit:stats-build:{k0}"), "the claim is released"
    from cluster.coordinator import _Claim

    stale = _Claim(coord.store.redis, "kvedit:stats-build:demo", "dead")
    assert stale.take() and not _Claim(coord.store.redis, "kvedit:stats-build:demo", "other").take()
    coord.store.redis.pexpire("kvedit:stats-build:demo", 1)  # its holder died: the claim lapses
    time.sleep(0.05)
    assert _Claim(coord.store.redis, "kvedit:stats-build:demo", "other").take()


def test_whitened_job_names_its_statistics_for_replicas(coord, raw_records, tmp_path, monkeypatch):
    """The C0 a whitened job routes with is the one its memory's versions name, so every replica uses it."""
    from serving.memory import make_memory_router

    spec = _spec(raw_records[4:6], "white", job_id="white-1", router="whitened", stats_tokens=1024)
    coord.jobs.submit(spec)
    _run(coord, spec.job_id)
    st = coord.jobs.get(spec.job_id)
    assert st.state == JobState.SUCCEEDED, st.error
    info = coord.store.info("white")
    assert st.stats_key and info.router["stats"] == st.stats_key
    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path))  # nothing local: the store's artifact or an error
    router, _ = make_memory_router(info.router, info.spec, coord.store)
    from editing.routers import WhitenedRouter
    from editing.stats import SecondMoment

    stored = SecondMoment.from_bytes(coord.store.get_artifact("stats", st.stats_key)[0])
    assert torch.equal(router.c0_inv, WhitenedRouter(stored.mean).c0_inv)


def test_retrain_is_due_on_growth_up_to_the_row_cap():
    from cluster.robust import RETRAIN_MAX_ROWS, retrain_due

    rk = {"robust_keys": {"rows": 100, "retrain_growth": 0.25}}
    assert not retrain_due(rk, 124) and retrain_due(rk, 125)
    assert not retrain_due({"robust_keys": {"rows": 100, "retrain_growth": None}}, 1000), "retrained by hand only"
    assert not retrain_due({}, 1000) and not retrain_due(None, 5)
    assert retrain_due(rk, RETRAIN_MAX_ROWS) and not retrain_due(rk, int(RETRAIN_MAX_ROWS * 1.25) + 1)
    capped = {"robust_keys": {**rk["robust_keys"], "retrain_max_rows": 130}}
    assert retrain_due(capped, 130) and retrain_due(capped, 162) and not retrain_due(capped, 163), \
        "up to one growth step past the cap (a job's batches can jump over it), not further"
    near = {"robust_keys": {"rows": 120, "retrain_growth": 0.25, "retrain_max_rows": 130}}
    assert not retrain_due(near, 129) and retrain_due(near, 130), "trained near the cap: retrained once at the cap"
    assert retrain_due(near, 135), "also when a job jumps over the cap"
    at_cap = {"robust_keys": {"rows": 130, "retrain_growth": 0.25, "retrain_max_rows": 130}}
    assert not retrain_due(at_cap, 130) and not retrain_due(at_cap, 150), "trained at the cap: by hand from then on"
    uncapped = {"robust_keys": {**rk["robust_keys"], "retrain_max_rows": None}}
    assert retrain_due(uncapped, 10 ** 6) and not retrain_due(uncapped, 124), "null: no cap (as `memory show` says)"


def test_actor_killed_mid_batch_batch_is_retried(coord, raw_records):
    import ray

    spec = _spec(raw_records[4:10], "killed", job_id="kill-1")
    coord.jobs.submit(spec)
    restarts = coord.value_pool().restarts
    runner = _run_in_thread(coord, spec.job_id)

    slot = coord.values.slots[0]
    _wait_for(lambda: _running(coord, spec.job_id), what="a batch to start")
    time.sleep(0.5)
    os.kill(slot.pid, signal.SIGKILL)  # the actor process dies mid-batch
    _wait_for(lambda: slot.generation == 1 and _running(coord, spec.job_id), what="the batch to be retried")
    time.sleep(0.5)
    ray.kill(slot.handle)  # ... and its replacement is killed through Ray
    runner.join(TIMEOUT)

    st = coord.jobs.get(spec.job_id)
    assert st.state == JobState.SUCCEEDED, st.error
    assert coord.values.restarts - restarts == 2
    _assert_exactly_once(coord, "killed", spec.job_id, range(6))
    assert 'kvedit_actor_restarts_total{pool="values"} 2.0' in coord.metrics.render().decode()


def test_coordinator_sigkilled_mid_job_is_finished_after_restart(coord, env, raw_records, tmp_path):
    spec = _spec(raw_records[10:16], "crash", job_id="crash-1")
    coord.jobs.submit(spec)
    log = open(tmp_path / "coordinator.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cluster.jobs_cli", "coordinator", "--store", env.root, "--redis-url", env.url,
         "--ray-address", env.address, "--evaluators", "0", "--lease", "3", "--consumer", "doomed", "--max-jobs", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: coord.jobs.get(spec.job_id).n_committed >= 2 or proc.poll() is not None,
                  what="the subprocess coordinator to commit a batch")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        log.close()
    st = coord.jobs.get(spec.job_id)
    assert st.state == JobState.RUNNING and 2 <= st.n_committed < 6, (tmp_path / "coordinator.log").read_text()[-3000:]

    _run(coord, spec.job_id)  # reclaims the entry once the dead coordinator's lease expired
    st = coord.jobs.get(spec.job_id)
    assert st.state == JobState.SUCCEEDED, st.error
    assert st.attempts == 2 and st.owner == "test"
    _assert_exactly_once(coord, "crash", spec.job_id, range(6))
    assert coord.queue.depth() == 0 and coord.queue.pending_count() == 0


def test_cancel_queued_and_running_jobs(coord, env, raw_records):
    queued = _spec(raw_records[16:18], "never", job_id="cancel-queued")
    coord.jobs.submit(queued)
    assert coord.jobs.request_cancel(queued.job_id).state == JobState.CANCELLED
    coord.run(idle_exit=True)  # the entry is acknowledged without any work
    assert coord.queue.depth() == 0 and not coord.store.exists("never")

    spec = _spec(raw_records[18:23], "cancelled", job_id="cancel-running", batch_size=1)
    coord.jobs.submit(spec)
    runner = _run_in_thread(coord, spec.job_id)
    _wait_for(lambda: coord.jobs.get(spec.job_id).n_committed >= 1, what="the first commit")
    res = _cli("jobs", "cancel", spec.job_id, "--json", "--store", env.root, "--redis-url", env.url)
    assert res.exit_code == 0 and json.loads(res.output)["cancel_requested"] is True
    runner.join(TIMEOUT)

    st = coord.jobs.get(spec.job_id, records=True)
    assert st.state == JobState.CANCELLED
    assert 1 <= st.n_committed < 5 and st.n_cancelled == 5 - st.n_committed
    committed = [r["index"] for r in st.records if r["status"] == RecordState.COMMITTED]
    _assert_exactly_once(coord, "cancelled", spec.job_id, committed)  # committed batches stay
    with pytest.raises(JobStateError, match="already cancelled"):
        coord.jobs.request_cancel(spec.job_id)
    res = _cli("jobs", "cancel", spec.job_id, "--store", env.root, "--redis-url", env.url)
    assert res.exit_code == 1 and "nothing to cancel" in res.output


def test_malformed_records_partial_failure_and_all_or_nothing(coord, env, raw_records, tmp_path):
    good = raw_records[23:26]
    bad_missing = {k: v for k, v in raw_records[26].items() if k != "target_new"}
    bad_subject = {**raw_records[27], "subject": "Nobody In Particular"}
    bad_type = {**raw_records[28], "prompt": 42}
    records = [good[0], bad_missing, good[1], bad_subject, bad_type, good[2]]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    common = ["--edit-config", json.dumps(FAST), "--batch-size", 2, "--json", "--store", env.root, "--redis-url", env.url]

    res = _cli("submit", data, "--memory", "mixed", "--job-id", "mixed-1", *common)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"job_id": "mixed-1", "state": "queued", "created": True, "n_records": 6, "memory": "mixed"}
    res = _cli("submit", data, "--memory", "aon", "--job-id", "aon-1", "--all-or-nothing", *common)
    assert res.exit_code == 0, res.output
    _run(coord, "mixed-1", "aon-1")

    st = coord.jobs.get("mixed-1", records=True)
    assert st.state == JobState.PARTIALLY_FAILED
    assert (st.n_committed, st.n_invalid, st.n_failed) == (3, 3, 3)
    errors = {r["index"]: r["error"] for r in st.records if r["status"] == RecordState.INVALID}
    assert {i: e["field"] for i, e in errors.items()} == {1: "target_new", 3: "subject", 4: "prompt"}
    assert "missing" in errors[1]["reason"] and "expected a string" in errors[4]["reason"]
    assert "record 3" in errors[3]["message"] and "mixed.json" in errors[3]["message"]
    assert "record 1" in st.error
    _assert_exactly_once(coord, "mixed", "mixed-1", [0, 2, 5])

    aon = coord.jobs.get("aon-1", records=True)
    assert aon.state == JobState.FAILED and "all-or-nothing" in aon.error and aon.n_committed == 0
    assert {r["status"] for r in aon.records} == {RecordState.INVALID, RecordState.SKIPPED}
    assert not coord.store.exists("aon")
    res = _cli("jobs", "status", "aon-1", "--store", env.root, "--redis-url", env.url)
    assert res.exit_code == 0 and "target_new" in res.output


def test_http_api_requires_the_token_for_writes(env, raw_records):
    from fastapi.testclient import TestClient

    from cluster.api import create_app
    from cluster.jobs import JobStore

    jobs = JobStore.connect(env.url, env.root)
    client = TestClient(create_app(jobs, token="s3cret"))
    body = {"memory": "api", "records": raw_records[:2], "job_id": "api-1", "edit_config": FAST}
    good = {"Authorization": "Bearer s3cret"}

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        assert client.post("/jobs", json=body, headers=headers).status_code == 401
        assert not jobs.exists("api-1")
    r = client.post("/jobs", json=body, headers=good)
    assert r.status_code == 202 and r.json() == {"job_id": "api-1", "state": "queued", "created": True}
    assert client.post("/jobs", json=body, headers=good).json()["created"] is False
    assert client.post("/jobs", json={**body, "memory": "no/slash"}, headers=good).status_code == 422
    r = client.post("/jobs", json={**body, "job_id": "api-2", "edit_config": {"stepz": 3}}, headers=good)
    assert r.status_code == 422 and "edit_config" in r.json()["detail"]["message"] and not jobs.exists("api-2")
    for bad in (float("nan"), float("inf")):  # a NaN gate would build a memory that never fires
        raw = json.dumps({**body, "job_id": "api-3", "threshold": bad})  # NaN / Infinity tokens, as Python clients send them
        r = client.post("/jobs", content=raw, headers={**good, "Content-Type": "application/json"})
        assert r.status_code == 422 and "'threshold'" in r.json()["detail"]["message"] and not jobs.exists("api-3")
    assert client.post("/jobs", json={**body, "records": raw_records[:1]}, headers=good).status_code == 409

    assert client.get("/jobs/api-1").json()["state"] == "queued"
    assert "api-1" in [j["job_id"] for j in client.get("/jobs").json()]
    assert client.get("/jobs/nope").status_code == 404
    assert client.post("/jobs/api-1/cancel").status_code == 401
    assert client.post("/jobs/api-1/cancel", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert jobs.get("api-1").state == "queued" and not jobs.get("api-1").cancel_requested
    r = client.post("/jobs/api-1/cancel", headers=good)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert client.post("/jobs/api-1/cancel", headers=good).status_code == 409

    text = client.get("/metrics").text
    assert 'kvedit_jobs{state="cancelled"}' in text and "kvedit_job_queue_depth" in text
    assert "kvedit_batch_duration_seconds" in text and "kvedit_optimiser_loss" in text and "kvedit_actor_restarts" in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/cancel", "/metrics"} <= set(paths)
    assert TestClient(create_app(jobs, token="")).post("/jobs", json=body, headers=good).status_code == 401


def test_unreachable_redis_or_ray_is_a_clear_error(env, raw_records, tmp_path):
    from cluster.coordinator import Coordinator, CoordinatorConfig
    from cluster.jobs import JobStore
    from cluster.queue import JobQueue
    from cluster.runtime import RayUnavailableError, connect_ray

    dead = "redis://127.0.0.1:1"
    with pytest.raises(QueueUnavailableError, match="unreachable"):
        JobStore.connect(dead)
    with pytest.raises(QueueUnavailableError, match="unreachable"):
        Coordinator(CoordinatorConfig(store=env.root, redis_url=dead)).start()
    data = tmp_path / "two.json"
    data.write_text(json.dumps(raw_records[:2]))
    res = _cli("submit", data, "--memory", "x", "--store", env.root, "--redis-url", dead)
    assert res.exit_code == 1 and "unreachable" in res.output

    t0 = time.monotonic()
    with pytest.raises(RayUnavailableError, match="unreachable"):
        connect_ray("127.0.0.1:1")
    assert time.monotonic() - t0 < 10

    # a coordinator that cannot reach Ray takes no job: it stays queued and undelivered
    jobs = JobStore.connect(env.url, env.root)
    jobs.submit(_spec(raw_records[:2], "noray", job_id="noray-1"))
    with pytest.raises(RayUnavailableError):
        Coordinator(CoordinatorConfig(store=env.root, redis_url=env.url, ray_address="127.0.0.1:1")).start()
    assert jobs.get("noray-1").state == JobState.QUEUED
    assert JobQueue(jobs.client).pending_count() == 0
    jobs.request_cancel("noray-1")


def test_lease_keeper_holds_a_job_through_long_stretches_and_ack_needs_ownership(tmp_path):
    """A job's lease is renewed from a thread while the work cannot beat itself (model loading, a slow commit);
    once another coordinator owns the entry the keeper reports it lost, and the old owner cannot ack it away."""
    from cluster.queue import JobQueue, LeaseKeeper
    from store import connect_redis, stop_embedded_redis

    root = str(tmp_path / "lease-store")
    client = connect_redis(None, root)
    try:
        queue = JobQueue(client, stream="test:lease", group="test-group")
        queue.ensure_group()
        client.xadd("test:lease", {"job_id": "j1"})
        mine = queue.read("a", block_ms=100)
        assert mine is not None and mine.job_id == "j1"
        with LeaseKeeper(queue, "a", mine.entry_id, interval=0.1) as keeper:
            time.sleep(1.0)  # a long stretch with no beat of our own
            assert queue.reclaim("b", min_idle_seconds=0.5) == [], "the kept lease is fresh"
            assert not keeper.lost.is_set()
        time.sleep(0.6)  # the keeper stopped: the lease expires
        taken = queue.reclaim("b", min_idle_seconds=0.5)
        assert [d.entry_id for d in taken] == [mine.entry_id]
        with LeaseKeeper(queue, "a", mine.entry_id, interval=0.05) as late:
            assert late.lost.wait(5), "the old owner learns it lost the job"
        assert not queue.ack_owned("a", mine.entry_id) and queue.depth() == 1, "the new owner's entry survives"
        assert queue.ack_owned("b", mine.entry_id) and queue.depth() == 0
    finally:
        client.close()
        stop_embedded_redis(root)


def _delivery_of(coord, job_id: str):
    """The stream entry of `job_id`, delivered to `coord` (entries of other jobs read on the way stay pending for
    it: its next `run` takes them up first)."""
    for d in coord.queue.own_pending(coord.consumer):
        if d.job_id == job_id:
            return d
    while (d := coord.queue.read(coord.consumer, block_ms=1000)) is not None:
        if d.job_id == job_id:
            return d
    raise AssertionError(f"no stream entry for job {job_id}")


def test_a_backlog_entry_another_coordinator_took_over_is_not_started(coord, raw_records):
    """Reclaimed and own pending entries wait in a backlog without lease renewals; one that another coordinator
    took over in the meantime is skipped, not started a second time (which counted an attempt, took the job's
    owner and reset the other's running records)."""
    spec = _spec(raw_records[40:41], "taken-over", job_id="taken-over")
    coord.jobs.submit(spec)
    delivery = _delivery_of(coord, spec.job_id)
    taken = coord.queue.reclaim("other-coordinator", min_idle_seconds=0, count=1000)
    assert delivery.entry_id in [d.entry_id for d in taken]
    for d in taken:  # give the others back to this coordinator
        if d.entry_id != delivery.entry_id:
            coord.queue.client.xclaim(coord.queue.stream, coord.queue.group, coord.consumer, 0, [d.entry_id])
    assert coord.process(delivery) is None
    st = coord.jobs.get(spec.job_id)
    assert st.state == JobState.QUEUED and st.attempts == 0, "not started here"
    assert coord.queue.ack_owned("other-coordinator", delivery.entry_id)
    coord.jobs.request_cancel(spec.job_id)


def test_a_reused_job_id_with_other_records_adds_its_edits(coord, raw_records):
    """After a job is forgotten (`JobStore.delete`, as `kvedit demo` does before re-running) its id can be
    submitted again; records that differ get new edit ids instead of being skipped as already committed."""
    first = _spec(raw_records[42:43], "reused", job_id="reused")
    coord.jobs.submit(first)
    _run(coord, first.job_id)
    coord.jobs.delete([first.job_id])
    second = _spec(raw_records[43:44], "reused", job_id="reused")
    coord.jobs.submit(second)
    _run(coord, second.job_id)
    st = coord.jobs.get(second.job_id)
    assert st.state == JobState.SUCCEEDED and st.n_committed == 1
    assert sorted(_memory_ids(coord, "reused")) == sorted(
        [job_edit_id("reused", 0, raw_records[42]), job_edit_id("reused", 0, raw_records[43])])
    assert coord.store.read("reused").column("subject").to_pylist() != [raw_records[42]["subject"]] * 2


def test_rows_committed_under_the_old_edit_ids_still_map_to_their_records(coord, raw_records):
    """Edit ids include the record since 2026-12-08; rows committed before keep the (job, index) id, and a
    robust-key retrain still finds their records (with their rephrasings) in the job store."""
    from cluster.jobs import legacy_job_edit_id
    from cluster.robust import records_of_rows

    spec = _spec(raw_records[48:50], "legacy", job_id="legacy")
    coord.jobs.submit(spec)
    coord.jobs.request_cancel(spec.job_id)  # queued: cancelled at once, the records stay readable
    old, new = legacy_job_edit_id("legacy", 1), job_edit_id("legacy", 0, spec.records[0])
    assert old != job_edit_id("legacy", 1, spec.records[1])
    got = records_of_rows(coord.jobs, pa.table({"edit_id": [old, new], "job_id": ["legacy"] * 2}), set())
    assert {k: r.subject for k, r in got.items()} == {old: raw_records[49]["subject"], new: raw_records[48]["subject"]}
    assert got[old].subject_rephrases, "with the rephrasings a retrain trains on"


def test_edits_committed_before_a_crash_are_reported_committed_on_resume(coord, raw_records):
    """A coordinator killed between `store.commit` and the save of the records' statuses left them pending; the
    next one finds their edits live in the memory and reports them committed (here the job is cancelled meanwhile,
    which would otherwise have reported its committed edit cancelled)."""
    first = _spec(raw_records[44:45], "recon", job_id="recon-a")
    coord.jobs.submit(first)
    _run(coord, first.job_id)
    crashed = _spec(raw_records[45:47], "recon", job_id="recon-b")
    coord.jobs.submit(crashed)
    assert coord.jobs.start(crashed.job_id, "dead-coordinator", 1)
    row = coord.store.read("recon")  # a valid row, given the crashed job's first edit id
    row = row.set_column(row.schema.get_field_index("edit_id"), "edit_id",
                         pa.array([job_edit_id(crashed.job_id, 0, crashed.records[0])]))
    coord.store.commit("recon", row.set_column(row.schema.get_field_index("job_id"), "job_id", pa.array([crashed.job_id])))
    coord.jobs.request_cancel(crashed.job_id)
    _run(coord, crashed.job_id)
    st = coord.jobs.get(crashed.job_id, records=True)
    assert st.state == JobState.CANCELLED and (st.n_committed, st.n_cancelled) == (1, 1), st
    assert [r["status"] for r in sorted(st.records, key=lambda r: r["index"])] == [RecordState.COMMITTED,
                                                                                    RecordState.CANCELLED]
    assert st.version == coord.store.current_version("recon")


def test_stops_do_not_use_up_a_jobs_starts(coord, raw_records):
    """A coordinator told to stop hands its job over; that is not a crash, so more handovers than
    max_job_attempts leave the job to run, not failed as "started 3 times without finishing"."""
    spec = _spec(raw_records[41:42], "handed-over", job_id="handed-over")
    coord.jobs.submit(spec)
    coord.stop_event.set()
    try:
        for _ in range(coord.config.max_job_attempts + 1):
            assert coord.process(_delivery_of(coord, spec.job_id)) is None, "handed over"
            st = coord.jobs.get(spec.job_id)
            assert st.state == JobState.RUNNING and st.attempts == 0 and st.n_committed == 0, st
    finally:
        coord.stop_event.clear()
    _run(coord, spec.job_id)
    st = coord.jobs.get(spec.job_id)
    assert st.state == JobState.SUCCEEDED and st.attempts == 1 and st.n_committed == 1
    assert not coord.jobs.release_attempt(spec.job_id, coord.consumer), "a finished job keeps its count"


def test_a_hung_actor_is_replaced_and_its_item_retried(env, tmp_path):
    from cluster.runtime import ActorPool, PoolError

    class HangsOnce:  # defined here so Ray ships it by value (the tests are not importable on workers)
        """A pool worker whose first call for "hang" never returns (a hung actor); later calls answer."""

        def ready(self) -> int:
            return os.getpid()

        def work(self, item: str, marker: str) -> str:
            if item == "hang" and not os.path.exists(marker):
                open(marker, "w").close()
                time.sleep(60)  # far past the timeout (bounded, so a regression fails instead of hanging)
            return item.upper()

    pool = ActorPool(HangsOnce, 1, "test-hang")
    try:
        marker = str(tmp_path / "hung")
        t0 = time.monotonic()
        run = pool.run(["a", "hang", "b"], lambda actor, item: actor.work.remote(item, marker), poll=0.2, item_timeout=4)
        outs = {o.item: o for o in run}
        assert {k: o.value for k, o in outs.items()} == {"a": "A", "hang": "HANG", "b": "B"}
        assert outs["hang"].attempts == 2 and pool.restarts == 1 and time.monotonic() - t0 < 40
        os.unlink(marker)  # hangs again, and one attempt is all it gets: a clear error, not a stalled job
        (out,) = pool.run(["hang"], lambda actor, item: actor.work.remote(item, marker), poll=0.2, item_timeout=3,
                          max_attempts=1)
        assert isinstance(out.error, PoolError) and "did not finish within 3s" in str(out.error)
        assert pool.restarts == 2

        import ray

        refs = []

        def stop_once_finished() -> None:  # a consumer that stops (coordinator shutdown) as the item finishes
            if refs and ray.wait(refs, timeout=0)[0]:
                raise RuntimeError("stopping")

        submit = lambda actor, item: refs.append(actor.work.remote(item, marker)) or refs[-1]  # noqa: E731
        (out,) = pool.run(["c"], submit, poll=30, on_tick=stop_once_finished)
        assert out.value == "C", "a finished item is read before the tick that would abandon it"
    finally:
        pool.shutdown()


def test_a_slow_consumer_does_not_expire_finished_items_and_a_timed_out_broadcast_replaces_its_actors(env):
    """While the consumer handles one outcome (a commit can take seconds) another item may finish: past its
    timeout but finished, it is read, not killed and recomputed. A broadcast that times out replaces the actors
    still running it, so the next broadcast does not queue behind a hung call."""
    from cluster.runtime import ActorPool, PoolError

    class Naps:
        def ready(self) -> int:
            return os.getpid()

        def nap(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    pool = ActorPool(Naps, 2, "test-naps")
    try:
        pool.wait_ready()
        outs = []
        for out in pool.run([0.1, 1.0], lambda actor, s: actor.nap.remote(s), poll=0.1, item_timeout=1.5):
            outs.append(out)
            if out.item == 0.1:
                time.sleep(2.5)  # the consumer is busy; the 1 s item finishes meanwhile, 2.5 s after its start
        assert [(o.item, o.value, o.attempts) for o in outs] == [(0.1, 0.1, 1), (1.0, 1.0, 1)]
        assert pool.restarts == 0
        with pytest.raises(PoolError, match="did not finish"):
            pool.broadcast("nap", 30, timeout=1)
        assert pool.restarts == 2, "both hung actors replaced"
        assert pool.broadcast("nap", 0.1, timeout=60) == [0.1, 0.1], "the next broadcast is answered"
        # an actor replaced by another caller (a job's calibration that saw it die) is not replaced again by the
        # run whose item it was running: the fresh actor takes the retried item
        before = pool.restarts
        replaced = []

        def replace_later(item, slot) -> None:  # once, with the item's first run under way (same thread, as there)
            if not replaced:
                replaced.append(slot.index)
                pool.replace(slot)

        (out,) = pool.run([2.0], lambda actor, s: actor.nap.remote(s), poll=0.1, on_dispatch=replace_later)
        assert (out.value, out.attempts, pool.restarts) == (2.0, 2, before + 1)
    finally:
        pool.shutdown()


def test_job_thresholds_are_checked_against_the_router():
    from cluster.jobs import JobSpec, JobSpecError

    JobSpec(memory="m", records=[{}], router="whitened", threshold=2.5).check()  # whitened scores can pass 1
    for router, bad in (("cosine", 1.5), ("margin", 1.0), ("cosine", float("inf"))):
        with pytest.raises(JobSpecError, match=r"field 'threshold'"):
            JobSpec(memory="m", records=[{}], router=router, threshold=bad).check()
    for model in (None, 3, " "):
        with pytest.raises(JobSpecError, match=r"field 'model'"):
            JobSpec(memory="m", records=[{}], model=model).check()
    # edit settings of the wrong type or far out of range fail at submission, naming the setting (they failed every
    # batch with a bare TypeError on the actors, or hung them)
    for config, name in (({"max_target_tokens": "x"}, "max_target_tokens"), ({"seed": {"a": 1}}, "seed"),
                         ({"batch_size": 0}, "batch_size"), ({"n_contexts": 10**7}, "n_contexts"),
                         ({"values": {"steps": "x"}}, "values.steps"), ({"values": {"lr": 0}}, "values.lr"),
                         ({"layer": 3}, "edit_config.layer")):
        with pytest.raises(JobSpecError, match=re.escape(name)):
            JobSpec(memory="m", records=[{}], edit_config=config).check()
    JobSpec(memory="m", records=[{}], edit_config={"values": {"steps": 5, "lr": 1}, "n_contexts": 0}).check()


def test_counters_the_dashboards_take_increase_of_exist_from_the_start():
    """A labelled series born at its first event starts at 1, and increase() over it shows 0: the first actor
    restart of a pool would never appear on the dashboard."""
    from cluster.api import JobMetrics

    text = JobMetrics().render().decode()
    for pool in ("values", "evaluator", "covariance"):
        assert f'kvedit_actor_restarts_total{{pool="{pool}"}} 0.0' in text
    assert 'kvedit_robust_keys_retrains_total{result="deferred"} 0.0' in text


def test_retrain_backoff_doubles_per_failure_and_clears_on_success():
    from cluster.robust import RetrainBackoff

    now = [100.0]
    b = RetrainBackoff(10.0, clock=lambda: now[0])
    assert b.wait("m") == 0
    assert [b.failed("m") for _ in range(6)] == [10, 20, 40, 80, 160, 160], "doubling, capped at 16x"
    assert b.wait("m") == 160 and b.wait("other") == 0, "per memory"
    now[0] += 159.5
    assert b.wait("m") == 0.5
    now[0] += 1
    assert b.wait("m") == 0
    b.succeeded("m")
    assert b.failed("m") == 10, "a retrain that lands starts the count again"


def _retrains(coord, result: str) -> float:
    """The value of kvedit_robust_keys_retrains_total{result} on the module's coordinator."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(coord.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "kvedit_robust_keys_retrains_total" and sample.labels.get("result") == result:
                return sample.value
    return 0.0


def test_a_failed_retrain_defers_the_retrains_later_jobs_find_due(coord, raw_records, monkeypatch):
    """A memory whose retrain fails (here: the rephrasings artifact its adapter names is missing) does not
    make every later job that grows it try again at once: they find it deferred, and the try after the
    backoff fails again with a doubled delay. The jobs' edits are committed all along."""
    name = "rk-broken"
    first = _spec(raw_records[:2], name, job_id="rkb-1", threshold=0.5)
    coord.jobs.submit(first)
    _run(coord, first.job_id)
    coord.store.commit(name, router_patch={"robust_keys": {"rows": 1, "retrain_growth": 0.25, "steps": 5,
                                                           "rephrases": "no-such-artifact"}})
    now = [0.0]
    monkeypatch.setattr(coord.retrain_backoff, "clock", lambda: now[0])
    before = {r: _retrains(coord, r) for r in ("failed", "deferred")}
    for i, (result, count) in enumerate([("failed", 1.0), ("deferred", 1.0), ("failed", 2.0)], start=2):
        if i == 4:
            now[0] += coord.config.retrain_backoff_seconds  # past the first delay
        job = _spec(raw_records[i + 1:i + 2], name, job_id=f"rkb-{i}", threshold=0.5)
        coord.jobs.submit(job)
        _run(coord, job.job_id)
        st = coord.jobs.get(job.job_id)
        assert st.state == JobState.SUCCEEDED and st.n_committed == 1 and st.robust_keys_version is None, st
        assert _retrains(coord, result) - before[result] == count, (i, result)
    assert coord.retrain_backoff.wait(name) == 2 * coord.config.retrain_backoff_seconds, "doubled"
    assert coord.store.info(name).n_rows == 5


def test_a_job_that_grows_the_memory_retrains_its_robust_keys(coord, raw_records, smol):
    """A memory's REP adapter keeps up with it: after a job that adds `retrain_growth` more rows than the adapter
    saw, the coordinator retrains it on every row (stored rephrasings of the old rows plus the job's records) and
    commits it; a job that adds fewer rows leaves it alone."""
    from cluster.robust import RETRAIN_MAX_ROWS, train_robust_keys
    from store.artifacts import REPHRASES_KIND
    from editing import load_records
    from editing.data import data_file
    from editing.rep import ARTIFACT_KIND, RobustKeyHparams

    records = load_records(data_file("counterfact_valid.json"), limit=9)
    counts0 = {r: _retrains(coord, r) for r in ("ok", "failed", "abandoned")}  # the coordinator is the module's
    first = _spec(raw_records[:4], "rk", job_id="rk-1", threshold=0.5)
    coord.jobs.submit(first)
    _run(coord, first.job_id)
    assert coord.jobs.get(first.job_id).robust_keys_version is None, "no adapter yet: nothing to retrain"
    trained = train_robust_keys(smol, coord.store, "rk", records[:4], RobustKeyHparams(steps=5), retrain_growth=0.25)
    assert (trained["rows"], trained["rephrased_rows"]) == (4, 4)
    before = coord.store.info("rk").router["robust_keys"]

    grow = _spec(raw_records[4:6], "rk", job_id="rk-2", threshold=0.5)  # 4 -> 6 rows: +50% >= 25%
    coord.jobs.submit(grow)
    _run(coord, grow.job_id)
    st = coord.jobs.get(grow.job_id)
    assert st.state == JobState.SUCCEEDED, st.error
    info = coord.store.info("rk")
    rk = info.router["robust_keys"]
    assert st.robust_keys_version == info.version > st.version, "the adapter is committed after the job's rows"
    assert rk["rows"] == info.n_rows == 6 and rk["trained_on_version"] == st.version
    assert rk["artifact"] != before["artifact"] and rk["steps"] == 5 and rk["retrain_growth"] == 0.25
    assert rk["retrain_max_rows"] == RETRAIN_MAX_ROWS
    assert coord.store.get_artifact(ARTIFACT_KIND, rk["artifact"]) is not None
    stored = json.loads(coord.store.get_artifact(REPHRASES_KIND, rk["rephrases"])[0])
    ids = dict(zip(coord.store.load("rk")[1].column("prompt").to_pylist(),
                   coord.store.load("rk")[1].column("edit_id").to_pylist()))
    assert stored == {ids[r.prompt]: r.subject_rephrases for r in records[:6]}, \
        "the old rows' stored rephrasings and the job's records' rephrasings"

    small = _spec(raw_records[6:7], "rk", job_id="rk-3", threshold=0.5)  # 6 -> 7 rows: +17% < 25%
    coord.jobs.submit(small)
    _run(coord, small.job_id)
    st = coord.jobs.get(small.job_id)
    assert st.state == JobState.SUCCEEDED and st.robust_keys_version is None
    assert coord.store.info("rk").router["robust_keys"] == rk and coord.store.info("rk").version == st.version

    # 7 -> 8 rows (+33% of the 6 trained on), but the coordinator is told to stop during the retrain: it is abandoned
    # with its actor (nothing commits later) and the job still succeeds with its edits committed
    stopped = _spec(raw_records[7:8], "rk", job_id="rk-4", threshold=0.5)
    coord.jobs.submit(stopped)
    restarts = coord.value_pool().restarts
    runner = _run_in_thread(coord, stopped.job_id)
    _wait_for(lambda: coord.jobs.get(stopped.job_id).stage == "robust_keys", what="the retrain to start")
    coord.stop_event.set()
    runner.join(TIMEOUT)
    coord.stop_event.clear()
    st = coord.jobs.get(stopped.job_id)
    assert st.state == JobState.SUCCEEDED and st.n_committed == 1 and st.robust_keys_version is None, st
    assert coord.value_pool().restarts == restarts + 1
    time.sleep(3)
    assert coord.store.info("rk").router["robust_keys"] == rk and coord.store.info("rk").n_rows == 8

    last = _spec(raw_records[8:9], "rk", job_id="rk-5", threshold=0.5)  # 8 -> 9 rows: the retrain is still due
    coord.jobs.submit(last)
    _run(coord, last.job_id)
    st = coord.jobs.get(last.job_id)
    info = coord.store.info("rk")
    assert st.robust_keys_version == info.version and info.router["robust_keys"]["rows"] == 9
    stored = json.loads(coord.store.get_artifact(REPHRASES_KIND, info.router["robust_keys"]["rephrases"])[0])
    ids = dict(zip(coord.store.load("rk")[1].column("prompt").to_pylist(),
                   coord.store.load("rk")[1].column("edit_id").to_pylist()))
    assert stored == {ids[r.prompt]: r.subject_rephrases for r in records[:9]}, \
        "the rephrasings of rk-3's and rk-4's rows, which did not retrain, are read back from their jobs"
    assert _retrains(coord, "ok") - counts0["ok"] == 2
    assert _retrains(coord, "abandoned") - counts0["abandoned"] == 1, "a stop is not a failure"
    assert _retrains(coord, "failed") == counts0["failed"]

    # a job too small to retrain (9 -> 10 rows), then a retrain by hand without --data: the job's row trains
    # with its rephrasings, read back from the job store as the coordinator would
    from typer.testing import CliRunner

    from cluster.cli import app

    tail = _spec(raw_records[9:10], "rk", job_id="rk-6", threshold=0.5)
    coord.jobs.submit(tail)
    _run(coord, tail.job_id)
    assert coord.jobs.get(tail.job_id).robust_keys_version is None
    res = CliRunner().invoke(app, ["edit", "robust-keys", "--memory", "rk", "--store", coord.store.root,
                                   "--redis-url", coord.config.redis_url, "--steps", "5", "--json"])
    assert res.exit_code == 0, res.output
    rk = coord.store.info("rk").router["robust_keys"]
    stored = json.loads(coord.store.get_artifact(REPHRASES_KIND, rk["rephrases"])[0])
    from cluster.jobs import job_edit_id

    expected = load_records(data_file("counterfact_valid.json"), limit=10)[9].subject_rephrases
    assert rk["rows"] == 10 and expected and stored[job_edit_id(tail.job_id, 0, tail.records[0])] == expected, "the tail job's rephrasings"
