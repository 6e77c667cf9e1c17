"""The coordinator: takes jobs off the queue and drives the worker actor pools through them.

One job, start to end (docs/adr/0004-job-queue.md):
1. validate every record (parse + tokenizer checks + conflicts); bad ones get per-record errors;
   with all-or-nothing any bad record fails the job before anything is computed;
2. warm the `ValueOptimiser` pool on the job's model (its memory spec comes back) and create the
   target memory if needed (a spec or router mismatch fails the job, nothing written);
3. statistics when the router needs them (or the job asks): `CovarianceBuilder` actors compute
   shards that are merged and cached in the store, so they are built once;
4. batches run on the optimiser pool; each result is committed to the store on its own
   (all-or-nothing jobs: once, at the end) with `skip_existing`, so a retried batch or a
   restarted coordinator never adds an edit twice; a batch whose actor died is rerun on
   another or a replacement actor;
5. after each commit an `Evaluator` checks the committed edits against that memory version.

The coordinator holds a lease on the job's stream entry while it works; a coordinator that is
SIGKILLed leaves the entry pending, and the next one takes it over once the lease expired and
finishes the job from the record statuses in Redis.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

from cluster.jobs import (
    JobNotFoundError, JobSpec, JobState, JobStatus, JobStore, QueueUnavailableError, RecordState, job_edit_id,
    legacy_job_edit_id,
)
from cluster.queue import Delivery, JobQueue, LeaseKeeper
from cluster.runtime import ActorPool, Outcome, connect_ray, default_consumer, local_cpu_slots
from store.redisconn import DELETE_IF_HELD
from workers.common import ipc_to_table

log = logging.getLogger(__name__)


@dataclass
class CoordinatorConfig:
    """How a coordinator runs.

    Attributes:
        store, redis_url: the memory store and the Redis holding the queue (embedded server of
            the store when `redis_url` and `$KVEDIT_REDIS_URL` are unset).
        ray_address: join this Ray cluster; None starts a local Ray.
        optimisers, evaluators, covariance_builders: pool sizes (0 evaluators: no evaluation).
        consumer: this coordinator's name in the consumer group (default host-pid).
        lease_seconds: a job whose coordinator has not renewed its lease for this long is taken over.
        max_batch_attempts: runs of a batch whose actor keeps dying before the batch fails.
        max_job_attempts: starts of a job (coordinator crashes) before the job fails.
        actor_timeout: an actor call running longer is a hung actor: it is killed and replaced, and
            its batch or shard retried (a batch of the default model takes seconds to minutes).
        http_port: serve the HTTP API on this port (None: no API).
        queue_outage_seconds: ride out a Redis outage this long (retrying with backoff; the job
            in hand is left to this or the next coordinator) before `run` gives up.
        retrain_backoff_seconds: after a memory's REP adapter retrain failed, retrains later jobs find
            due wait this long, doubling with each further failure (`cluster.robust.RetrainBackoff`).
    """

    store: str | None = None
    redis_url: str | None = None
    ray_address: str | None = None
    optimisers: int = 1
    evaluators: int = 1
    covariance_builders: int = 1
    consumer: str | None = None
    lease_seconds: float = 60.0
    poll_seconds: float = 1.0
    max_batch_attempts: int = 3
    max_job_attempts: int = 3
    actor_timeout: float = 1800.0
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    log_to_driver: bool = True
    stats_shard_tokens: int = 4096
    queue_outage_seconds: float = 120.0
    retrain_backoff_seconds: float = 300.0


@dataclass
class JobEvent:
    """Progress of a job, for progress bars: `stage` is validate | load | statistics | optimise | evaluate | done."""

    job_id: str
    stage: str
    done: int = 0
    total: int = 0
    state: str | None = None
    message: str = ""


class _Handover(Exception):
    """The coordinator is stopping: leave the job (unacknowledged) for the next coordinator."""


class _Abandoned(Exception):
    """A best-effort step (the REP retrain) given up because the coordinator is stopping."""


class _LeaseLost(Exception):
    """Another coordinator took the job over (our lease expired)."""


class StatisticsError(RuntimeError):
    """The covariance stage failed (a shard could not be computed)."""


def _record_error(exc: Exception, index: int, case_id=None) -> dict:
    """Per-record error dict: index, case_id, field, reason and the full message."""
    from editing.records import EditRecordError

    if isinstance(exc, EditRecordError):
        return {**exc.to_dict(), "message": str(exc)}
    return {"index": index, "case_id": case_id, "field": "<batch>", "reason": f"{type(exc).__name__}: {exc}",
            "message": f"record {index}: {type(exc).__name__}: {exc}"}


class Coordinator:
    """Consumes the job stream and runs jobs on Ray actor pools. Use as a context manager, or `start()`/`close()`."""

    def __init__(self, config: CoordinatorConfig | None = None, on_event: Callable[[JobEvent], None] | None = None,
                 metrics=None):
        from cluster.api import JobMetrics

        self.config = config or CoordinatorConfig()
        self.consumer = self.config.consumer or default_consumer()
        self.on_event = on_event or (lambda e: None)
        self.metrics = metrics or JobMetrics()
        self.jobs: JobStore | None = None
        self.queue: JobQueue | None = None
        self.store = None
        self.values: ActorPool | None = None
        self.evaluators: ActorPool | None = None
        self.api = None
        self.stop_event = threading.Event()
        self.interrupted: set[str] = set()  # jobs an outage interrupted in this process (`_JobRun.execute`)
        from cluster.robust import RetrainBackoff

        self.retrain_backoff = RetrainBackoff(self.config.retrain_backoff_seconds)
        self._started = False
        self._owns_ray = False
        self._tokenizers: dict = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "Coordinator":
        """Connect Redis, then Ray, then (optionally) serve the API. Raises before touching any job."""
        if self._started:
            return self
        from store import MemoryStore

        cfg = self.config
        self.jobs = JobStore.connect(cfg.redis_url, cfg.store)
        try:
            self.queue = JobQueue(self.jobs.client)
            self.queue.ensure_group()
            self.store = MemoryStore(cfg.store, redis_url=cfg.redis_url)
            self._owns_ray = connect_ray(cfg.ray_address, local_cpu_slots(cfg.optimisers, cfg.evaluators,
                                                                          cfg.covariance_builders),
                                         log_to_driver=cfg.log_to_driver)
            self.metrics.bind(self.jobs, self.queue)
            if cfg.http_port is not None:
                from cluster.api import ApiServer, create_app

                self.api = ApiServer(create_app(self.jobs, self.queue, self.metrics), cfg.http_host, cfg.http_port).start()
        except BaseException:  # e.g. Ray unreachable or the API port taken: release what was opened
            self.close()
            raise
        self._started = True
        log.info("coordinator %s: store %s, consuming %s", self.consumer, self.store.root, self.queue.stream)
        return self

    def close(self) -> None:
        """Stop the API, kill the actors, and shut Ray down if this coordinator started it."""
        if self.api is not None:
            self.api.stop()
            self.api = None
        for pool in (self.values, self.evaluators):
            if pool is not None:
                pool.shutdown()
        self.values = self.evaluators = None
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.jobs is not None:
            self.jobs.client.close()
            self.jobs = None
        self._started = False

    def __enter__(self) -> "Coordinator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _restarted(self, pool: str) -> None:
        self.metrics.actor_restarts.labels(pool=pool).inc()

    def value_pool(self) -> ActorPool:
        from workers.values import ValueOptimiser

        if self.values is None:
            self.values = ActorPool(ValueOptimiser, self.config.optimisers, "values", self._restarted).start()
        return self.values

    def evaluator_pool(self) -> ActorPool | None:
        from workers.evaluator import Evaluator

        if self.evaluators is None and self.config.evaluators > 0:
            self.evaluators = ActorPool(Evaluator, self.config.evaluators, "evaluator", self._restarted).start()
        return self.evaluators

    def tokenizer(self, model: str):
        """The model's tokenizer (for validation and corpus chunks; the coordinator never loads weights)."""
        if model not in self._tokenizers:
            from transformers import AutoTokenizer

            from editing.models import resolve_model

            tok = AutoTokenizer.from_pretrained(resolve_model(model))
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            tok.padding_side = "right"
            self._tokenizers[model] = tok
        return self._tokenizers[model]

    # ------------------------------------------------------------------ the loop

    def run(self, *, until: Callable[[], bool] | None = None, idle_exit: bool = False, max_jobs: int | None = None) -> int:
        """Process jobs until `stop_event` is set, `until()` is true, `max_jobs` were processed, or
        (with `idle_exit`) no job is waiting. Returns the number of jobs brought to a final state here."""
        self.start()
        cfg = self.config
        backlog: list[Delivery] = self.queue.own_pending(self.consumer)
        reclaim_every = max(0.5, cfg.lease_seconds / 3)
        last_reclaim = 0.0
        processed = 0
        outage_since: float | None = None
        while not self.stop_event.is_set():
            if until is not None and until():
                break
            if max_jobs is not None and processed >= max_jobs:
                break
            try:
                if outage_since is not None:  # back after an outage: our own unfinished entries first
                    backlog = self.queue.own_pending(self.consumer)
                    log.info("job queue reachable again after %.1fs", time.monotonic() - outage_since)
                    outage_since = None
                if not backlog and time.monotonic() - last_reclaim >= reclaim_every:
                    backlog = self.queue.reclaim(self.consumer, cfg.lease_seconds)
                    last_reclaim = time.monotonic()
                delivery = backlog.pop(0) if backlog else self.queue.read(self.consumer, int(cfg.poll_seconds * 1000))
                if delivery is None:
                    if idle_exit:
                        break
                    continue
                if self.process(delivery) is not None:
                    processed += 1
            except QueueUnavailableError as exc:
                now = time.monotonic()
                outage_since = now if outage_since is None else outage_since
                if now - outage_since > cfg.queue_outage_seconds:
                    raise
                log.warning("job queue unavailable (%s); retrying", exc)
                backlog = []
                if self.stop_event.wait(min(5.0, 0.5 + (now - outage_since) / 4)):
                    break
        return processed

    def process(self, delivery: Delivery) -> JobStatus | None:
        """Run one delivered job to a final state and acknowledge it (None if handed over or taken over)."""
        if delivery.job_id is None:
            self.queue.ack(delivery.entry_id)
            return None
        # Entries wait in the backlog without a lease renewal: another coordinator may have reclaimed one since.
        if not self.queue.heartbeat(self.consumer, delivery.entry_id):
            log.info("job %s: taken over by another coordinator while it waited here; skipped", delivery.job_id)
            return None
        try:
            spec = self.jobs.spec(delivery.job_id)
        except JobNotFoundError:
            log.warning("stream entry %s names unknown job %s; dropping it", delivery.entry_id, delivery.job_id)
            self.queue.ack(delivery.entry_id)
            return None
        run = _JobRun(self, delivery, spec)
        keeper = LeaseKeeper(self.queue, self.consumer, delivery.entry_id, max(0.2, self.config.lease_seconds / 4))
        try:
            with keeper:
                run.keeper = keeper
                status = run.execute()
        except _Handover:
            log.warning("job %s: coordinator stopping; left for the next coordinator", spec.job_id)
            try:  # a stop is not a crash: it does not use up one of the job's starts
                self.jobs.release_attempt(spec.job_id, self.consumer)
            except QueueUnavailableError as exc:
                log.warning("job %s: could not give back its attempt (%s)", spec.job_id, exc)
            return None
        except _LeaseLost:
            log.warning("job %s: taken over by another coordinator; stopped working on it", spec.job_id)
            return None
        except QueueUnavailableError:
            self.interrupted.add(spec.job_id)  # resumed here after the outage without counting a start
            raise
        except Exception as exc:  # noqa: BLE001 - a job must end, even on a bug; the traceback is logged
            from store import StoreUnavailableError

            if isinstance(exc, StoreUnavailableError):
                self.interrupted.add(spec.job_id)
                raise QueueUnavailableError(f"job {spec.job_id}: {exc}; left for the next coordinator", spec.job_id) from exc
            log.exception("job %s: failed", spec.job_id)
            status = run.finish(JobState.FAILED, error=f"job {spec.job_id}: {type(exc).__name__}: {exc}")
        if not self.queue.ack_owned(self.consumer, delivery.entry_id):
            log.warning("job %s: finished after another coordinator took it over; its entry is theirs", spec.job_id)
        return status

    # ------------------------------------------------------------------ statistics

    def ensure_statistics(self, model: str, layer: int, fingerprint: str, max_tokens: int, *, job_id: str | None = None,
                          shards: int | None = None, use_cache: bool = True, pool: ActorPool | None = None,
                          on_tick: Callable[[], None] | None = None) -> tuple[str, dict]:
        """Second-moment statistics of `model` at `layer` over the first `max_tokens` tokens of the
        statistics corpus (the chunks `Editor.stats_chunks` uses), cached in the store as artifact
        ("stats", "<fingerprint>-L<layer>-<corpus_hash>"). Returns (key, meta).

        The corpus is cut into `shards` pieces (default: about `stats_shard_tokens` tokens each),
        computed on a `CovarianceBuilder` pool (`pool`, or one started for the call and stopped
        after it) and merged in shard order.
        """
        from editing.stats import corpus_chunks, corpus_half, corpus_hash, default_corpus_path
        from store.artifacts import stats_key

        jid = job_id or "-"
        chunks = corpus_chunks(self.tokenizer(model), corpus_half(default_corpus_path().read_text(), "first"),
                               max_tokens=max_tokens)
        key = stats_key(fingerprint, layer, corpus_hash(chunks))
        claim = None
        if use_cache:
            hit, claim = self._cached_or_claim(key, on_tick)
            if hit is not None:
                self.on_event(JobEvent(jid, "statistics", 1, 1, message="cached"))
                log.info("statistics %s: cached", key)
                return key, {**hit[1], "cached": True}
        try:
            return key, self._build_statistics(model, layer, fingerprint, key, chunks, jid, shards, pool,
                                               claim.renewing(on_tick) if claim else on_tick)
        finally:
            if claim:
                claim.release()

    def _cached_or_claim(self, key: str, on_tick: Callable[[], None] | None) -> tuple[tuple | None, "_Claim | None"]:
        """(the cached statistics, None) once they exist, else (None, the build claim): a coordinator that finds
        another one building the same statistics waits for them instead of building them twice (and writing a
        second blob under a name whitened memories already use). Without Redis it builds unclaimed."""
        import redis

        claim = _Claim(self.store.redis, f"kvedit:stats-build:{key}", f"{self.consumer}:{time.time_ns()}")
        waited = False
        while True:
            hit = self.store.get_artifact("stats", key)
            if hit is not None:
                return hit, None
            try:
                if claim.take():
                    hit = self.store.get_artifact("stats", key)  # written (and the claim released) since the read
                    if hit is None:
                        return None, claim
                    claim.release()
                    return hit, None
            except redis.RedisError as exc:
                log.warning("statistics %s: cannot claim the build (%s); building unclaimed", key, exc)
                return None, None
            if not waited:
                log.info("statistics %s: another coordinator is building them; waiting", key)
                waited = True
            if on_tick:
                on_tick()
            time.sleep(self.config.poll_seconds)

    def _build_statistics(self, model, layer, fingerprint, key, chunks, jid, shards, pool, on_tick) -> dict:
        """Compute, merge and store the statistics `key` (see `ensure_statistics`); returns their meta."""
        from editing.stats import SecondMoment
        from workers.covariance import CovarianceBuilder
        per_shard = max(1, self.config.stats_shard_tokens // 256)
        n = shards or max(self.config.covariance_builders, math.ceil(len(chunks) / per_shard))
        size = math.ceil(len(chunks) / n)
        pieces = [(i, chunks[i * size:(i + 1) * size]) for i in range(n) if chunks[i * size:(i + 1) * size]]
        parts: dict[int, SecondMoment] = {}
        t0 = time.perf_counter()
        self.on_event(JobEvent(jid, "statistics", 0, len(pieces)))
        own_pool = pool is None
        pool = pool or ActorPool(CovarianceBuilder, self.config.covariance_builders, "covariance", self._restarted)
        try:
            outcomes = pool.run(pieces, lambda actor, piece: actor.partial.remote(model, layer, piece[1]),
                                max_attempts=self.config.max_batch_attempts, poll=self.config.poll_seconds,
                                on_tick=on_tick, item_timeout=self.config.actor_timeout)
            for out in outcomes:
                if out.error is not None:
                    raise StatisticsError(f"statistics {key}: shard {out.item[0]} failed: {out.error}") from out.error
                parts[out.item[0]] = SecondMoment.from_bytes(out.value["stats"])
                self.on_event(JobEvent(jid, "statistics", len(parts), len(pieces)))
        finally:
            if own_pool:
                pool.shutdown()
        merged = parts[min(parts)]
        for i in sorted(parts)[1:]:
            merged = merged.merge(parts[i])
        merged.meta["corpus_hash"] = key.rsplit("-", 1)[1]
        meta = {"model_fingerprint": fingerprint, "layer": layer, "corpus_hash": merged.meta["corpus_hash"],
                "tokens": merged.count, "shards": len(pieces), "seconds": round(time.perf_counter() - t0, 3)}
        self.store.put_artifact("stats", key, merged.to_bytes(), meta)
        log.info("statistics %s: %d tokens in %d shards, %.1fs", key, merged.count, len(pieces), meta["seconds"])
        return {**meta, "cached": False}


# Renew a claim only while it is still ours (compare and act in one step; release: `DELETE_IF_HELD`).
_CLAIM_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


class _Claim:
    """A Redis key held while one coordinator builds something others would build too (expires if it dies)."""

    TTL_S = 120.0

    def __init__(self, client, key: str, token: str):
        self.client, self.key, self.token = client, key, token

    def take(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=int(self.TTL_S * 1000)))

    def renewing(self, on_tick: Callable[[], None] | None) -> Callable[[], None]:
        """`on_tick` that also keeps the claim alive while the build runs."""
        def tick() -> None:
            try:
                self.client.eval(_CLAIM_RENEW, 1, self.key, self.token, int(self.TTL_S * 1000))
            except Exception as exc:  # noqa: BLE001 - the build goes on; at worst another one starts
                log.debug("claim %s not renewed: %s", self.key, exc)
            if on_tick:
                on_tick()
        return tick

    def release(self) -> None:
        try:
            self.client.eval(DELETE_IF_HELD, 1, self.key, self.token)
        except Exception as exc:  # noqa: BLE001 - it expires
            log.debug("claim %s not released: %s", self.key, exc)


