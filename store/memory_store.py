"""`MemoryStore`: named, versioned edit memories in Lance, with Redis for current versions and notifications.

Design (docs/adr/0002-store-format.md):
- One memory = one Lance dataset; kvedit version v = Lance version v + 1; every kvedit commit
  is exactly one Lance transaction, so a version is always complete and reads are repeatable.
- Appends, deletes, metadata updates and rollbacks are all committed as a Lance `Merge` that
  lists the full fragment set: Lance cannot rebase a Merge over any concurrent data change, so
  a writer whose head moved gets a conflict and re-plans. That is the compare-and-set that
  serialises writers on any machine, with or without a shared Redis.
- Per-version state (router config, metadata, row count) sits in the schema metadata written
  by that commit; what the commit did sits in its transaction properties (history).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import lance
import pyarrow as pa
import pyarrow.compute as pc
import redis
from lance import LanceOperation, Transaction
from lance.fragment import FragmentMetadata, write_fragments
from lance.schema import LanceSchema

from editing.table import MemoryMismatchError, MemorySpec

from .artifacts import ArtifactStore
from .catalog import Catalog
from .delta import ADDR, LiveKeyCache, diff
from .errors import (
    CommitConflictError,
    CorruptMemoryError,
    InvalidRowsError,
    MemoryExistsError,
    MemoryNotFoundError,
    StoreError,
    StoreUnavailableError,
    VersionNotFoundError,
    where,
)
from .files import file_router, read_table_file, write_table_file
from .lancefs import check_name, data_error, keep_alive, kv_version, normalize_root, open_dataset, session, store_id
from .model import MemoryDelta, MemoryInfo, MemoryVersion
from .redisconn import Coordinator, Subscription, connect_redis
from .rows import BATCH, LIVE_FILTER, STATE_KEY, anchor_row, prepare_rows, sql_in, sql_str, stored_schema, to_user_table, user_schema

log = logging.getLogger(__name__)

COMMIT_PROP = "kvedit.commit"
PAUSE_ENV = "KVEDIT_STORE_TEST_PAUSE"
_READ_ERRORS = (OSError, ValueError, RuntimeError, pa.ArrowException)


def _pause_point(point: str) -> None:
    """Fault-injection hook for crash tests: with KVEDIT_STORE_TEST_PAUSE=<point>@<file>, write the
    file and sleep at that point so a test can SIGKILL the writer there. No effect otherwise."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    want, _, marker = spec.partition("@")
    if want == point:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(3600)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _ts(value: str | None) -> datetime:
    return datetime.fromisoformat(value) if value else datetime.fromtimestamp(0, timezone.utc)


def _is_conflict(exc: Exception) -> bool:
    if isinstance(exc, lance.commit.CommitConflictError):
        return True
    msg = str(exc).lower()
    return "conflict" in msg or "preempted" in msg


