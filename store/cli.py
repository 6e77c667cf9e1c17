"""`kvedit memory …`: inspect and manage memories from the shell (mounted by cluster/cli.py).

Every command takes --store (default $KVEDIT_STORE or ~/.cache/kvedit/store), --redis-url
(default $KVEDIT_REDIS_URL or the embedded server) and --json. Errors print one line (or a
JSON object with --json) naming the memory and version, and exit with status 1.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from editing.rep import RETRAIN_MAX_ROWS, retrain_rows
from editing.table import MemoryMismatchError

from .errors import StoreError
from .memory_store import NOOP, MemoryStore
from .model import MemoryInfo

memory_app = typer.Typer(help="Inspect and manage versioned edit memories.", no_args_is_help=True)

StoreOpt = typer.Option(None, "--store", envvar="KVEDIT_STORE", help="Store root: directory or URI (s3://, gs://, memory://).")
RedisOpt = typer.Option(None, "--redis-url", envvar="KVEDIT_REDIS_URL", help="Redis URL; default: embedded server in the store.")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")

_out = Console()
_err = Console(stderr=True)


def _emit(data, as_json: bool, render) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        render()


@contextmanager
def _store(store: Optional[str], redis_url: Optional[str], as_json: bool) -> Iterator[MemoryStore]:
    """A store for one command; store errors become a clean message and exit status 1."""
    s = None
    try:
        try:
            s = MemoryStore(store, redis_url=redis_url)
        except (OSError, ValueError) as exc:  # an unknown URI scheme, a file where the directory should be
            raise StoreError(f"--store {store!r}: {exc}") from exc
        yield s
    except (StoreError, MemoryMismatchError) as exc:
        if as_json:
            payload = exc.to_dict() if isinstance(exc, StoreError) else {"error": type(exc).__name__, "message": str(exc)}
            typer.echo(json.dumps(payload))
        else:
            _err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1)
    finally:
        if s is not None:
            s.close()


def _when(ts) -> str:
    return ts.strftime("%Y-%m-%d %H:%M")


def _info_table(info: MemoryInfo) -> Table:
    t = Table(title=f"memory {info.name} v{info.version}", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    spec = info.spec
    t.add_row("model fingerprint", spec.model_fingerprint)
    t.add_row("layer", str(spec.layer))
    t.add_row("d_key / d_model", f"{spec.d_key} / {spec.d_model}")
    t.add_row("version", str(info.version))
    t.add_row("rows", str(info.n_rows))
    t.add_row("router", json.dumps({k: v for k, v in info.router.items() if k != "calibration"}, sort_keys=True))
    gate = _gate(info)
    t.add_row("threshold", f"{gate['threshold']} ({'calibrated' if gate['calibrated'] else 'fixed'})")
    if gate.get("false_gate_rate") is not None:
        t.add_row("false-gate rate (est.)", f"{gate['false_gate_rate']:.2e} (target {gate.get('target_rate')})")
        t.add_row("recall (est.)", f"{gate['recall']:.3f} ({gate.get('objective')})")
    rk = info.router.get("robust_keys")
    if isinstance(rk, dict) and "rows" in rk:  # rows committed since training route through an adapter that never saw them
        growth, cap = rk.get("retrain_growth"), rk.get("retrain_max_rows", RETRAIN_MAX_ROWS)
        window = retrain_rows(rk)  # the rule jobs follow (`cluster.robust.retrain_due`)
        auto = ("retrained by hand only" if not growth else f"retrained by jobs at +{growth:.0%} rows"
                + ("" if cap is None else f"; too large for that (cap {cap} rows)"
                   if window is None or info.n_rows > window[1] else f" up to {cap} rows"))
        t.add_row("robust keys", f"rank {rk.get('rank')}, trained on {rk['rows']} rows at v{rk.get('trained_on_version')}; "
                  f"the memory now has {info.n_rows} ({auto}; now: kvedit edit robust-keys --memory {info.name})")
    for k, v in sorted(info.metadata.items()):
        t.add_row(f"metadata.{k}", json.dumps(v) if not isinstance(v, str) else v)
    t.add_row("created", info.created_at.isoformat(timespec="seconds"))
    t.add_row("committed", info.committed_at.isoformat(timespec="seconds"))
    t.add_row("history from", f"v{info.oldest_version}")
    t.add_row("uri", info.uri)
    return t


@memory_app.command("ls")
def ls_cmd(store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt) -> None:
    """List memories with their binding, version and size."""
    with _store(store, redis_url, as_json) as s:
        infos = s.ls()

        def render() -> None:
            t = Table(title=f"memories in {s.root}")
            t.add_column("name", no_wrap=True)
            for col in ("ver", "rows"):
                t.add_column(col, no_wrap=True, justify="right")
            t.add_column("fingerprint", overflow="fold", ratio=1, min_width=11)
            t.add_column("layer", no_wrap=True, justify="right")
            t.add_column("d_key/d_model", no_wrap=True)
            t.add_column("committed", no_wrap=True)
            for i in infos:
                t.add_row(i.name, str(i.version), str(i.n_rows), i.spec.model_fingerprint, str(i.spec.layer),
                          f"{i.spec.d_key}/{i.spec.d_model}", _when(i.committed_at))
            _out.print(t)

        _emit([i.to_dict() for i in infos], as_json, render)


def _gate(info: MemoryInfo) -> dict:
    """The gate of a version: its threshold, whether it is calibrated, and the calibration's estimates."""
    cal = info.router.get("calibration") or {}
    gate = {"threshold": info.router.get("threshold"), "calibrated": bool(info.router.get("calibrate"))}
    gate.update({k: cal[k] for k in ("false_gate_rate", "recall", "target_rate", "objective") if k in cal})
    return gate


