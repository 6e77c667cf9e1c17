"""CLI of the jobs path (mounted by cluster/cli.py):

    kvedit edit submit DATA --memory NAME [...]   queue a job, print its id
    kvedit jobs ls | status ID | watch ID | cancel ID
    kvedit coordinator [--ray-address A] [--http-port P]
    kvedit demo [--limit N]

Every command takes --store (default $KVEDIT_STORE or ~/.cache/kvedit/store) and --redis-url
(default $KVEDIT_REDIS_URL, else the store's embedded Redis). Errors print one line (or a JSON
object with --json) naming the job, record or field, and exit with status 1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from cluster.jobs import (
    DEFAULT_BATCH_SIZE, DEFAULT_MODEL, JobError, JobSpec, JobState, JobStatus, JobStore, legacy_job_edit_id,
    new_job_id,
)

jobs_app = typer.Typer(help="Follow and cancel edit jobs.", no_args_is_help=True)

StoreOpt = typer.Option(None, "--store", envvar="KVEDIT_STORE", help="Store root: directory or URI.")
RedisOpt = typer.Option(None, "--redis-url", envvar="KVEDIT_REDIS_URL", help="Redis URL; default: the store's embedded server.")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")

_out = Console()
_err = Console(stderr=True)


def _setup_logging(verbose: bool = False) -> None:
    import warnings

    warnings.filterwarnings("ignore", message="lance is not fork-safe")  # Ray and Redis fork+exec; harmless
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(exc: Exception | str, as_json: bool, code: int = 1) -> None:
    if as_json:
        payload = exc.to_dict() if hasattr(exc, "to_dict") else {"error": type(exc).__name__ if isinstance(exc, Exception) else "Error",
                                                                 "message": str(exc)}
        typer.echo(json.dumps(payload))
    else:
        _err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code)


@contextmanager
def _job_store(store: Optional[str], redis_url: Optional[str], as_json: bool) -> Iterator[JobStore]:
    """A job store for one command; job errors become one clean line and exit status 1."""
    try:
        jobs = JobStore.connect(redis_url, store)
    except JobError as exc:
        _fail(exc, as_json)
    try:
        yield jobs
    except JobError as exc:
        _fail(exc, as_json)
    finally:
        jobs.client.close()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _summary_line(st: JobStatus) -> str:
    return (f"{st.job_id}: {st.state}; {st.n_committed}/{st.n_records} committed, {st.n_failed} failed"
            + (f", {st.n_cancelled} cancelled" if st.n_cancelled else "")
            + (f"; efficacy {_pct(st.efficacy)}" if st.efficacy is not None else "")
            + (f"; memory {st.memory!r} v{st.version}" if st.version is not None else ""))


# ---------------------------------------------------------------------------------------- jobs


@jobs_app.command("ls")
def jobs_ls(
    limit: int = typer.Option(50, min=1, help="newest N jobs"),
    state: Optional[str] = typer.Option(None, help="only jobs in this state"),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
):
    """List jobs, newest first."""
    _setup_logging()
    if state is not None and state not in JobState.ALL:
        _fail(f"--state {state!r}: choose one of {', '.join(JobState.ALL)}", as_json)
    with _job_store(store, redis_url, as_json) as jobs:
        rows = jobs.list(limit=limit, state=state)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], default=str))
        return
    t = Table(title="jobs")
    for col in ("job", "state", "memory", "committed", "failed", "efficacy", "version", "created"):
        t.add_column(col)
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)) if r.created_at else "-"
        t.add_row(r.job_id, r.state, r.memory, f"{r.n_committed}/{r.n_records}", str(r.n_failed), _pct(r.efficacy),
                  "-" if r.version is None else str(r.version), created)
    _out.print(t)


@jobs_app.command("status")
def jobs_status(
    job_id: str = typer.Argument(..., help="job id"),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
):
    """A job's state, counters and per-record errors."""
    _setup_logging()
    with _job_store(store, redis_url, as_json) as jobs:
        st = jobs.get(job_id, records=True)
    if as_json:
        typer.echo(json.dumps(st.to_dict(), default=str))
        return
    _out.print(_summary_line(st), highlight=False)
    if st.error:
        _out.print(f"[red]{st.error}[/]", highlight=False)
    bad = [r for r in st.records or [] if r.get("error")]
    if bad:
        t = Table(title="record errors")
        for col in ("record", "case_id", "status", "field", "reason"):
            t.add_column(col)
        for r in bad:
            e = r["error"]
            t.add_row(str(r["index"]), str(e.get("case_id")), r["status"], str(e.get("field")), str(e.get("reason")))
        _out.print(t)