def _merge_metadata(current: dict, update: dict | None) -> dict:
    """`update` applied to `current`; a None value removes the key."""
    out = dict(current)
    for k, v in (update or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


NOOP = "noop"  # the op of a commit, delete or import that changed nothing (the version is the head's)


@dataclass
class _Plan:
    """One attempt at a commit: the Lance operation and what it records."""

    operation: LanceOperation.BaseOperation
    info: dict


class MemoryStore:
    """Named edit memories under one root (local directory or object-store URI).

    Args:
        uri: store root; default `$KVEDIT_STORE` or `~/.cache/kvedit/store`.
        redis_url: Redis deployment; default `$KVEDIT_REDIS_URL` or the embedded server.
        storage_options: passed to Lance (object-store credentials, endpoints).
        commit_timeout: seconds a commit keeps retrying lost races before `CommitConflictError`.
        lock_wait: seconds to wait for the Redis writer lock before committing without it.
        rows_per_fragment: largest data fragment written by commits and compaction.
    """

    def __init__(
        self,
        uri: str | os.PathLike | None = None,
        redis_url: str | None = None,
        *,
        storage_options: dict | None = None,
        commit_timeout: float = 300.0,
        lock_wait: float = 10.0,
        rows_per_fragment: int = 131072,
    ):
        self.root, self.is_local = normalize_root(uri)
        self.redis_url = redis_url
        self.storage_options = storage_options
        self.commit_timeout = commit_timeout
        self.lock_wait = lock_wait
        self.rows_per_fragment = rows_per_fragment
        self.store_id = store_id(self.root)
        self.catalog = Catalog(self.root, self.is_local, storage_options)
        self.artifacts = ArtifactStore(self.root, storage_options)
        self._redis: redis.Redis | None = None
        self._coord: Coordinator | None = None
        self._keys: dict[str, LiveKeyCache] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({self.root!r})"

    # ----------------------------------------------------------------- plumbing

    @property
    def redis(self) -> redis.Redis:
        """The Redis client (connected on first use; `StoreUnavailableError` if unreachable)."""
        if self._redis is None:
            self._redis = connect_redis(self.redis_url, self.root)
        return self._redis

    def _coordinator(self) -> Coordinator:
        if self._coord is None:
            self._coord = Coordinator(self.redis, self.store_id, self.root)
        return self._coord

    def close(self) -> None:
        """Drop the Redis connection (the embedded server stops when its last kvedit process exits)."""
        if self._redis is not None:
            self._redis.close()
        self._redis = self._coord = None

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def uri_of(self, name: str) -> str:
        return f"{self.root}/{check_name(name)}.lance"

    def _open(self, name: str, version: int | None = None) -> lance.LanceDataset:
        if version is not None and (not isinstance(version, int) or version < 0):
            raise VersionNotFoundError(f"{where(name, version)}: versions are integers >= 0", name, version)
        return open_dataset(self.uri_of(name), name, version, self.storage_options)

    def _live(self, name: str, ds: lance.LanceDataset) -> pa.Table:
        """edit_id, _batch, _rowaddr of the live rows of `ds`, incrementally from this store's previous look."""
        return self._keys.setdefault(name, LiveKeyCache()).get(ds)

    def _state(self, ds: lance.LanceDataset, name: str) -> tuple[MemorySpec, dict]:
        meta = ds.schema.metadata or {}
        try:
            spec = MemorySpec.from_metadata(meta)
            state = json.loads(meta[STATE_KEY])
        except (KeyError, ValueError, TypeError, MemoryMismatchError) as exc:
            raise CorruptMemoryError(
                f"{where(name, kv_version(ds.version))}: not a kvedit memory (schema metadata lacks kvedit.spec/state)",
                name, kv_version(ds.version),
            ) from exc
        return spec, state

    def _info(self, name: str, ds: lance.LanceDataset, oldest: int | None = None) -> MemoryInfo:
        spec, state = self._state(ds, name)
        return MemoryInfo(
            name=name, spec=spec, router=state.get("router", {}), version=kv_version(ds.version),
            n_rows=state["n_rows"], created_at=_ts(state.get("created_at")), committed_at=_ts(state.get("committed_at")),
            metadata=state.get("metadata", {}), uri=self.uri_of(name),
            oldest_version=oldest if oldest is not None else kv_version(ds.version),
        )

    def _entry(self, name: str, ds: lance.LanceDataset, lance_v: int) -> MemoryVersion:
        """The history entry of one Lance version, from its transaction properties."""
        try:
            txn = ds.read_transaction(lance_v)
        except _READ_ERRORS as exc:
            raise data_error(exc, name, kv_version(lance_v), "read the transaction of") from exc
        props = (txn.transaction_properties or {}) if txn is not None else {}
        raw = props.get(COMMIT_PROP)
        if raw is None:  # a version written by something other than kvedit
            view = ds.checkout_version(lance_v)
            op = type(txn.operation).__name__.lower() if txn is not None else "unknown"
            return MemoryVersion(name, kv_version(lance_v), _ts(None), f"external:{op}", n_rows=view.count_rows(LIVE_FILTER))
        info = json.loads(raw)
        return MemoryVersion(
            memory=name, version=kv_version(lance_v), committed_at=_ts(info.get("committed_at")), op=info.get("op", "commit"),
            message=info.get("message", ""), n_added=info.get("n_added", 0), n_deleted=info.get("n_deleted", 0),
            n_rows=info.get("n_rows", 0), job_id=info.get("job_id"), target=info.get("target"),
        )

    def _write_fragments(self, ds: lance.LanceDataset, spec: MemorySpec, rows: pa.Table, name: str) -> list[FragmentMetadata]:
        """Write rows as new, uncommitted fragments, each led by an anchor row (see `store.rows`)."""
        anchor = anchor_row(spec)
        rows = rows.cast(anchor.schema)
        out: list[FragmentMetadata] = []
        try:
            for start in range(0, rows.num_rows, self.rows_per_fragment):
                chunk = pa.concat_tables([anchor, rows.slice(start, self.rows_per_fragment)])
                out.extend(write_fragments(chunk, ds, max_rows_per_file=self.rows_per_fragment + 1))
        except _READ_ERRORS as exc:
            raise StoreError(f"{where(name, kv_version(ds.version))}: cannot write rows: {exc}", name) from exc
        _pause_point("fragments-written")
        return out

    def _commit_loop(self, name: str, plan_fn: Callable[[lance.LanceDataset], _Plan | None]) -> MemoryVersion:
        """Plan against the head and commit; on a lost race re-plan against the new head."""
        try:
            return self._commit_locked(name, plan_fn)
        except redis.RedisError as exc:
            if self.redis_url or os.environ.get("KVEDIT_REDIS_URL"):
                raise StoreUnavailableError(f"{where(name)}: Redis unavailable, nothing committed: {exc}", name) from exc
            log.warning("%s: embedded Redis went away (%s); restarting it", where(name), exc)
            self.close()
            return self._commit_locked(name, plan_fn)

    def _moved(self, name: str, head: lance.LanceDataset) -> bool:
        """Whether another writer committed since `head` (a failed commit is then retried, not reported)."""
        try:
            return self._open(name).version != head.version
        except StoreError:
            return False

    def _commit_locked(self, name: str, plan_fn: Callable[[lance.LanceDataset], _Plan | None]) -> MemoryVersion:
        coord = self._coordinator()
        deadline = time.monotonic() + self.commit_timeout
        attempt = 0
        with coord.lock(name, wait=self.lock_wait):
            while True:
                head = self._open(name)
                plan = plan_fn(head)
                if plan is None:  # nothing to change: no new version, and nothing reported as done
                    return replace(self._entry(name, head, head.version), op=NOOP, message="nothing to change",
                                   n_added=0, n_deleted=0, job_id=None, target=None)
                txn = Transaction(head.version, plan.operation, transaction_properties={COMMIT_PROP: json.dumps(plan.info)})
                _pause_point("before-commit")
                try:
                    new = lance.LanceDataset.commit(head, txn, storage_options=self.storage_options)
                except _READ_ERRORS as exc:
                    if not _is_conflict(exc) and not self._moved(name, head):
                        raise StoreError(f"{where(name, kv_version(head.version) + 1)}: commit failed: {exc}", name) from exc
                    attempt += 1
                    if time.monotonic() > deadline:
                        raise CommitConflictError(
                            f"{where(name, kv_version(head.version))}: gave up after {attempt} lost commit races", name
                        ) from exc
                    log.debug("%s: lost a commit race (attempt %d), re-planning", where(name), attempt)
                    time.sleep(min(0.2, 0.002 * 2 ** min(attempt, 7)) * (0.5 + random.random()))
                    continue
                version = kv_version(new.version)
                _pause_point("committed")
                info = plan.info
                try:
                    coord.announce(name, version, info["committed_at"], info["op"])
                except redis.RedisError as exc:
                    log.warning("%s: committed, but Redis was not updated (%s); current_version will rebuild it", where(name, version), exc)
                return MemoryVersion(
                    memory=name, version=version, committed_at=_ts(info["committed_at"]), op=info["op"],
                    message=info.get("message", ""), n_added=info.get("n_added", 0), n_deleted=info.get("n_deleted", 0),
                    n_rows=info.get("n_rows", 0), job_id=info.get("job_id"), target=info.get("target"),
                )

    # ----------------------------------------------------------------- create / read

    def create(self, name: str, spec: MemorySpec, router: dict, exist_ok: bool = False) -> MemoryVersion:
        """Create an empty memory (version 0) bound to `spec` and the router config.

        With `exist_ok`, an existing memory with the same spec and router is returned as is
        (its current version); a different spec or router is a `MemoryMismatchError`.
        """
        uri = self.uri_of(name)
        try:
            json.dumps(router)
        except TypeError as exc:
            raise StoreError(f"{where(name)}: router config is not JSON-serialisable: {exc}", name) from exc
        now = _now().isoformat()
        info = {"op": "create", "message": "create", "n_added": 0, "n_deleted": 0, "n_rows": 0, "job_id": None, "committed_at": now}
        state = {"router": router, "metadata": {}, "n_rows": 0, "created_at": now, "committed_at": now}
        schema = stored_schema(spec, name, state)
        try:
            keep_alive(uri, lance.write_dataset(
                schema.empty_table(), uri, schema=schema, mode="create", session=session(),
                storage_options=self.storage_options, transaction_properties={COMMIT_PROP: json.dumps(info)},
            ))
        except (OSError, ValueError) as exc:
            if "already exists" not in str(exc).lower():
                raise StoreError(f"{where(name)}: cannot create: {exc}", name) from exc
            current = self.info(name)
            if not exist_ok:
                raise MemoryExistsError(f"{where(name, current.version)}: already exists", name, current.version) from exc
            spec.check(current.spec, what=f"existing {where(name, current.version)}")
            if json.loads(json.dumps(router)) != current.router:
                raise MemoryMismatchError(
                    f"existing {where(name, current.version)} has router config {current.router}, not {router}"
                ) from exc
            if name not in self.catalog.names():
                self.catalog.add(name)
            head = self._open(name)
            return self._entry(name, head, head.version)
        self.catalog.add(name)
        try:
            self._coordinator().announce(name, 0, now, "create")
        except (redis.RedisError, StoreUnavailableError) as exc:
            log.warning("%s: created, but Redis was not updated: %s", where(name, 0), exc)
        return MemoryVersion(name, 0, _ts(now), "create", "create")

    def exists(self, name: str) -> bool:
        try:
            self._open(name)
            return True
        except MemoryNotFoundError:
            return False

    def info(self, name: str, version: int | None = None) -> MemoryInfo:
        """Spec, router config, version, row count and per-version metadata of a memory."""
        ds = self._open(name, version)
        oldest = min((kv_version(v["version"]) for v in ds.versions()), default=None)
        return self._info(name, ds, oldest)

    def live_ids(self, name: str, edit_ids: list[str]) -> set[str]:
        """Which of `edit_ids` are rows of the latest version (from the incremental live-key cache)."""
        if not edit_ids:
            return set()
        live = self._live(name, self._open(name)).column("edit_id")
        asked = pa.array(list(edit_ids), pa.string())
        return set(asked.filter(pc.is_in(asked, value_set=live.combine_chunks())).to_pylist())

    def read(self, name: str, version: int | None = None) -> pa.Table:
        """Every edit row of a version (latest if None), in the edit schema; the same version always reads the same."""
        ds = self._open(name, version)
        return self._read(name, ds)

    def _read(self, name: str, ds: lance.LanceDataset) -> pa.Table:
        spec, state = self._state(ds, name)
        v = kv_version(ds.version)
        try:
            table = ds.to_table(columns=user_schema(spec).names, filter=LIVE_FILTER)
        except _READ_ERRORS as exc:
            raise data_error(exc, name, v) from exc
        if table.num_rows != state["n_rows"]:
            raise CorruptMemoryError(
                f"{where(name, v)}: read {table.num_rows} rows but the version records {state['n_rows']}", name, v
            )
        return to_user_table(table, spec)

    def load(self, name: str, version: int | None = None, spec: MemorySpec | None = None) -> tuple[MemoryInfo, pa.Table]:
        """(info, rows) of one version; with `spec`, refuse a memory built for another model or layer."""
        ds = self._open(name, version)
        info = self._info(name, ds)
        if spec is not None:
            info.check(spec)
        return info, self._read(name, ds)

    def ls(self) -> list[MemoryInfo]:
        """Every memory of the store at its latest version (unreadable ones are logged and skipped)."""
        out = []
        for name in self.catalog.names():
            try:
                out.append(self.info(name))
            except MemoryNotFoundError:
                continue
            except StoreError as exc:
                log.warning("ls: skipping %s", exc)
        return out

    def history(self, name: str) -> list[MemoryVersion]:
        """Every retained version, oldest first."""
        ds = self._open(name)
        return [self._entry(name, ds, v["version"]) for v in sorted(ds.versions(), key=lambda v: v["version"])]

    def current_version(self, name: str, refresh: bool = False) -> int:
        """The memory's current version as cached in Redis; rebuilt from the store when Redis lost it.

        With `refresh`, the store is consulted as well and Redis raised to it (a writer killed
        between its commit and its notification leaves Redis one version behind until the next
        commit). Falls back to the store, with a warning, when Redis is unreachable.
        """
        try:
            coord = self._coordinator()
            cached = coord.get_version(name)
        except (redis.RedisError, StoreUnavailableError) as exc:
            log.warning("%s: Redis unavailable (%s); reading the current version from the store", where(name), exc)
            return kv_version(self._open(name).version)
        if cached is not None and not refresh:
            return cached
        version = kv_version(self._open(name).version)
        if cached is None or version > cached:
            try:
                coord.set_version(name, version)
                log.info("%s: rebuilt the current version in Redis from the store", where(name, version))
            except redis.RedisError as exc:
                log.warning("%s: could not update Redis: %s", where(name, version), exc)
        return max(version, cached if cached is not None else -1)

    def changes(self, name: str, since: int, until: int | None = None) -> MemoryDelta:
        """Rows added and edit_ids deleted from version `since` to `until` (latest if None).

        Cost is proportional to the change, not to the memory (see `store.delta`).
        """
        b = self._open(name, until)
        a = self._open(name, since)
        spec, state = self._state(b, name)
        to_v = kv_version(b.version)
        try:
            added, deleted, _ = diff(a, b, user_schema(spec).names + [BATCH])
        except _READ_ERRORS as exc:
            raise data_error(exc, name, to_v, f"compute the delta from v{since} of") from exc
        return MemoryDelta(
            memory=name, from_version=since, to_version=to_v, added=to_user_table(added, spec), deleted=deleted,
            router=state.get("router", {}), metadata=state.get("metadata", {}), spec=spec, n_rows=state["n_rows"],
        )

    def subscribe(self, name: str) -> Subscription:
        """Commit notifications of `name` (channel `kvedit:memory:<name>`, JSON {memory, version, committed_at, op, store})."""
        return Subscription(self.redis, check_name(name))

    # ----------------------------------------------------------------- writes

    def commit(
        self,
        name: str,
        add: pa.Table | None = None,
        delete_ids: list[str] | None = None,
        *,
        message: str = "",
        job_id: str | None = None,
        skip_existing: bool = True,
        metadata_update: dict | None = None,
        router_update: dict | None = None,
        router_patch: dict | None = None,
        router_expect: dict | None = None,
    ) -> MemoryVersion:
        """Append rows and delete edit_ids in one new version (deletes apply first, so an id in both is replaced).

        `skip_existing=True` skips rows whose edit_id is already in the current version (so job
        retries never duplicate an edit); False replaces those rows. Unknown delete ids are
        ignored. `metadata_update` is merged into the per-version metadata (None deletes a key).
        `router_update` replaces the router config from this version on; its router name must stay
        the same. `router_patch` sets single keys of it instead (a None value removes the key), merged
        into the head's config inside the commit, so a concurrent writer's other keys (a recalibrated
        threshold, a REP adapter) survive. `router_expect` makes the commit conditional: each of its keys
        must still have that value (None: absent) in the head's router config, checked inside the commit,
        else `CommitConflictError` and nothing is written (a slow writer that read the config long ago, such
        as an adapter retrain, does not undo a change made meanwhile). A commit that would change nothing
        creates no version and returns the current one.
        """
        if router_update is not None and router_patch is not None:
            raise StoreError(f"{where(name)}: give router_update or router_patch, not both", name)
        return self._change(name, add=add, delete_ids=delete_ids, where_sql=None, message=message, job_id=job_id,
                            skip_existing=skip_existing, metadata_update=metadata_update, op="commit",
                            router_update=router_update, router_patch=router_patch, router_expect=router_expect)

    def delete(
        self, name: str, edit_ids: list[str] | None = None, subject: str | None = None, job_id: str | None = None,
        *, message: str = "",
    ) -> MemoryVersion:
        """Delete the listed edit_ids plus the rows matching every given filter (subject, job_id), as one commit."""
        if not edit_ids and subject is None and job_id is None:
            raise StoreError(f"{where(name)}: delete needs edit_ids, subject or job_id", name)
        filters = []
        if subject is not None:
            filters.append(f"subject = {sql_str(subject)}")
        if job_id is not None:
            filters.append(f"job_id = {sql_str(job_id)}")
        what = [f"{len(edit_ids)} edit_id(s)"] if edit_ids else []
        what += [f"subject={subject!r}"] if subject is not None else []
        what += [f"job_id={job_id!r}"] if job_id is not None else []
        return self._change(name, add=None, delete_ids=list(edit_ids or []), where_sql=" AND ".join(filters) or None,
                            message=message or "delete " + ", ".join(what), job_id=None, skip_existing=True,
                            metadata_update=None, op="delete")

    def _change(
        self, name: str, *, add: pa.Table | None, delete_ids: list[str] | None, where_sql: str | None, message: str,
        job_id: str | None, skip_existing: bool, metadata_update: dict | None, op: str, router_update: dict | None = None,
        router_patch: dict | None = None, router_expect: dict | None = None,
    ) -> MemoryVersion:
        head = self._open(name)
        spec, _ = self._state(head, name)
        rows = prepare_rows(add, spec, name, kv_version(head.version), job_id=job_id) if add is not None else None
        if rows is not None and rows.num_rows == 0:
            rows = None
        if metadata_update is not None:
            try:
                json.dumps(metadata_update)
            except TypeError as exc:
                raise InvalidRowsError(f"{where(name)}: metadata_update is not JSON-serialisable: {exc}", name) from exc
        if router_update is not None or router_patch is not None:
            arg = "router_update" if router_update is not None else "router_patch"
            try:
                router_update, router_patch = (None if x is None else json.loads(json.dumps(x)) for x in (router_update, router_patch))
            except TypeError as exc:
                raise StoreError(f"{where(name)}: {arg} is not JSON-serialisable: {exc}", name) from exc
        written: dict[str, list[FragmentMetadata]] = {}

        def fragments_for(ds: lance.LanceDataset, table: pa.Table) -> list[FragmentMetadata]:
            # JSON-encoded ids: no two different id lists hash the same input, whatever characters they hold
            key = hashlib.sha1(json.dumps(table.column("edit_id").to_pylist()).encode()).hexdigest()
            if key not in written:
                written[key] = self._write_fragments(ds, spec, table, name)
            return written[key]

        if rows is not None:  # write the data files before taking the lock; reused unless the head changes them
            pre = rows
            if skip_existing:
                live_now = self._live(name, head).column("edit_id").combine_chunks()
                pre = rows.filter(pc.invert(pc.is_in(rows.column("edit_id"), value_set=live_now)))
            if pre.num_rows:
                fragments_for(head, pre)

        def plan(ds: lance.LanceDataset) -> _Plan | None:
            _, state = self._state(ds, name)
            hv = kv_version(ds.version)
            try:
                live = self._live(name, ds)
                live_ids = live.column("edit_id").combine_chunks()
                doomed = set(delete_ids or []).intersection(live_ids.to_pylist()) if delete_ids else set()
                if where_sql:
                    hit = ds.scanner(columns=["edit_id"], filter=f"{LIVE_FILTER} AND ({where_sql})").to_table()
                    doomed.update(hit.column("edit_id").to_pylist())
            except _READ_ERRORS as exc:
                raise data_error(exc, name, hv) from exc
            new_rows = None
            if rows is not None:
                remaining = live_ids
                if doomed:  # deletes apply first: an edit_id both deleted and added is replaced
                    remaining = pc.filter(live_ids, pc.invert(pc.is_in(live_ids, value_set=pa.array(sorted(doomed), pa.string()))))
                exists = pc.is_in(rows.column("edit_id"), value_set=remaining)
                if skip_existing:
                    new_rows = rows.filter(pc.invert(exists))
                else:
                    new_rows = rows
                    doomed.update(rows.filter(exists).column("edit_id").to_pylist())
                if new_rows.num_rows == 0:
                    new_rows = None
            metadata = _merge_metadata(state.get("metadata", {}), metadata_update)
            router = state.get("router", {})
            changed = [k for k, v in (router_expect or {}).items() if router.get(k) != v]
            if changed:
                raise CommitConflictError(f"{where(name, hv)}: router config {changed} changed since it was read; "
                                          "nothing committed", name, hv)
            wanted = _merge_metadata(router, router_patch) if router_patch is not None else router_update
            if wanted is not None:
                if wanted.get("name") != router.get("name"):
                    raise MemoryMismatchError(f"{where(name, hv)} has router {router.get('name')!r}; "
                                              f"a commit cannot switch it to {wanted.get('name')!r}")
                router = wanted
            if new_rows is None and not doomed and metadata == state.get("metadata", {}) and router == state.get("router", {}):
                return None
            fragments = self._delete_rows(ds, live, doomed, name)
            n_added = 0 if new_rows is None else new_rows.num_rows
            if new_rows is not None:
                fragments += fragments_for(ds, new_rows)
            now = _now().isoformat()
            n_rows = live.num_rows - len(doomed) + n_added
            info = {"op": op, "message": message, "job_id": job_id, "n_added": n_added, "n_deleted": len(doomed),
                    "n_rows": n_rows, "committed_at": now}
            new_state = dict(state, router=router, metadata=metadata, n_rows=n_rows, committed_at=now)
            return _Plan(LanceOperation.Merge(fragments, LanceSchema.from_pyarrow(stored_schema(spec, name, new_state))), info)

        return self._commit_loop(name, plan)

    def _delete_rows(self, ds: lance.LanceDataset, live: pa.Table, doomed: set[str], name: str) -> list[FragmentMetadata]:
        """Every fragment of `ds`, with new deletion files where rows in `doomed` live."""
        by_fragment: dict[int, list[str]] = {}
        if doomed:
            hit = live.filter(pc.is_in(live.column("edit_id"), value_set=pa.array(sorted(doomed), pa.string())))
            frag_ids = pc.shift_right(hit.column(ADDR), 32).to_pylist()
            for fid, eid in zip(frag_ids, hit.column("edit_id").to_pylist()):
                by_fragment.setdefault(fid, []).append(eid)
        out = []
        for frag in ds.get_fragments():
            ids = by_fragment.get(frag.fragment_id)
            if not ids:
                out.append(frag.metadata)
                continue
            out.append(self._delete_in(frag, f"{LIVE_FILTER} AND {sql_in('edit_id', ids)}", name, ds))
        return out

    @staticmethod
    def _delete_in(frag, predicate: str, name: str, ds: lance.LanceDataset) -> FragmentMetadata:
        try:
            meta = frag.delete(predicate)
        except _READ_ERRORS as exc:
            raise data_error(exc, name, kv_version(ds.version), "write a deletion file for") from exc
        if meta is None:  # only possible if the anchor row is gone
            raise CorruptMemoryError(
                f"{where(name, kv_version(ds.version))}: fragment {frag.fragment_id} has no anchor row", name, kv_version(ds.version)
            )
        return meta

    def rollback(self, name: str, to: int, *, message: str = "") -> MemoryVersion:
        """A new version whose rows, router config and metadata are those of version `to`."""
        target = self._open(name, to)
        spec, target_state = self._state(target, name)
        target_frags = {f.fragment_id: f for f in target.get_fragments()}

        def plan(ds: lance.LanceDataset) -> _Plan | None:
            _, state = self._state(ds, name)
            if kv_version(ds.version) == to:
                return None
            try:
                live = self._live(name, ds)
                with_rows = set(pc.unique(pc.shift_right(live.column(ADDR), 32)).to_pylist()) if live.num_rows else set()
                fragments, present = [], set()
                for frag in ds.get_fragments():
                    present.add(frag.fragment_id)
                    if frag.fragment_id in target_frags:
                        fragments.append(target_frags[frag.fragment_id].metadata)
                    elif frag.fragment_id in with_rows:
                        fragments.append(self._delete_in(frag, LIVE_FILTER, name, ds))
                    else:
                        fragments.append(frag.metadata)
                gone = [f for fid, f in target_frags.items() if fid not in present]
                if gone:  # rewritten by a compaction since `to`: write their rows again, same _batch ids
                    rows = target.scanner(fragments=gone, filter=LIVE_FILTER).to_table()
                    if rows.num_rows:
                        fragments += self._write_fragments(ds, spec, rows, name)
                _, deleted, n_added = diff(ds, target, [], counts_only=True)
            except _READ_ERRORS as exc:
                raise data_error(exc, name, kv_version(ds.version)) from exc
            now = _now().isoformat()
            info = {"op": "rollback", "message": message or f"rollback to v{to}", "job_id": None, "n_added": n_added,
                    "n_deleted": len(deleted), "n_rows": target_state["n_rows"], "committed_at": now, "target": to}
            new_state = dict(target_state, committed_at=now, created_at=state.get("created_at"))
            return _Plan(LanceOperation.Merge(fragments, LanceSchema.from_pyarrow(stored_schema(spec, name, new_state))), info)

        return self._commit_loop(name, plan)

    def compact(self, name: str, retain_from: int | None = None, *, message: str = "") -> dict:
        """Rewrite the live rows into few large fragments (one new version), then drop versions older than `retain_from`.

        Versions >= `retain_from` stay readable (and usable as `changes` bases); older ones are
        removed with the files only they referenced. Without `retain_from` no version is removed.
        """
        before = self._open(name)
        spec, _ = self._state(before, name)
        n_fragments_before = len(before.get_fragments())
        if retain_from is not None and not 0 <= retain_from <= kv_version(before.version) + 1:
            # checked before compacting too: a bad value must not leave a new version behind
            raise VersionNotFoundError(f"{where(name, retain_from)}: cannot retain from a version after the head "
                                       f"v{kv_version(before.version)} and its compaction", name, retain_from)

        last: dict = {}  # the previous attempt's rewrite: {"sources": [...], "new": [...]}

        def plan(ds: lance.LanceDataset) -> _Plan | None:
            frags = ds.get_fragments()
            if len(frags) <= 1 and all(f.metadata.deletion_file is None for f in frags):
                return None
            info = {"op": "compact", "message": message or "compact", "job_id": None, "n_added": 0, "n_deleted": 0,
                    "committed_at": _now().isoformat()}
            head = [f.metadata for f in frags]
            if last and all(any(src == m for m in head) for src in last["sources"]):
                # Lost the race to a commit that left the rewritten fragments as they were (an append): commit
                # the same rewrite again instead of rewriting every row while the next commit lands.
                group = LanceOperation.RewriteGroup(last["sources"], last["new"])
                return _Plan(LanceOperation.Rewrite([group], []), {**info, "n_rows": ds.count_rows(LIVE_FILTER)})
            new: list[FragmentMetadata] = []
            buffer: list[pa.RecordBatch] = []
            buffered = 0
            n_rows = 0
            try:
                for batch in ds.scanner(filter=LIVE_FILTER, batch_size=8192).to_batches():
                    buffer.append(batch)
                    buffered += batch.num_rows
                    if buffered >= self.rows_per_fragment:
                        table = pa.Table.from_batches(buffer)
                        new += self._write_fragments(ds, spec, table.slice(0, self.rows_per_fragment), name)
                        rest = table.slice(self.rows_per_fragment)
                        buffer, buffered = rest.to_batches(), rest.num_rows
                        n_rows += self.rows_per_fragment
                if buffered:
                    new += self._write_fragments(ds, spec, pa.Table.from_batches(buffer), name)
                    n_rows += buffered
            except _READ_ERRORS as exc:
                raise data_error(exc, name, kv_version(ds.version), "compact") from exc
            last.update(sources=head, new=new)
            group = LanceOperation.RewriteGroup(head, new)
            return _Plan(LanceOperation.Rewrite([group], []), {**info, "n_rows": n_rows})

        entry = self._commit_loop(name, plan)
        latest = self._open(name)
        removed: list[int] = []
        if retain_from is not None:
            head_v = kv_version(latest.version)
            if retain_from < 0 or retain_from > head_v:
                raise VersionNotFoundError(f"{where(name, retain_from)}: cannot retain from a version after the head v{head_v}", name, retain_from)
            old = [v["version"] for v in latest.versions() if kv_version(v["version"]) < retain_from]
            if old:
                try:
                    latest.cleanup_old_versions(older_than=timedelta(0), versions=old, error_if_tagged_old_versions=False)
                except _READ_ERRORS as exc:
                    raise StoreError(f"{where(name, head_v)}: compaction cleanup failed: {exc}", name, head_v) from exc
                removed = [kv_version(v) for v in old]
            latest = self._open(name)
        return {
            "memory": name,
            "version": entry.version,
            "compacted": entry.op == "compact" and entry.version > kv_version(before.version),
            "fragments_before": n_fragments_before,
            "fragments_after": len(latest.get_fragments()),
            "removed_versions": removed,
            "oldest_version": min(kv_version(v["version"]) for v in latest.versions()),
        }

    # ----------------------------------------------------------------- files and artifacts

    def export(self, name: str, out: str | os.PathLike, format: str = "parquet", version: int | None = None) -> dict:
        """Write one version as a Parquet (or Arrow) file that pandas/duckdb read; metadata records spec, router, version."""
        info, table = self.load(name, version)
        meta = dict(table.schema.metadata or {})
        meta.update({
            b"kvedit.memory": name.encode(),
            b"kvedit.version": str(info.version).encode(),
            b"kvedit.router": json.dumps(info.router).encode(),
            b"kvedit.metadata": json.dumps(info.metadata).encode(),
        })
        size = write_table_file(table.replace_schema_metadata(meta), out, format)
        return {"memory": name, "version": info.version, "rows": table.num_rows, "format": format, "path": str(out), "bytes": size}

    def import_table(self, name: str, path: str | os.PathLike, *, message: str = "", job_id: str | None = None,
                     router: dict | None = None) -> MemoryVersion:
        """Add the rows of a Parquet/Arrow edit table (existing edit_ids skipped) as one commit.

        A missing memory is created from the file's `kvedit.spec` and router config (else `router`, else
        the cosine router at its default threshold). Artifacts that config names (a REP adapter, the
        whitened router's C0) live in the exporting store; where this store lacks them the reference is
        dropped, logged and named in the version's message, so the memory serves without them instead
        of failing to load.
        """
        try:
            head_v: int | None = self.info(name).version
        except MemoryNotFoundError:
            head_v = None
        spec, table = read_table_file(path, name, head_v)
        if head_v is None:
            if spec is None:
                raise MemoryNotFoundError(f"{where(name)}: no such memory, and {path} has no kvedit.spec to create it from", name)
            try:  # the rows are checked before the memory exists: a bad file leaves no empty memory behind
                prepare_rows(table, spec, name, None)
            except InvalidRowsError as exc:
                raise InvalidRowsError(f"{path}: {exc}", name) from exc
            except MemoryMismatchError as exc:
                raise MemoryMismatchError(f"{path}: {exc}") from exc
            config, dropped = self._available_artifacts(file_router(table) or router or {"name": "cosine"})
            if dropped:
                log.warning("import %s into %r: %s not in this store, dropped from the router config", path, name,
                            ", ".join(dropped))
                message = message or f"import {Path(str(path)).name} (not in this store, dropped: {', '.join(dropped)})"
            self.create(name, spec, config, exist_ok=True)
        return self._change(name, add=table, delete_ids=None, where_sql=None, message=message or f"import {Path(str(path)).name}",
                            job_id=job_id, skip_existing=True, metadata_update=None, op="import")

    def _available_artifacts(self, router: dict) -> tuple[dict, list[str]]:
        """`router` without the artifact references (robust keys, C0 statistics) this store cannot resolve,
        and a description of each one dropped."""
        from editing.rep import ARTIFACT_KIND

        from .artifacts import REPHRASES_KIND, STATS_KIND

        config, dropped = dict(router), []
        rk = config.get("robust_keys")
        key = rk.get("artifact") if isinstance(rk, dict) else None
        if rk and (not key or self.find_artifact(ARTIFACT_KIND, key) != key):
            dropped.append(f"robust-keys artifact {key!r}")
            config.pop("robust_keys")
        elif rk and rk.get("rephrases") and self.find_artifact(REPHRASES_KIND, rk["rephrases"]) != rk["rephrases"]:
            dropped.append(f"rephrasings artifact {rk['rephrases']!r} (the adapter is kept, retrained by hand only: "
                           "kvedit edit robust-keys --data)")
            config["robust_keys"] = {**{k: v for k, v in rk.items() if k != "rephrases"}, "retrain_growth": None}
        if config.get("stats") and self.find_artifact(STATS_KIND, config["stats"]) != config["stats"]:
            dropped.append(f"C0 statistics artifact {config.pop('stats')!r}")
        return config, dropped

    def put_artifact(self, kind: str, key: str, data: bytes, meta: dict | None = None) -> str:
        """Store a small blob under (kind, key) atomically; returns its SHA-256."""
        return self.artifacts.put(kind, key, data, meta)

    def get_artifact(self, kind: str, key: str) -> tuple[bytes, dict] | None:
        """(data, meta) of the newest blob under (kind, key), or None."""
        return self.artifacts.get(kind, key)

    def find_artifact(self, kind: str, prefix: str) -> str | None:
        """The most recently written key under `kind` that starts with `prefix`, or None."""
        return self.artifacts.newest_key(kind, prefix)
