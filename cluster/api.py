"""The job HTTP API (FastAPI) and the coordinator's Prometheus metrics.

    POST /jobs               submit a job            (Authorization: Bearer $KVEDIT_API_TOKEN)
    GET  /jobs               list jobs, newest first
    GET  /jobs/{id}          one job, with per-record statuses
    POST /jobs/{id}/cancel   cancel a job            (Authorization: Bearer $KVEDIT_API_TOKEN)
    GET  /metrics            Prometheus text format
    GET  /openapi.json       the schema (and /docs)

Write endpoints compare the bearer token with `KVEDIT_API_TOKEN` in constant time; a missing
or wrong token gets 401 and changes nothing. Without a configured token, writes are refused.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field

from cluster.jobs import (
    DEFAULT_BATCH_SIZE, DEFAULT_MODEL, JobConflictError, JobNotFoundError, JobSpec, JobSpecError, JobState,
    JobStateError, JobStore, QueueUnavailableError, new_job_id,
)
from cluster.queue import JobQueue

log = logging.getLogger(__name__)

TOKEN_ENV = "KVEDIT_API_TOKEN"


# ---------------------------------------------------------------------------------------- metrics


class _QueueCollector:
    """Jobs by state and queue depth, read from Redis at scrape time."""

    def __init__(self, jobs: JobStore, queue: JobQueue):
        self.jobs, self.queue = jobs, queue

    def collect(self):
        by_state = GaugeMetricFamily("kvedit_jobs", "Jobs by state.", labels=["state"])
        depth = GaugeMetricFamily("kvedit_job_queue_depth", "Stream entries waiting or in progress.")
        try:
            for state, n in self.jobs.counts_by_state().items():
                by_state.add_metric([state], n)
            depth.add_metric([], self.queue.depth())
        except QueueUnavailableError as exc:
            log.warning("metrics: %s", exc)
        yield by_state
        yield depth


class JobMetrics:
    """The coordinator's metrics, in their own registry (so several coordinators can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.edits_committed = Counter("kvedit_edits_committed", "Edits committed to memories.", registry=self.registry)
        self.edits_failed = Counter("kvedit_edits_failed", "Edit records that failed (invalid or not computed).",
                                    registry=self.registry)
        self.batch_seconds = Histogram("kvedit_batch_duration_seconds", "Time to optimise one batch on an actor.",
                                       buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=self.registry)
        self.optimiser_loss = Histogram("kvedit_optimiser_loss", "Final optimiser loss per edit.",
                                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8), registry=self.registry)
        self.actor_restarts = Counter("kvedit_actor_restarts", "Worker actors replaced after dying.", ["pool"],
                                      registry=self.registry)
        self.robust_keys_retrains = Counter("kvedit_robust_keys_retrains", "REP adapters retrained after a job grew "
                                            "their memory, by result (ok, failed, conflict: another change to the "
                                            "adapter landed first, abandoned: the coordinator stopped or lost the job, "
                                            "deferred: a failed retrain's backoff).", ["result"], registry=self.registry)
        # Every series a dashboard takes increase()/rate() of exists from the start at 0: a series born at its
        # first event (1) shows no increase, so a pool's first restart would never appear.
        for pool in ("values", "evaluator", "covariance"):
            self.actor_restarts.labels(pool=pool)
        for result in ("ok", "failed", "conflict", "abandoned", "deferred"):
            self.robust_keys_retrains.labels(result)
        self._bound = False

    def bind(self, jobs: JobStore, queue: JobQueue) -> "JobMetrics":
        """Report jobs by state and queue depth from this Redis."""
        if not self._bound:
            self.registry.register(_QueueCollector(jobs, queue))
            self._bound = True
        return self

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------- app