@jobs_app.command("watch")
def jobs_watch(
    job_id: str = typer.Argument(..., help="job id"),
    interval: float = typer.Option(0.5, min=0.05, help="seconds between polls"),
    timeout: Optional[float] = typer.Option(None, help="give up after this many seconds"),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
):
    """Follow a job until it ends (progress bar; with --json one JSON line per change). Exit 0 if it succeeded, else 1."""
    _setup_logging()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    deadline = None if timeout is None else time.monotonic() + timeout
    with _job_store(store, redis_url, as_json) as jobs:
        st = jobs.get(job_id)
        last = None
        cols = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        with Progress(*cols, console=_err, disable=as_json) as prog:
            task = prog.add_task(job_id, total=st.n_records, info="")
            while True:
                st = jobs.get(job_id)
                snap = st.to_dict()
                snap.pop("seconds", None)
                if as_json and snap != last:
                    typer.echo(json.dumps(st.to_dict(), default=str))
                last = snap
                prog.update(task, completed=st.n_committed + st.n_failed + st.n_cancelled,
                            description=f"{job_id} [bold]{st.state}[/] {st.stage or ''}",
                            info=f"committed {st.n_committed} failed {st.n_failed} efficacy {_pct(st.efficacy)}")
                if st.terminal:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    _fail(f"job {job_id}: still {st.state} after {timeout:.0f}s", as_json)
                time.sleep(interval)
    if not as_json:
        _out.print(_summary_line(st), highlight=False)
        if st.error:
            _out.print(f"[red]{st.error}[/]", highlight=False)
    raise typer.Exit(0 if st.state == JobState.SUCCEEDED else 1)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str = typer.Argument(..., help="job id"),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
):
    """Cancel a job: a queued job at once; a running one after its current batch (committed batches stay)."""
    _setup_logging()
    with _job_store(store, redis_url, as_json) as jobs:
        st = jobs.request_cancel(job_id)
    if as_json:
        typer.echo(json.dumps(st.to_dict(), default=str))
    elif st.state == JobState.CANCELLED:
        _out.print(f"{job_id}: cancelled", highlight=False)
    else:
        _out.print(f"{job_id}: cancel requested; the coordinator stops after the current batch", highlight=False)


# ---------------------------------------------------------------------------------------- submit


def _read_records(data: str, limit: Optional[int], offset: int) -> tuple[list, str]:
    from editing.data import data_file
    from editing.records import read_raw_records

    path = data_file(data)
    raw = read_raw_records(path)
    if isinstance(raw, dict) and isinstance(raw.get("records"), list):
        raw = raw["records"]
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of records (or JSONL)")
    return raw[offset: None if limit is None else offset + limit], str(path)


def edit_submit(
    data: str = typer.Argument(..., help="records: a file of ../shared/data, a path, or JSONL"),
    memory: str = typer.Option(..., "--memory", help="target memory (created on first commit)"),
    model: str = typer.Option(DEFAULT_MODEL, help="known name or local HF causal-LM folder"),
    router: str = typer.Option("cosine", help="cosine | whitened | margin"),
    layer: Optional[int] = typer.Option(None, help="edit layer (model default when omitted)"),
    threshold: Optional[float] = typer.Option(None, help="a fixed gate threshold; omitted: a new memory is calibrated at every commit, an existing one keeps its gate"),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="idempotency key: resubmitting it never duplicates edits"),
    all_or_nothing: bool = typer.Option(False, "--all-or-nothing", help="one bad record fails the job; nothing committed"),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, min=1, help="records per actor call and per commit"),
    edit_config: Optional[str] = typer.Option(None, help='EditConfig overrides as JSON, e.g. \'{"values": {"steps": 10}}\''),
    stats_tokens: Optional[int] = typer.Option(None, min=2, help="also build statistics over this many corpus tokens"),
    limit: Optional[int] = typer.Option(None, min=1),
    offset: int = typer.Option(0, min=0),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
):
    """Queue the records of DATA as one job for `kvedit coordinator`; prints the job id."""
    _setup_logging()
    from editing.records import EditRecordError

    try:
        records, source = _read_records(data, limit, offset)
        try:
            overrides = json.loads(edit_config) if edit_config else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"--edit-config: not a JSON object: {exc}") from exc
    except (OSError, EditRecordError, ValueError) as exc:  # OSError: unreadable as well as missing
        _fail(exc, as_json)
    spec = JobSpec(memory=memory, records=records, job_id=job_id or new_job_id(), model=model, layer=layer, router=router,
                   threshold=threshold, batch_size=batch_size, all_or_nothing=all_or_nothing, edit_config=overrides,
                   stats_tokens=stats_tokens, source=source)
    with _job_store(store, redis_url, as_json) as jobs:
        st, created = jobs.submit(spec)
    if as_json:
        typer.echo(json.dumps({"job_id": st.job_id, "state": st.state, "created": created, "n_records": st.n_records,
                               "memory": st.memory}))
        return
    if not created:
        _err.print(f"job {st.job_id} already exists ({st.state}); nothing queued", highlight=False)
    else:
        _err.print(f"queued {st.n_records} records for memory {memory!r}", highlight=False)
    typer.echo(st.job_id)


