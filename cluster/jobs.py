"""Edit jobs: what a job carries, its states, and its state in Redis.

A job is a list of raw edit records bound for one memory, plus the model, layer, router and
batching it is computed with. Its state lives in Redis (docs/adr/0004-job-queue.md):

- `kvedit:job:<id>`          hash: the job's fields and counters (each value JSON-encoded)
- `kvedit:job:<id>:records`  string: the raw records (one JSON list)
- `kvedit:job:<id>:status`   hash: record index -> JSON {status, error, edit_id, loss, steps, efficacy}
- `kvedit:jobs:index`        sorted set: job ids by submission time (for `jobs ls`)
- `kvedit:jobs`              stream: one entry per submitted job (see `cluster.queue`)

Every edit of a job gets the id `job_edit_id(job_id, record_index, record)`, so computing a job twice
(a resubmission, a retried batch, a restarted coordinator) can never add an edit twice: the
store skips rows whose edit_id it already holds. The record's content is part of the id: a job id
reused (after `JobStore.delete`) for other records gets new edits, not "already committed" ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import redis

log = logging.getLogger(__name__)

STREAM = "kvedit:jobs"
GROUP = "kvedit-coordinators"
INDEX_KEY = "kvedit:jobs:index"
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_BATCH_SIZE = 16
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def job_key(job_id: str) -> str:
    return f"kvedit:job:{job_id}"


def records_key(job_id: str) -> str:
    return f"kvedit:job:{job_id}:records"


def status_key(job_id: str) -> str:
    return f"kvedit:job:{job_id}:status"


class JobState:
    """Job states: queued -> running -> succeeded | partially_failed | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIALLY_FAILED = "partially_failed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ALL = (QUEUED, RUNNING, SUCCEEDED, PARTIALLY_FAILED, FAILED, CANCELLED)
    TERMINAL = frozenset({SUCCEEDED, PARTIALLY_FAILED, FAILED, CANCELLED})


class RecordState:
    """Per-record states. `invalid` and `failed` records carry an error dict."""

    PENDING = "pending"
    RUNNING = "running"
    COMMITTED = "committed"
    INVALID = "invalid"
    FAILED = "failed"
    SKIPPED = "skipped"  # valid, but not committed because an all-or-nothing job failed
    CANCELLED = "cancelled"
    ALL = (PENDING, RUNNING, COMMITTED, INVALID, FAILED, SKIPPED, CANCELLED)


# ---------------------------------------------------------------------------------------- errors


class JobError(Exception):
    """Base class of job errors; `job_id` says which job, when one is involved."""

    def __init__(self, message: str, job_id: str | None = None):
        self.job_id = job_id
        super().__init__(message)

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": str(self), "job_id": self.job_id}


class JobNotFoundError(JobError, KeyError):
    """No job of that id in this Redis."""

    def __str__(self) -> str:
        return self.args[0]


class JobSpecError(JobError, ValueError):
    """A submission that cannot become a job (bad id, memory name, router, batch size, no records)."""


class JobConflictError(JobError):
    """The job id already names a job with different records or settings."""


class JobStateError(JobError):
    """An operation the job's state does not allow (e.g. cancelling a finished job)."""


class QueueUnavailableError(JobError):
    """Redis (the job queue and job state) cannot be reached."""


# ---------------------------------------------------------------------------------------- ids


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


def job_edit_id(job_id: str, index: int, record) -> str:
    """The edit_id of record `index` (the raw JSON `record`) of job `job_id`: deterministic, so retries never
    duplicate an edit, and another record at the same place of a reused job id gets another id."""
    h = hashlib.sha256(json.dumps(["kvedit-job-edit", job_id, int(index), record], sort_keys=True).encode())
    return h.hexdigest()[:20]