@dataclass
class _Batch:
    number: int
    indices: list[int]


@dataclass
class _Pending:
    ref: object
    slot: object
    payload: dict
    indices: list[int]
    tries: int = 1
    generation: int = 0  # the slot's actor generation the call went to


@dataclass
class _JobRun:
    """One attempt at one job, on one coordinator."""

    coord: Coordinator
    delivery: Delivery
    spec: JobSpec
    statuses: dict[int, dict] = field(default_factory=dict)
    requests: dict = field(default_factory=dict)
    cancelled: bool = False
    version: int | None = None
    stats_key: str | None = None
    layer: int | None = None
    evals: list[_Pending] = field(default_factory=list)
    first_attempt: bool = True
    keeper: "LeaseKeeper | None" = None

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    # ------------------------------------------------------------------ bookkeeping

    def event(self, stage: str, done: int = 0, total: int = 0, state: str | None = None, message: str = "") -> None:
        self.coord.on_event(JobEvent(self.job_id, stage, done, total, state, message))

    def beat(self) -> None:
        """Stop (`_LeaseLost`) if another coordinator took the job over; the `LeaseKeeper` renews the lease."""
        if self.keeper is not None and self.keeper.lost.is_set():
            raise _LeaseLost()

    def tick(self) -> None:
        """Renew the lease, notice cancellation, and record finished evaluations."""
        self.beat()
        if not self.cancelled and self.coord.jobs.cancel_requested(self.job_id):
            log.info("job %s: cancel requested; stopping after the current batch", self.job_id)
            self.cancelled = True
        self.collect_evaluations(block=False)

    def count(self, state: str) -> int:
        return sum(1 for s in self.statuses.values() if s.get("status") == state)

    def counters(self) -> dict:
        flags = [s["efficacy"] for s in self.statuses.values() if s.get("efficacy") is not None]
        return {
            "n_valid": len(self.statuses) - self.count(RecordState.INVALID),
            "n_invalid": self.count(RecordState.INVALID),
            "n_committed": self.count(RecordState.COMMITTED),
            "n_failed": self.count(RecordState.FAILED) + self.count(RecordState.INVALID),
            "n_cancelled": self.count(RecordState.CANCELLED),
            "n_evaluated": len(flags),
            "efficacy": (sum(flags) / len(flags)) if flags else None,
        }

    def save(self, updates: dict[int, dict], **fields) -> None:
        self.statuses.update(updates)
        self.coord.jobs.set_records(self.job_id, updates, **self.counters(), **fields)

    def finish(self, state: str, error: str | None = None) -> JobStatus:
        """Write the final state (records never reached become cancelled/skipped as fits)."""
        fill = RecordState.CANCELLED if state == JobState.CANCELLED else RecordState.SKIPPED
        n = self.coord.jobs.get(self.job_id).n_records
        updates = {i: {**self.statuses.get(i, {}), "status": fill}
                   for i in range(n) if self.statuses.get(i, {}).get("status") in (None, RecordState.PENDING, RecordState.RUNNING)}
        self.save(updates, state=state, error=error, finished_at=time.time(), stage="done", version=self.version)
        status = self.coord.jobs.get(self.job_id)
        log.info("job %s: %s (%d committed, %d failed, %d cancelled)%s", self.job_id, state, status.n_committed,
                 status.n_failed, status.n_cancelled, f": {error}" if error else "")
        self.event("done", status.n_committed, status.n_records, state=state, message=error or "")
        return status

    # ------------------------------------------------------------------ stages

    def reconcile(self) -> None:
        """Mark records whose edits are live in the memory committed, whatever their saved status, before any
        decision is taken on them (a cancel, a last attempt, all-or-nothing): a coordinator killed after
        `store.commit` and before `save` left them pending, so they would be reported cancelled or skipped."""
        store = self.coord.store
        if not store.exists(self.spec.memory):
            return
        todo = {eid: i for i in range(len(self.spec.records))
                if self.statuses.get(i, {}).get("status") != RecordState.COMMITTED
                for eid in (self.edit_id(i), legacy_job_edit_id(self.job_id, i))}  # rows committed before 2026-12-08
        live = store.live_ids(self.spec.memory, list(todo))
        if not live:
            return
        log.warning("job %s: %d record(s) were committed by an earlier run without their status; marked committed",
                    self.job_id, len(live))
        self.version = store.current_version(self.spec.memory)
        self.save({todo[e]: {**self.statuses.get(todo[e], {}), "status": RecordState.COMMITTED, "edit_id": e}
                   for e in live}, version=self.version)

    def edit_id(self, index: int) -> str:
        return job_edit_id(self.job_id, index, self.spec.records[index])

    def execute(self) -> JobStatus:
        jobs, cfg = self.coord.jobs, self.coord.config
        current = jobs.get(self.job_id)
        if current.terminal:
            log.info("job %s: already %s", self.job_id, current.state)
            return current
        self.statuses = jobs.record_statuses(self.job_id)
        self.version = current.version
        if current.started_at is not None:  # resumed: its last coordinator may have died between a commit and its save
            self.reconcile()
        # A start counts toward max_job_attempts unless this coordinator resumes the job after an outage of Redis
        # or the store interrupted it (the process lived on, so nothing crashed).
        resumed = self.job_id in self.coord.interrupted and current.owner == self.coord.consumer
        self.coord.interrupted.discard(self.job_id)
        attempts = current.attempts + (0 if resumed and current.attempts else 1)
        self.first_attempt = current.started_at is None  # never started before (attempts can be given back)
        if attempts > cfg.max_job_attempts:
            return self.finish(JobState.FAILED, error=f"job {self.job_id}: started {current.attempts} times without "
                               "finishing (its coordinator died each time); giving up")
        if current.cancel_requested:
            return self.finish(JobState.CANCELLED)
        if not jobs.start(self.job_id, self.coord.consumer, attempts):
            return jobs.get(self.job_id)  # finished (cancelled) between delivery and start
        self.event("validate", 0, current.n_records, state=JobState.RUNNING)

        invalid = self.validate()
        if invalid and self.spec.all_or_nothing:
            first = self.statuses[invalid[0]]["error"]["message"]
            return self.finish(JobState.FAILED, error=f"job {self.job_id}: {len(invalid)} of {current.n_records} records "
                               f"are invalid (first: {first}); all-or-nothing, so nothing was committed")
        if not self.requests:
            return self.finish(JobState.FAILED, error=f"job {self.job_id}: no valid record")

        self.tick()
        self.prepare()
        if self.cancelled:
            return self.finish(JobState.CANCELLED)
        self.optimise()
        if self.coord.stop_event.is_set() and not self.cancelled:
            raise _Handover()
        self.evaluate_leftovers()
        self.collect_evaluations(block=True)
        self.retrain_robust_keys()
        return self.finish(*self.outcome())

    def validate(self) -> list[int]:
        """Parse and check every record not yet committed; returns the indices of invalid ones."""
        from editing import EditConfig
        from editing.prompts import check_request
        from editing.records import EditRecordError, parse_record

        cfg = EditConfig.for_model(self.spec.model, **self.spec.editor_overrides())
        tok = self.coord.tokenizer(self.spec.model)
        invalid, updates = [], {}
        seen: dict[tuple[str, str], tuple[int, str]] = {}
        for i, raw in enumerate(self.spec.records):
            prior = self.statuses.get(i, {})
            try:
                req = parse_record(raw, i, self.spec.source)
                check_request(tok, req, i, cfg.max_target_tokens)
                key = (req.subject, req.prompt)
                if key in seen and seen[key][1] != req.target_new:
                    raise EditRecordError(i, "target_new", f"conflicts with record {seen[key][0]}: same subject and "
                                          f"prompt but target {req.target_new!r} != {seen[key][1]!r}", req.case_id,
                                          self.spec.source)
                seen.setdefault(key, (i, req.target_new))
            except EditRecordError as exc:
                invalid.append(i)
                updates[i] = {"status": RecordState.INVALID, "error": _record_error(exc, i)}
                continue
            self.requests[i] = req
            if prior.get("status") != RecordState.COMMITTED:
                updates[i] = {"status": RecordState.PENDING, "edit_id": self.edit_id(i)}
        self.save(updates)
        self.event("validate", len(self.spec.records), len(self.spec.records))
        if invalid:
            log.info("job %s: %d invalid record(s), first: %s", self.job_id, len(invalid),
                     updates[invalid[0]]["error"]["message"])
        if self.first_attempt:
            self.coord.metrics.edits_failed.inc(len(invalid))
        return invalid

    def prepare(self) -> None:
        """Warm the optimisers on the model, create the memory, and build statistics when needed."""
        from cluster.commit import ensure_memory
        from editing import EditConfig
        from editing.table import MemorySpec

        self.coord.jobs.update(self.job_id, stage="load")
        self.event("load")
        pool = self.coord.value_pool()
        specs = pool.broadcast("describe", self.spec.model, self.spec.editor_overrides(), on_tick=self.tick,
                               timeout=self.coord.config.actor_timeout)
        mspec = MemorySpec(**specs[0])
        self.layer = mspec.layer
        self.coord.jobs.update(self.job_id, layer=mspec.layer)
        evaluators = self.coord.evaluator_pool()
        for slot in evaluators.slots if evaluators is not None else []:
            slot.handle.warm.remote(self.spec.model, mspec.layer)  # loads the model while batches run
        have = ensure_memory(self.coord.store, self.spec.memory, mspec, self.spec.router, self.spec.threshold)
        if have.get("stats"):  # a whitened memory keeps the C0 it was first routed with (`cluster.commit.memory_stats`)
            self.stats_key = have["stats"]
            self.coord.jobs.update(self.job_id, stats_key=self.stats_key)
        elif self.spec.router == "whitened" or self.spec.stats_tokens:
            tokens = self.spec.stats_tokens or EditConfig.for_model(self.spec.model, **self.spec.editor_overrides()).stats_tokens
            self.coord.jobs.update(self.job_id, stage="statistics")
            self.stats_key, _ = self.coord.ensure_statistics(self.spec.model, mspec.layer, mspec.model_fingerprint, tokens,
                                                             job_id=self.job_id, on_tick=self.tick)
            self.coord.jobs.update(self.job_id, stats_key=self.stats_key)

    def batches(self) -> list[_Batch]:
        todo = [i for i in sorted(self.requests) if self.statuses.get(i, {}).get("status") != RecordState.COMMITTED]
        bs = self.spec.batch_size
        return [_Batch(n, todo[k:k + bs]) for n, k in enumerate(range(0, len(todo), bs))]

    def optimise(self) -> None:
        """Run the batches on the optimiser pool, committing each result (or all at the end, all-or-nothing)."""
        batches = self.batches()
        total = math.ceil(len(self.requests) / self.spec.batch_size)
        done_before = total - len(batches)
        self.coord.jobs.update(self.job_id, stage="optimise", batches_total=total, batches_done=done_before)
        self.event("optimise", self.count(RecordState.COMMITTED), len(self.spec.records))
        model, overrides = self.spec.model, self.spec.editor_overrides()
        staged: list[tuple[_Batch, dict, pa.Table]] = []
        failed = False

        def submit(actor, batch: _Batch):
            return actor.optimise.remote(model, overrides, [self.requests[i] for i in batch.indices],
                                         [self.edit_id(i) for i in batch.indices], self.job_id)

        def dispatched(batch: _Batch, slot) -> None:
            self.save({i: {**self.statuses[i], "status": RecordState.RUNNING} for i in batch.indices})

        outcomes = self.coord.value_pool().run(
            batches, submit, max_attempts=self.coord.config.max_batch_attempts, poll=self.coord.config.poll_seconds,
            should_stop=lambda: self.cancelled or self.coord.stop_event.is_set() or (failed and self.spec.all_or_nothing),
            on_tick=self.tick, on_dispatch=dispatched, item_timeout=self.coord.config.actor_timeout)
        for out in outcomes:
            self.coord.metrics.batch_seconds.observe(out.seconds)
            batch: _Batch = out.item
            if out.error is not None:
                failed = True
                self.fail_batch(batch, out)
                continue
            for loss in out.value["loss"]:
                self.coord.metrics.optimiser_loss.observe(loss)
            table = ipc_to_table(out.value["table"])
            if self.spec.all_or_nothing:
                staged.append((batch, out.value, table))
                self.save({i: {**self.statuses[i], "status": RecordState.PENDING} for i in batch.indices})
                continue
            self.commit([(batch, out.value)], table)
            done_before += 1
            self.coord.jobs.update(self.job_id, batches_done=done_before)
        self.tick()  # a cancel (or a lost lease) in the last poll window is seen before the all-or-nothing commit
        # Records of batches never started are left pending: finish() marks them cancelled or skipped.
        for i, s in self.statuses.items():
            if s.get("status") == RecordState.RUNNING:
                self.statuses[i] = {**s, "status": RecordState.PENDING}
        if self.spec.all_or_nothing and staged and not failed and not self.cancelled and not self.coord.stop_event.is_set():
            self.commit([(b, v) for b, v, _ in staged], pa.concat_tables([t for _, _, t in staged]))
            self.coord.jobs.update(self.job_id, batches_done=total)

    def fail_batch(self, batch: _Batch, out: Outcome) -> None:
        log.warning("job %s: batch %d failed after %d attempt(s): %s", self.job_id, batch.number, out.attempts, out.error)
        updates = {i: {**self.statuses[i], "status": RecordState.FAILED,
                       "error": _record_error(out.error, i, self.requests[i].case_id)} for i in batch.indices}
        self.coord.metrics.edits_failed.inc(len(batch.indices))
        self.save(updates)

    def commit(self, results: list[tuple[_Batch, dict]], table: pa.Table) -> None:
        """Commit computed rows to the memory (skipping edit_ids it already holds) and schedule their evaluation."""
        from cluster.commit import CALIBRATED_ATTEMPTS, calibrated_through
        from store import CommitConflictError, StoreError, StoreUnavailableError

        indices = [i for b, _ in results for i in b.indices]
        try:
            for attempt in range(1, CALIBRATED_ATTEMPTS + 1):
                router = self.coord.store.info(self.spec.memory).router  # what the threshold is calibrated through
                # retrains keep landing: the last attempt keeps the edits and the threshold the last retrain chose
                patch = self.router_patch(table, indices, calibrate=attempt < CALIBRATED_ATTEMPTS)
                expect = calibrated_through(router, patch)
                try:
                    v = self.coord.store.commit(self.spec.memory, add=table, job_id=self.job_id, skip_existing=True,
                                                message=f"job {self.job_id}: {len(indices)} edits",
                                                router_patch=patch, router_expect=expect)
                    break
                except CommitConflictError:  # a REP adapter retrain committed while calibrating: nothing written
                    if attempt == CALIBRATED_ATTEMPTS:
                        raise
                    log.info("job %s: the robust keys of %r changed while calibrating; calibrating again",
                             self.job_id, self.spec.memory)
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            for b, _ in results:
                self.fail_batch(b, Outcome(b, error=exc))
            return
        self.version = v.version
        updates = {}
        for b, value in results:
            for i, eid, loss, steps in zip(b.indices, value["edit_ids"], value["loss"], value["steps"]):
                updates[i] = {"status": RecordState.COMMITTED, "edit_id": eid, "loss": round(float(loss), 5),
                              "steps": int(steps), "version": v.version}
        self.save(updates, version=v.version)
        self.coord.metrics.edits_committed.inc(len(indices))
        log.info("job %s: committed %d edits -> memory %r v%d", self.job_id, len(indices), self.spec.memory, v.version)
        self.event("optimise", self.count(RecordState.COMMITTED), len(self.spec.records))
        self.submit_evaluation(indices, v.version)

    def router_patch(self, table: pa.Table, indices: list[int], calibrate: bool = True) -> dict | None:
        """The router-config patch of this commit: the recalibrated threshold (calibrated memories, unless not
        `calibrate`), and for a whitened memory that names no statistics yet the C0 artifact the job built
        (`"stats"`), which replicas load to route (named once, never re-pointed)."""
        patch = (self.calibrated_router(table, indices) if calibrate else None) or {}
        if self.spec.router == "whitened" and self.stats_key \
                and not self.coord.store.info(self.spec.memory).router.get("stats"):
            patch["stats"] = self.stats_key
        return patch or None

    def calibrated_router(self, table: pa.Table, indices: list[int]) -> dict | None:
        """The recalibrated router-config patch for this commit (None: the memory is not calibrated, or
        calibration failed, which is logged and leaves the threshold as it was)."""
        import ray

        from cluster.commit import is_calibrated
        from workers.common import table_to_ipc

        if not is_calibrated(self.coord.store.info(self.spec.memory).router):
            return None
        from cluster.runtime import actor_died

        requests = {self.edit_id(i): self.requests[i] for i in indices}
        args = (self.coord.store.root, self.coord.config.redis_url, self.spec.memory, self.spec.model,
                self.spec.editor_overrides(), table_to_ipc(table), requests, self.stats_key)
        pool = self.coord.value_pool()
        for attempt in (1, 2):  # an actor that died under the calibration is replaced and asked once more
            slot = pool.next_slot()
            generation = slot.generation
            try:
                return ray.get(slot.handle.calibrate.remote(*args), timeout=self.coord.config.actor_timeout)
            except Exception as exc:  # noqa: BLE001 - the edits are still committed, with the previous threshold
                if attempt == 1 and actor_died(exc):
                    if slot.generation == generation:  # not yet replaced for the batch it was running
                        pool.replace(slot)
                    log.warning("job %s: calibration actor died; retrying once", self.job_id)
                    continue
                log.warning("job %s: calibration of %r failed, threshold unchanged: %s", self.job_id,
                            self.spec.memory, exc)
                return None
        return None

    def retrain_robust_keys(self) -> None:
        """Retrain the memory's REP adapter on all its rows when this job grew the memory past the adapter's
        `retrain_growth` (`cluster.robust.retrain_due`), on a value actor; the new adapter is committed as the
        memory's next version. Best effort: a failure, a timeout (`actor_timeout`) or a stop of the coordinator
        leaves the adapter as it was (a retrain still running is killed with its actor, so it cannot commit
        later) and the job finishes with its edits committed; the next job finds the retrain still due."""
        from cluster.robust import records_of_rows, retrain_due
        from store import CommitConflictError
        from store.artifacts import read_rephrases

        if self.version is None or self.cancelled:
            return
        info = self.coord.store.info(self.spec.memory)
        try:
            due = retrain_due(info.router, info.n_rows)
        except (TypeError, ValueError) as exc:  # a hand-patched config; the job's edits stand
            log.warning("job %s: the robust-keys config of %r is not valid, no retrain: %s", self.job_id,
                        self.spec.memory, exc)
            return
        if not due:
            return
        metric, backoff = self.coord.metrics.robust_keys_retrains, self.coord.retrain_backoff
        wait = backoff.wait(self.spec.memory)
        if wait:  # the last retrain of this memory failed: a later job tries again
            log.info("job %s: robust keys of %r due, deferred %.0f s after a failed retrain", self.job_id,
                     self.spec.memory, wait)
            metric.labels("deferred").inc()
            return
        self.coord.jobs.update(self.job_id, stage="robust_keys")
        self.event("robust_keys", 0, info.n_rows)
        pool = self.coord.value_pool()

        def failed(why) -> None:
            delay = backoff.failed(self.spec.memory)
            log.warning("job %s: retraining the robust keys of %r failed, adapter unchanged (next try in %.0f s or "
                        "later): %s", self.job_id, self.spec.memory, delay, why)
            metric.labels("failed").inc()

        try:  # the records of rows whose rephrasings were never stored: this job's, and earlier jobs' that did not retrain
            _, table = self.coord.store.load(self.spec.memory)
            known = read_rephrases(self.coord.store, info.router, f"memory {self.spec.memory!r} v{info.version}")
            records = records_of_rows(self.coord.jobs, table, set(known))
        except Exception as exc:  # noqa: BLE001 - best effort, as below
            failed(exc)
            return
        dispatched: list = []

        def tick() -> None:  # leases as for batches; a stopping coordinator abandons the retrain
            self.beat()
            if self.coord.stop_event.is_set():
                raise _Abandoned("the coordinator is stopping")

        try:  # on the pool's tested timeout path: past actor_timeout the actor is replaced and this is a PoolError
            (out,) = pool.run([self.spec.memory], lambda actor, memory: actor.robust_keys.remote(
                self.coord.store.root, self.coord.config.redis_url, memory, self.spec.model,
                self.spec.editor_overrides(), records), max_attempts=1, poll=self.coord.config.poll_seconds,
                on_tick=tick, on_dispatch=lambda _, slot: dispatched.append(slot),
                item_timeout=self.coord.config.actor_timeout)
        except (_Abandoned, _LeaseLost) as why:  # not the retrain's fault: no backoff
            for slot in dispatched[-1:]:
                pool.replace(slot)  # its retrain dies with it: nothing can commit later
            metric.labels("abandoned").inc()
            if isinstance(why, _LeaseLost):  # another coordinator owns the job now
                raise
            log.warning("job %s: retraining the robust keys of %r abandoned, adapter unchanged: %s", self.job_id,
                        self.spec.memory, why)
            return
        if isinstance(out.error, CommitConflictError):  # another retrain or a removal of the adapter landed first
            log.info("job %s: robust keys of %r changed while retraining; the other change stands: %s",
                     self.job_id, self.spec.memory, out.error)
            metric.labels("conflict").inc()
            return
        if out.error is not None:  # the edits are committed; replicas keep routing through the old adapter
            failed(out.error)
            return
        out = out.value
        backoff.succeeded(self.spec.memory)
        metric.labels("ok").inc()
        self.coord.jobs.update(self.job_id, robust_keys_version=out["version"])
        log.info("job %s: robust keys of %r retrained on %d rows -> v%d", self.job_id, self.spec.memory, out["rows"],
                 out["version"])
        self.event("robust_keys", out["rows"], out["rows"])

    # ------------------------------------------------------------------ evaluation

    def submit_evaluation(self, indices: list[int], version: int) -> None:
        pool = self.coord.evaluator_pool()
        if pool is None or not indices:
            return
        slot = pool.next_slot()
        payload = dict(store=self.coord.store.root, redis_url=self.coord.config.redis_url, memory=self.spec.memory,
                       version=version, model=self.spec.model, layer=self.layer,
                       requests=[self.requests[i] for i in indices],
                       edit_ids=[self.edit_id(i) for i in indices], stats_key=self.stats_key)
        self.evals.append(_Pending(slot.handle.evaluate.remote(**payload), slot, payload, indices,
                                   generation=slot.generation))
        self.event("evaluate", self.counters()["n_evaluated"], self.count(RecordState.COMMITTED))

    def evaluate_leftovers(self) -> None:
        """Committed records never evaluated (committed by an earlier attempt of the job) are evaluated now."""
        if self.version is None or self.cancelled:
            return
        scheduled = {i for p in self.evals for i in p.indices}
        todo = [i for i, s in sorted(self.statuses.items()) if s.get("status") == RecordState.COMMITTED
                and s.get("efficacy") is None and i not in scheduled and i in self.requests]
        if todo:
            self.submit_evaluation(todo, self.version)

    def collect_evaluations(self, block: bool) -> None:
        """Record finished evaluations; an evaluation whose actor died is retried once on a replacement."""
        import ray

        from cluster.runtime import actor_died, task_cause

        pool = self.coord.evaluators
        deadline = time.monotonic() + self.coord.config.actor_timeout
        while self.evals:
            refs = [p.ref for p in self.evals]
            done, _ = ray.wait(refs, num_returns=len(refs) if block else 1, timeout=self.coord.config.poll_seconds if block else 0)
            for ref in done:
                p = next(p for p in self.evals if p.ref is ref)
                self.evals.remove(p)
                try:
                    res = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - sorted below
                    if actor_died(exc) and p.tries < 2 and pool is not None:
                        if p.slot.generation == p.generation:  # not yet replaced for another call it held
                            pool.replace(p.slot)
                        p.ref, p.tries = p.slot.handle.evaluate.remote(**p.payload), p.tries + 1
                        p.generation = p.slot.generation
                        self.evals.append(p)
                    else:
                        log.warning("job %s: evaluation of %d edits failed: %s", self.job_id, len(p.indices), task_cause(exc))
                    continue
                flags = res["efficacy"]
                self.save({i: {**self.statuses[i], "efficacy": bool(flags[self.statuses[i]["edit_id"]])}
                           for i in p.indices if self.statuses[i].get("edit_id") in flags})
                c = self.counters()
                self.event("evaluate", c["n_evaluated"], c["n_committed"])
            if not block:
                return
            self.beat()
            if time.monotonic() > deadline:
                log.warning("job %s: gave up waiting for %d evaluation(s); replacing their actors", self.job_id,
                            len(self.evals))
                if pool is not None:  # a hung evaluator would hold every later job's evaluations behind it
                    for p in {id(p.slot): p for p in self.evals if p.slot.generation == p.generation}.values():
                        pool.replace(p.slot)
                self.evals.clear()

    def outcome(self) -> tuple[str, str | None]:
        c = self.counters()
        n = len(self.spec.records)
        problems = [s["error"]["message"] for _, s in sorted(self.statuses.items()) if s.get("error")]
        summary = (f"{c['n_invalid']} invalid and {c['n_failed'] - c['n_invalid']} failed of {n} records"
                   + (f" (first: {problems[0]})" if problems else ""))
        if self.cancelled and c["n_committed"] < c["n_valid"]:
            return JobState.CANCELLED, None
        if self.spec.all_or_nothing and c["n_committed"] < n:
            return JobState.FAILED, f"job {self.job_id}: {summary}; all-or-nothing, so nothing was committed"
        if c["n_committed"] == n:
            return JobState.SUCCEEDED, None
        if c["n_committed"] == 0:
            return JobState.FAILED, f"job {self.job_id}: {summary}"
        return JobState.PARTIALLY_FAILED, f"job {self.job_id}: {summary}"