# ---------------------------------------------------------------------------------------- coordinator


def coordinator(
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="KVEDIT_RAY_ADDRESS",
                                              help="join this Ray cluster (HOST:PORT); default: a local Ray"),
    optimisers: int = typer.Option(1, min=1, help="ValueOptimiser actors"),
    evaluators: int = typer.Option(1, min=0, help="Evaluator actors (0: no evaluation)"),
    covariance_builders: int = typer.Option(1, min=1, help="CovarianceBuilder actors"),
    http_port: Optional[int] = typer.Option(None, help="serve the HTTP API on this port"),
    http_host: str = typer.Option("127.0.0.1", help="HTTP API address"),
    consumer: Optional[str] = typer.Option(None, help="name in the consumer group (reuse it to resume at once after a crash)"),
    lease: float = typer.Option(60.0, min=0.5, help="seconds after which a silent coordinator's job is taken over"),
    max_jobs: Optional[int] = typer.Option(None, min=1, help="exit after this many jobs"),
    exit_when_idle: bool = typer.Option(False, "--exit-when-idle", help="exit once no job is waiting"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
):
    """Consume the job queue and drive the Ray actor pools (SIGTERM/Ctrl-C: stop after the current batch)."""
    _setup_logging(verbose)
    from cluster.coordinator import run_coordinator
    from store import StoreError

    try:
        n = run_coordinator(store, redis_url, ray_address, optimisers=optimisers, evaluators=evaluators,
                            covariance_builders=covariance_builders, http_port=http_port, http_host=http_host,
                            consumer=consumer, lease_seconds=lease, max_jobs=max_jobs, idle_exit=exit_when_idle,
                            handle_signals=True)
    except (JobError, OSError, StoreError) as exc:
        _fail(exc, as_json)
    if as_json:
        typer.echo(json.dumps({"processed": n}))
    else:
        _err.print(f"coordinator stopped after {n} job(s)", highlight=False)


# ---------------------------------------------------------------------------------------- demo


def _demo_job_id(model: str, router: str, memory: str) -> str:
    """The demo's job id: the same for every run (and any --limit), so record i always has the same edit_id
    and re-running the demo recomputes the edits without adding them to the memory twice."""
    import hashlib

    return "demo-" + hashlib.sha256(json.dumps([model, router, memory]).encode()).hexdigest()[:10]


