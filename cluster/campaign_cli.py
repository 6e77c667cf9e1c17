"""CLI of evaluation campaigns (mounted by cluster/cli.py as `kvedit campaign`):

    kvedit campaign run CAMPAIGN.yaml [--store DIR] [--ray-address A] [--workers N] [--json]
    kvedit campaign report NAME --out DIR [--store DIR]
    kvedit campaign synth --n 100000 --out facts.jsonl [--seed S]
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

campaign_app = typer.Typer(help="Evaluation campaigns: grids of eval runs on Ray, results in the store, reports.",
                           no_args_is_help=True)

StoreOpt = typer.Option(None, "--store", envvar="KVEDIT_STORE", help="Store root: directory or URI.")
_err = Console(stderr=True)


def _setup_logging(verbose: bool = False) -> None:
    import warnings

    warnings.filterwarnings("ignore", message="lance is not fork-safe")  # Ray forks+execs; harmless
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(exc: Exception | str, as_json: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps({"error": type(exc).__name__ if isinstance(exc, Exception) else "Error", "message": str(exc)}))
    else:
        _err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


@campaign_app.command("run")
def campaign_run(
    campaign: Path = typer.Argument(..., help="campaign YAML (see campaigns/*.yaml)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="KVEDIT_RAY_ADDRESS",
                                              help="join this Ray cluster (HOST:PORT); default: a local Ray"),
    workers: int = typer.Option(1, min=1, help="evaluation actors (each loads the model once)"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads per actor (default: local CPUs / workers)"),
    retry_failed: bool = typer.Option(True, "--retry-failed/--skip-failed", help="re-run cells that failed before"),
    only: Optional[list[str]] = typer.Option(None, "--only", metavar="FIELD=VALUE",
                                             help="run only the grid cells with this value (repeatable; e.g. "
                                                  "--only method=cosine+rep --only T=400)"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
    store: Optional[str] = StoreOpt,
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
):
    """Run every cell of the campaign grid (or of the `--only` selection) not yet finished; each finished cell is recorded at once (resumable)."""
    _setup_logging(verbose)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cluster.campaign import (CampaignSpecError, check_datasets, check_model, load_campaign, run_campaign,
                                  select_cells)
    from cluster.jobs import JobError

    try:
        spec = load_campaign(campaign)
        select_cells(spec.cells(), only)  # checked again by run_campaign; here so an error comes before the bar
        check_datasets(spec)
        check_model(spec)  # on the driver, as the datasets are
    except CampaignSpecError as exc:
        _fail(exc, as_json)
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn())
    with Progress(*cols, console=_err, disable=as_json) as prog:
        task = prog.add_task(f"campaign {spec.name}", total=None, info="starting")
        counts = {"ok": 0, "error": 0}

        def on_start(todo: int, skipped: int) -> None:
            prog.update(task, total=todo, info=f"{skipped} already done" if skipped else "")

        def on_cell(cell, row) -> None:
            counts[row["status"]] += 1
            prog.update(task, advance=1, info=f"ok {counts['ok']} failed {counts['error']}; last {cell.cell_id}")
            if row["status"] != "ok":
                _err.print(f"[yellow]cell {cell.cell_id} failed:[/] {row['error']}", highlight=False)

        try:
            run = run_campaign(spec, store, ray_address, workers, threads, retry_failed, only,
                               on_start=on_start, on_cell=on_cell)
        except (CampaignSpecError, JobError) as exc:
            _fail(exc, as_json)
    if as_json:
        typer.echo(json.dumps(run.to_dict()))
    else:
        _err.print(f"campaign {run.name}: {run.ok} cells run, {run.failed} failed, {run.skipped} skipped "
                   f"(of {run.cells}) in {run.seconds:.0f}s; results in {run.results_dir}", highlight=False)
    if run.failed:  # the results table has the errors; scripts and CI see that cells failed
        raise typer.Exit(1)


@campaign_app.command("report")
def campaign_report(
    name: str = typer.Argument(..., help="campaign name (the `name:` of its YAML)"),
    out: Path = typer.Option(..., "--out", help="folder for report.md and plots/"),
    store: Optional[str] = StoreOpt,
):
    """Write a Markdown report with PNG plots from the campaign's results table."""
    _setup_logging()
    from cluster.campaign_report import write_report

    try:
        path = write_report(name, out, store)
    except ValueError as exc:
        _fail(exc)
    typer.echo(str(path))


@campaign_app.command("synth")
def campaign_synth(
    n: int = typer.Option(1000, "--n", min=1, help="number of facts"),
    out: Path = typer.Option(..., "--out", help="JSONL file (REP record format)"),
    seed: int = typer.Option(0),
):
    """Write synthetic facts: invented subjects in real CounterFact relation templates."""
    _setup_logging()
    from editing.records import EditRecordError
    from editing.synthetic import synthetic_requests, write_jsonl

    try:
        path = write_jsonl(synthetic_requests(n, seed=seed), out)
    except (EditRecordError, OSError) as exc:
        _fail(exc)
    _err.print(f"{n} synthetic facts written to {path}", highlight=False)