def run_coordinator(store: str | None = None, redis_url: str | None = None, ray_address: str | None = None, *,
                    optimisers: int = 1, evaluators: int = 1, covariance_builders: int = 1, http_port: int | None = None,
                    http_host: str = "127.0.0.1", consumer: str | None = None, lease_seconds: float = 60.0,
                    max_jobs: int | None = None, idle_exit: bool = False, stop_event: threading.Event | None = None,
                    on_event: Callable[[JobEvent], None] | None = None, handle_signals: bool = False) -> int:
    """Run a coordinator until stopped (or `max_jobs` / idle); returns the number of jobs processed.

    With `handle_signals` (main thread only), SIGTERM and SIGINT set the stop event: the job in
    progress stops after its current batch and is left for the next coordinator; a second signal
    interrupts at once. Raises `QueueUnavailableError` (Redis) or `RayUnavailableError` (Ray)
    before touching any job.
    """
    cfg = CoordinatorConfig(store=store, redis_url=redis_url, ray_address=ray_address, optimisers=optimisers,
                            evaluators=evaluators, covariance_builders=covariance_builders, http_port=http_port,
                            http_host=http_host, consumer=consumer, lease_seconds=lease_seconds)
    coord = Coordinator(cfg, on_event=on_event)
    if stop_event is not None:
        coord.stop_event = stop_event
    with coord:
        if handle_signals:  # after start(): ray.init installs its own SIGTERM handler
            _install_stop_signals(coord.stop_event)
        return coord.run(max_jobs=max_jobs, idle_exit=idle_exit)


def _install_stop_signals(stop: threading.Event) -> None:
    import signal

    def on_signal(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("signal %d: stopping after the current batch (again to interrupt now)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