def legacy_job_edit_id(job_id: str, index: int) -> str:
    """The id jobs gave record `index` before 2026-12-08 (job and index only): rows committed then keep it, and
    readers that map rows back to job records (robust-key retrains, resumed jobs) accept it too."""
    return hashlib.sha256(json.dumps(["kvedit-job-edit", job_id, int(index)]).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------- spec


@dataclass
class JobSpec:
    """What a submitter asks for. `records` are raw dicts in any format `editing.records` reads.

    `edit_config` overrides the model's editing settings (`EditConfig`, e.g.
    `{"values": {"steps": 10}}`); `stats_tokens` asks for second-moment statistics over that
    many corpus tokens (built by the covariance stage; always built for the `whitened` router).
    With `all_or_nothing`, one bad record fails the job and nothing is committed.
    """

    memory: str
    records: list
    job_id: str = field(default_factory=new_job_id)
    model: str = DEFAULT_MODEL
    layer: int | None = None
    router: str = "cosine"
    threshold: float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    all_or_nothing: bool = False
    edit_config: dict = field(default_factory=dict)
    stats_tokens: int | None = None
    source: str | None = None

    def check(self) -> "JobSpec":
        """Raise `JobSpecError` naming the offending field; returns self."""
        from editing.routers import ROUTERS
        from store.errors import InvalidNameError
        from store.lancefs import check_name

        if not isinstance(self.job_id, str) or not JOB_ID_RE.match(self.job_id):
            raise JobSpecError(f"job id {self.job_id!r}: use 1-128 letters, digits, '.', '_', ':', '-'", None)
        where = f"job {self.job_id}"
        try:
            check_name(self.memory)
        except InvalidNameError as exc:
            raise JobSpecError(f"{where}: field 'memory': {exc}", self.job_id) from exc
        if not isinstance(self.model, str) or not self.model.strip():
            raise JobSpecError(f"{where}: field 'model': expected a model name or folder, got {self.model!r}",
                               self.job_id)
        if not isinstance(self.records, list) or not self.records:
            raise JobSpecError(f"{where}: field 'records': expected a non-empty list of edit records", self.job_id)
        if self.router not in ROUTERS:
            raise JobSpecError(f"{where}: field 'router': unknown router {self.router!r}; choose one of "
                               f"{', '.join(sorted(ROUTERS))}", self.job_id)
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                                           or not math.isfinite(self.threshold)):
            raise JobSpecError(f"{where}: field 'threshold': expected a finite number, got {self.threshold!r}", self.job_id)
        if self.threshold is not None:
            try:
                ROUTERS[self.router].check_threshold(self.threshold)
            except ValueError as exc:
                raise JobSpecError(f"{where}: field 'threshold': {exc}", self.job_id) from exc
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise JobSpecError(f"{where}: field 'batch_size': expected an integer >= 1, got {self.batch_size!r}", self.job_id)
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise JobSpecError(f"{where}: field 'layer': expected an integer >= 0, got {self.layer!r}", self.job_id)
        if self.stats_tokens is not None and (not isinstance(self.stats_tokens, int) or self.stats_tokens < 2):
            raise JobSpecError(f"{where}: field 'stats_tokens': expected an integer >= 2", self.job_id)
        if not isinstance(self.edit_config, dict):
            raise JobSpecError(f"{where}: field 'edit_config': expected an object", self.job_id)
        if "layer" in self.edit_config:  # the job's own field wins (see `editor_overrides`): refused, not ignored
            raise JobSpecError(f"{where}: field 'edit_config.layer': set the job's 'layer' field instead", self.job_id)
        try:
            from editing import EditConfig

            EditConfig.for_model(self.model, **self.editor_overrides())
        except (ValueError, TypeError) as exc:
            raise JobSpecError(f"{where}: field 'edit_config': {exc}", self.job_id) from exc
        try:
            json.dumps(self.records)
            json.dumps(self.edit_config)
        except (TypeError, ValueError) as exc:
            raise JobSpecError(f"{where}: records and edit_config must be JSON: {exc}", self.job_id) from exc
        return self

    def settings(self) -> dict:
        """Everything but the records."""
        d = asdict(self)
        d.pop("records")
        return d

    def content_hash(self) -> str:
        """Hash of records and settings: resubmitting the same job id with other content is a conflict."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]

    def editor_overrides(self) -> dict:
        """Settings the workers compute with: `edit_config` and the layer, as `EditConfig.for_model`
        overrides (None means "model default"). The router and threshold only bind the memory."""
        return {**self.edit_config, "layer": self.layer}


# ---------------------------------------------------------------------------------------- status


COUNTERS = ("n_records", "n_valid", "n_invalid", "n_committed", "n_failed", "n_cancelled", "n_evaluated",
            "batches_total", "batches_done", "attempts")


@dataclass
class JobStatus:
    """A job as stored: settings, state, counters and (with `records`) per-record statuses."""

    job_id: str
    state: str
    memory: str
    model: str
    router: str
    layer: int | None
    batch_size: int
    all_or_nothing: bool
    n_records: int = 0
    n_valid: int = 0
    n_invalid: int = 0
    n_committed: int = 0
    n_failed: int = 0  # invalid records included
    n_cancelled: int = 0
    n_evaluated: int = 0
    batches_total: int = 0
    batches_done: int = 0
    attempts: int = 0
    efficacy: float | None = None
    version: int | None = None
    error: str | None = None
    stage: str | None = None
    cancel_requested: bool = False
    owner: str | None = None
    stats_key: str | None = None
    robust_keys_version: int | None = None  # the version whose REP adapter this job retrained (`cluster.robust`)
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    records: list[dict] | None = None

    @property
    def terminal(self) -> bool:
        return self.state in JobState.TERMINAL

    @property
    def seconds(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.records is None:
            d.pop("records")
        d["seconds"] = None if self.seconds is None else round(self.seconds, 3)
        return d

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> "JobStatus":
        data = {k: json.loads(v) for k, v in raw.items()}
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def _enc(fields: dict) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in fields.items()}


# Atomic submission: create the job and enqueue it, or report the existing job's content hash.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'content_hash') or ''}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'job_id', ARGV[1])
return {1, ''}
"""