class SubmitBody(BaseModel):
    """A job submission. `records` are edit records in any format kvedit reads (REP, CounterFact, zsRE)."""

    memory: str = Field(..., description="target memory (created on first commit)")
    records: list[Any] = Field(..., description="raw edit records")
    job_id: Optional[str] = Field(None, description="idempotency key; a resubmission never duplicates edits")
    model: str = DEFAULT_MODEL
    layer: Optional[int] = None
    router: str = "cosine"
    threshold: Optional[float] = None
    batch_size: int = DEFAULT_BATCH_SIZE
    all_or_nothing: bool = False
    edit_config: dict = Field(default_factory=dict, description="EditConfig overrides, e.g. {\"values\": {\"steps\": 10}}")
    stats_tokens: Optional[int] = None


def _error(status: int, exc: Exception) -> HTTPException:
    detail = exc.to_dict() if hasattr(exc, "to_dict") else {"error": type(exc).__name__, "message": str(exc)}
    return HTTPException(status_code=status, detail=detail)


def create_app(jobs: JobStore, queue: JobQueue | None = None, metrics: JobMetrics | None = None,
               token: str | None = None) -> FastAPI:
    """The API over a job store. `token` defaults to `$KVEDIT_API_TOKEN` (read at each request when None)."""
    app = FastAPI(title="kvedit jobs", version="1", description="Submit and follow kvedit edit jobs.")
    queue = queue or JobQueue(jobs.client)
    metrics = metrics or JobMetrics()
    metrics.bind(jobs, queue)
    bearer = HTTPBearer(auto_error=False)

    def authorised(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        expected = token if token is not None else os.environ.get(TOKEN_ENV)
        if not expected:
            raise HTTPException(401, detail={"error": "Unauthorized", "message":
                                             f"write endpoints are disabled: the server has no {TOKEN_ENV}"},
                                headers={"WWW-Authenticate": "Bearer"})
        given = creds.credentials if creds is not None else ""
        if not secrets.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, detail={"error": "Unauthorized", "message": "missing or wrong bearer token"},
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(QueueUnavailableError)
    async def _unavailable(_: Request, exc: QueueUnavailableError):
        return JSONResponse(status_code=503, content={"detail": exc.to_dict()})

    @app.post("/jobs", status_code=202, dependencies=[Depends(authorised)], summary="Submit a job")
    def submit(body: SubmitBody) -> dict:
        data = body.model_dump()
        data["job_id"] = data["job_id"] or new_job_id()
        try:
            status, created = jobs.submit(JobSpec(**data))
        except JobSpecError as exc:
            raise _error(422, exc) from exc
        except JobConflictError as exc:
            raise _error(409, exc) from exc
        return {"job_id": status.job_id, "state": status.state, "created": created}

    @app.get("/jobs", summary="List jobs, newest first")
    def list_jobs(limit: int = Query(50, ge=1, le=1000), state: Optional[str] = Query(None)) -> list[dict]:
        if state is not None and state not in JobState.ALL:
            raise HTTPException(422, detail={"error": "JobSpecError", "message": f"unknown state {state!r}"})
        return [s.to_dict() for s in jobs.list(limit=limit, state=state)]

    @app.get("/jobs/{job_id}", summary="One job with its per-record statuses")
    def get_job(job_id: str, records: bool = True) -> dict:
        try:
            return jobs.get(job_id, records=records).to_dict()
        except JobNotFoundError as exc:
            raise _error(404, exc) from exc

    @app.post("/jobs/{job_id}/cancel", dependencies=[Depends(authorised)], summary="Cancel a job")
    def cancel_job(job_id: str) -> dict:
        try:
            return jobs.request_cancel(job_id).to_dict()
        except JobNotFoundError as exc:
            raise _error(404, exc) from exc
        except JobStateError as exc:
            raise _error(409, exc) from exc

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def get_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


class ApiServer:
    """uvicorn serving an app from a background thread (started and stopped by the coordinator)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8470):
        import uvicorn

        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self.server.install_signal_handlers = lambda: None  # the coordinator owns the signals
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> "ApiServer":
        self._thread = threading.Thread(target=self.server.run, name="kvedit-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP API could not listen on {self.host}:{self.port}")
            time.sleep(0.05)
        log.info("HTTP API on http://%s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(timeout=10)
            self._thread = None