def demo(
    limit: Optional[int] = typer.Option(None, min=1, help="first N records of counterfact_valid.json (default all)"),
    model: str = typer.Option(DEFAULT_MODEL),
    router: str = typer.Option("cosine", help="cosine | whitened | margin"),
    memory: str = typer.Option("demo", help="target memory"),
    optimisers: int = typer.Option(2, min=1, help="ValueOptimiser actors"),
    stats_tokens: int = typer.Option(20_000, min=256, help="corpus tokens of the statistics stage (cached)"),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
):
    """Edit CounterFact facts through the whole job path on a local Ray: queue, statistics, optimise, commit, evaluate.

    Re-running it recomputes the same edits under the same ids: the memory keeps one row per fact.
    """
    _setup_logging()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from cluster.coordinator import Coordinator, CoordinatorConfig, JobEvent

    try:
        records, source = _read_records("counterfact_valid.json", limit, 0)
    except (FileNotFoundError, ValueError) as exc:
        _fail(exc, as_json)
    job_id = _demo_job_id(model, router, memory)
    spec = JobSpec(memory=memory, records=records, job_id=job_id, model=model, router=router,
                   stats_tokens=stats_tokens, source=source)
    cfg = CoordinatorConfig(store=store, redis_url=redis_url, optimisers=optimisers, evaluators=1, covariance_builders=1,
                            consumer="demo", log_to_driver=False)
    cols = (TextColumn("{task.description:<34}"), BarColumn(), TextColumn("{task.fields[count]:>9}"), TimeElapsedColumn())
    t0 = time.perf_counter()
    with Progress(*cols, console=_err, disable=as_json) as prog:
        status_task = prog.add_task("starting Ray and Redis", total=None, count="")
        bars = {
            "statistics": prog.add_task("statistics (covariance)", total=None, start=False, count=""),
            "optimise": prog.add_task("optimise + commit", total=len(records), start=False, count=""),
            "evaluate": prog.add_task("evaluate", total=len(records), start=False, count=""),
        }
        labels = {"validate": "validating records", "load": "loading the model on the actors",
                  "statistics": "building statistics", "optimise": "optimising and committing",
                  "evaluate": "optimising and evaluating", "robust_keys": "retraining robust keys"}

        def on_event(e: JobEvent) -> None:
            if e.job_id not in (job_id, "-"):
                return
            if e.stage in bars:
                task = bars[e.stage]
                prog.start_task(task)
                prog.update(task, completed=e.done, total=e.total or None,
                            count=f"{e.done}/{e.total}" + (" cached" if e.message == "cached" else ""))
            if e.stage == "done":
                prog.update(status_task, description=f"done: {e.state}", total=1, completed=1)
            else:
                prog.update(status_task, description=labels.get(e.stage, e.stage))

        coord = Coordinator(cfg, on_event=on_event)
        try:
            with coord:
                if coord.store.exists(memory):  # rows of a demo run before the edit ids included the record
                    coord.store.delete(memory, edit_ids=[legacy_job_edit_id(job_id, i) for i in range(len(records))])
                previous = coord.jobs.get(job_id) if coord.jobs.exists(job_id) else None
                if previous is not None and previous.terminal:
                    coord.jobs.delete([job_id])  # forget the last run; its edits stay in the memory
                    previous = None
                if previous is None:
                    coord.jobs.submit(spec)
                prog.update(status_task, description="queued" if previous is None else f"resuming {previous.state} job")
                try:
                    coord.run(until=lambda: coord.jobs.get(job_id).terminal)
                except KeyboardInterrupt:
                    with contextlib.suppress(JobError):
                        coord.jobs.request_cancel(job_id)
                    raise
                final = coord.jobs.get(job_id)
                info = coord.store.info(memory) if coord.store.exists(memory) else None
        except JobError as exc:
            _fail(exc, as_json)
    result = {"job_id": job_id, "state": final.state, "committed": final.n_committed, "failed": final.n_failed,
              "efficacy": final.efficacy, "memory": memory, "version": info.version if info else None,
              "rows": info.n_rows if info else 0, "seconds": round(time.perf_counter() - t0, 2),
              "job_seconds": final.to_dict()["seconds"]}
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _out.print(f"[bold]{final.state}[/]: {final.n_committed} edits committed, {final.n_failed} failed; "
                   f"efficacy {_pct(final.efficacy)}; memory {memory!r} v{result['version']} ({result['rows']} rows); "
                   f"{result['seconds']:.0f}s", highlight=False)
        if final.error:
            _out.print(f"[red]{final.error}[/]", highlight=False)
    raise typer.Exit(0 if final.state == JobState.SUCCEEDED else 1)  # as `jobs watch`: scripts see a failed job


def main() -> None:  # pragma: no cover - `python -m cluster.jobs_cli` (the kvedit entry point mounts these commands)
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    app.add_typer(jobs_app, name="jobs")
    app.command("submit")(edit_submit)
    app.command("coordinator")(coordinator)
    app.command("demo")(demo)
    app()


if __name__ == "__main__":
    main()