@memory_app.command("show")
def show_cmd(
    name: str,
    version: Optional[int] = typer.Option(None, "--version", "-v", help="Version to show (default: latest)."),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
) -> None:
    """Spec, router config, version, row count and per-version metadata of a memory."""
    with _store(store, redis_url, as_json) as s:
        info = s.info(name, version)
        _emit({**info.to_dict(), "gate": _gate(info)}, as_json, lambda: _out.print(_info_table(info)))


@memory_app.command("history")
def history_cmd(name: str, store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt) -> None:
    """Every retained version: what it did and the size it left."""
    with _store(store, redis_url, as_json) as s:
        entries = s.history(name)

        def render() -> None:
            t = Table(title=f"history of {name}")
            t.add_column("ver", no_wrap=True, justify="right")
            t.add_column("UTC", no_wrap=True)
            t.add_column("op", no_wrap=True)
            for col in ("+", "-", "rows"):
                t.add_column(col, no_wrap=True, justify="right")
            t.add_column("job", overflow="fold", min_width=6)
            t.add_column("message", overflow="fold", ratio=1, min_width=12)
            for e in entries:
                t.add_row(str(e.version), _when(e.committed_at), e.op, str(e.n_added), str(e.n_deleted),
                          str(e.n_rows), e.job_id or "", e.message)
            _out.print(t)

        _emit([e.to_dict() for e in entries], as_json, render)


@memory_app.command("delete")
def delete_cmd(
    name: str,
    edit_id: Optional[List[str]] = typer.Option(None, "--edit-id", help="Edit id to delete (repeatable)."),
    subject: Optional[str] = typer.Option(None, "--subject", help="Delete every row with this subject."),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Delete every row written by this job."),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
) -> None:
    """Delete rows by edit id, subject or job id, as one new version."""
    if not edit_id and subject is None and job_id is None:
        _err.print("[red]error:[/red] give --edit-id, --subject or --job-id")
        raise typer.Exit(2)
    with _store(store, redis_url, as_json) as s:
        v = s.delete(name, edit_ids=edit_id or None, subject=subject, job_id=job_id)
        _emit(v.to_dict(), as_json, lambda: _out.print(
            f"{name} v{v.version}: no row matched, nothing deleted ({v.n_rows} rows)" if v.op == NOOP
            else f"{name} v{v.version}: deleted {v.n_deleted} row(s), {v.n_rows} left"))


@memory_app.command("rollback")
def rollback_cmd(
    name: str,
    to: int = typer.Option(..., "--to", help="Version whose content becomes current again."),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
) -> None:
    """Make version --to current again, as a new version."""
    with _store(store, redis_url, as_json) as s:
        v = s.rollback(name, to)
        _emit(v.to_dict(), as_json, lambda: _out.print(
            f"{name} v{v.version}: rolled back to v{to} (+{v.n_added} -{v.n_deleted}, {v.n_rows} rows)"))


@memory_app.command("export")
def export_cmd(
    name: str,
    out: str = typer.Argument(..., help="Output file (local path or fsspec URI)."),
    format: str = typer.Option("parquet", "--format", help="parquet or arrow."),
    version: Optional[int] = typer.Option(None, "--version", "-v", help="Version to export (default: latest)."),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
) -> None:
    """Write a version's rows to a Parquet (pandas/duckdb-readable) or Arrow file."""
    with _store(store, redis_url, as_json) as s:
        r = s.export(name, out, format=format, version=version)
        _emit(r, as_json, lambda: _out.print(f"{name} v{r['version']}: {r['rows']} rows -> {r['path']} ({r['bytes']} bytes)"))


@memory_app.command("import")
def import_cmd(
    name: str,
    file: str = typer.Argument(..., help="Parquet or Arrow edit table."),
    job_id: Optional[str] = typer.Option(None, "--job-id", help="Job id recorded on rows that have none."),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
) -> None:
    """Add a file's rows to a memory (created from the file's metadata if missing); existing edit ids are skipped."""
    with _store(store, redis_url, as_json) as s:
        v = s.import_table(name, file, job_id=job_id)
        _emit(v.to_dict(), as_json, lambda: _out.print(
            f"{name} v{v.version}: every edit id is already present, nothing imported ({v.n_rows} rows)"
            if v.op == NOOP else f"{name} v{v.version}: imported {v.n_added} row(s), {v.n_rows} rows"))


@memory_app.command("compact")
def compact_cmd(
    name: str,
    retain_from: Optional[int] = typer.Option(None, "--retain-from", help="Drop versions older than this one."),
    store: Optional[str] = StoreOpt, redis_url: Optional[str] = RedisOpt, as_json: bool = JsonOpt,
) -> None:
    """Rewrite a memory into few fragments; optionally drop versions older than --retain-from."""
    with _store(store, redis_url, as_json) as s:
        r = s.compact(name, retain_from=retain_from)
        _emit(r, as_json, lambda: _out.print(
            f"{name} v{r['version']}: {r['fragments_before']} -> {r['fragments_after']} fragments; history from v{r['oldest_version']}"))


def main() -> None:  # pragma: no cover - for `python -m store.cli`
    memory_app(prog_name="kvedit memory")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