# Cancel: a queued job is cancelled at once; a running one is flagged for its coordinator.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'cancel_requested', 'true', 'finished_at', ARGV[3])
  return 'cancelled'
end
if state == ARGV[4] then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
  return 'requested'
end
return state
"""


# Start (or resume) a job unless it reached a final state meanwhile (e.g. cancelled while queued).
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state ~= ARGV[1] and state ~= ARGV[2] then return state end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'owner', ARGV[3], 'attempts', ARGV[4], 'stage', ARGV[5])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[6])
return 'ok'
"""


# Give back the attempt of a start that did not end by a crash (a graceful handover), if still ours and running.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= ARGV[2] then
  return 0
end
local n = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') or 0
if n > 0 then redis.call('HSET', KEYS[1], 'attempts', tostring(n - 1)) end
return 1
"""


class JobStore:
    """Job state in Redis (see module docstring). Every method raises `QueueUnavailableError` when Redis is down."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._submit = client.register_script(_SUBMIT)
        self._cancel = client.register_script(_CANCEL)
        self._start = client.register_script(_START)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def connect(cls, redis_url: str | None = None, store_root: str | None = None) -> "JobStore":
        """Connect to `redis_url` (or `$KVEDIT_REDIS_URL`, or the store's embedded server)."""
        from store import StoreUnavailableError, connect_redis
        from store.lancefs import normalize_root

        try:
            root, _ = normalize_root(store_root)
            return cls(connect_redis(redis_url, root))
        except (StoreUnavailableError, redis.RedisError, OSError) as exc:
            raise QueueUnavailableError(
                f"job queue: Redis is unreachable ({exc}); start it, or pass --redis-url / set KVEDIT_REDIS_URL "
                "(without either, the store's embedded server is used)") from exc

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise QueueUnavailableError(f"job queue: Redis error: {exc}") from exc

    # ------------------------------------------------------------------ submit / read

    def submit(self, spec: JobSpec) -> tuple[JobStatus, bool]:
        """Create and enqueue a job; returns (status, created).

        Submitting an existing job id with the same content returns the existing job
        (created=False) and enqueues nothing; with different content raises `JobConflictError`.
        """
        spec.check()
        now = time.time()
        chash = spec.content_hash()
        fields = {
            **spec.settings(), "state": JobState.QUEUED, "content_hash": chash, "created_at": now,
            "n_records": len(spec.records), **{c: 0 for c in COUNTERS if c != "n_records"},
            "cancel_requested": False,
        }
        argv = [spec.job_id, json.dumps(spec.records), now]
        for k, v in _enc(fields).items():
            argv += [k, v]
        created, existing = self._call(
            self._submit, keys=[job_key(spec.job_id), records_key(spec.job_id), INDEX_KEY, STREAM], args=argv)
        if not created:
            if existing and json.loads(existing) != chash:
                raise JobConflictError(
                    f"job {spec.job_id}: already submitted with different records or settings; "
                    "use a new job id (or omit it to get one)", spec.job_id)
            log.info("job %s: already submitted; nothing enqueued", spec.job_id)
        else:
            log.info("job %s: queued %d records for memory %r", spec.job_id, len(spec.records), spec.memory)
        return self.get(spec.job_id), bool(created)

    def exists(self, job_id: str) -> bool:
        return bool(self._call(self.client.exists, job_key(job_id)))

    def get(self, job_id: str, records: bool = False) -> JobStatus:
        raw = self._call(self.client.hgetall, job_key(job_id))
        if not raw:
            raise JobNotFoundError(f"job {job_id}: no such job", job_id)
        st = JobStatus.from_hash(raw)
        if records:
            statuses = self.record_statuses(job_id)
            st.records = [{"index": i, **statuses.get(i, {"status": RecordState.PENDING})} for i in range(st.n_records)]
        return st

    def spec(self, job_id: str) -> JobSpec:
        """The job's settings and raw records."""
        raw = self._call(self.client.hgetall, job_key(job_id))
        if not raw:
            raise JobNotFoundError(f"job {job_id}: no such job", job_id)
        data = {k: json.loads(v) for k, v in raw.items()}
        recs = self._call(self.client.get, records_key(job_id))
        names = set(JobSpec.__dataclass_fields__) - {"records"}
        return JobSpec(records=json.loads(recs) if recs else [], **{k: v for k, v in data.items() if k in names})

    def list(self, limit: int = 50, state: str | None = None) -> list[JobStatus]:
        """Newest first."""
        ids = self._call(self.client.zrevrange, INDEX_KEY, 0, -1 if state else max(limit, 1) - 1)
        out = []
        for job_id in ids:
            try:
                st = self.get(job_id)
            except JobNotFoundError:
                continue
            if state is None or st.state == state:
                out.append(st)
            if len(out) >= limit:
                break
        return out

    def counts_by_state(self) -> dict[str, int]:
        """Number of jobs in each state (every job of the index)."""
        ids = self._call(self.client.zrange, INDEX_KEY, 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(job_key(job_id), "state")
        states = self._call(pipe.execute) if ids else []
        counts = {s: 0 for s in JobState.ALL}
        for s in states:
            if s is not None:
                counts[json.loads(s)] = counts.get(json.loads(s), 0) + 1
        return counts

    # ------------------------------------------------------------------ updates (coordinator side)

    def update(self, job_id: str, **fields: Any) -> None:
        self._call(self.client.hset, job_key(job_id), mapping=_enc(fields))

    def record_statuses(self, job_id: str) -> dict[int, dict]:
        raw = self._call(self.client.hgetall, status_key(job_id))
        return {int(k): json.loads(v) for k, v in raw.items()}

    def set_records(self, job_id: str, statuses: dict[int, dict], **fields: Any) -> None:
        """Write record statuses and job fields in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        if statuses:
            pipe.hset(status_key(job_id), mapping={str(i): json.dumps(s) for i, s in statuses.items()})
        if fields:
            pipe.hset(job_key(job_id), mapping=_enc(fields))
        if statuses or fields:
            self._call(pipe.execute)

    def start(self, job_id: str, owner: str, attempts: int, stage: str = "validate") -> bool:
        """Mark a queued (or resumed running) job as running under `owner`; False if it already finished."""
        res = self._call(self._start, keys=[job_key(job_id)], args=[
            json.dumps(JobState.QUEUED), json.dumps(JobState.RUNNING), json.dumps(owner), json.dumps(attempts),
            json.dumps(stage), json.dumps(time.time())])
        if res == "missing":
            raise JobNotFoundError(f"job {job_id}: no such job", job_id)
        return res == "ok"

    def release_attempt(self, job_id: str, owner: str) -> bool:
        """Undo `start`'s attempt count of a running job `owner` hands over (a stop, not a crash); False if the
        job is no longer `owner`'s or running."""
        return bool(self._call(self._release, keys=[job_key(job_id)],
                               args=[json.dumps(owner), json.dumps(JobState.RUNNING)]))

    def cancel_requested(self, job_id: str) -> bool:
        raw = self._call(self.client.hget, job_key(job_id), "cancel_requested")
        return bool(raw and json.loads(raw))

    def request_cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued job now, or ask the coordinator of a running job to stop after its current batch.

        Raises `JobNotFoundError`, or `JobStateError` when the job already finished.
        """
        res = self._call(self._cancel, keys=[job_key(job_id)], args=[
            json.dumps(JobState.QUEUED), json.dumps(JobState.CANCELLED), json.dumps(time.time()),
            json.dumps(JobState.RUNNING)])
        if res == "missing":
            raise JobNotFoundError(f"job {job_id}: no such job", job_id)
        if res not in ("cancelled", "requested"):
            raise JobStateError(f"job {job_id}: already {json.loads(res)}; nothing to cancel", job_id)
        log.info("job %s: cancel %s", job_id, res)
        return self.get(job_id)

    def delete(self, job_ids: Iterable[str]) -> None:
        """Forget jobs (state, records, index entry); their committed edits stay in the store."""
        pipe = self.client.pipeline(transaction=True)
        for job_id in job_ids:
            pipe.delete(job_key(job_id), records_key(job_id), status_key(job_id))
            pipe.zrem(INDEX_KEY, job_id)
        self._call(pipe.execute)
