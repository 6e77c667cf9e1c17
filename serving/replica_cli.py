"""`kvedit replica`: change the memories of a running replica (either backend) through its admin endpoint.

    kvedit replica swap URL --memory NAME[@VERSION] [--keep-previous] [--api-key K]
    kvedit replica add URL --memory NAME[@VERSION]
    kvedit replica remove URL --memory NAME
    kvedit replica ls URL

`swap` makes the memory the replica's default (what requests for the plain model name get);
the previous default retires once the requests using it finish. A memory built for another
model or layer is refused (exit code 2, the replica keeps serving what it served).
"""

from __future__ import annotations

import json
from typing import Optional

import httpx
import typer

ADMIN_PATH = "/admin/memory"

replica_app = typer.Typer(help="Swap, add and remove the memories of a running replica.", no_args_is_help=True)


class ReplicaError(RuntimeError):
    """The replica refused or failed an admin call; `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def admin_request(url: str, method: str, path: str = "", body: dict | None = None, api_key: str | None = None,
                  timeout: float = 300.0) -> dict:
    """One admin call; the replica's JSON answer. Raises ReplicaError with the replica's message."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.request(method, url.rstrip("/") + ADMIN_PATH + path, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ReplicaError(0, f"cannot reach the replica at {url}: {exc}") from exc
    try:
        data = r.json()
    except ValueError:
        data = {}
    if r.status_code != 200:
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        raise ReplicaError(r.status_code, f"the replica answered {r.status_code}: {message or r.text[:500]}")
    return data


def swap(url: str, memory: str, api_key: str | None = None, keep_previous: bool = False) -> dict:
    """Make `memory` (NAME or NAME@VERSION) the replica's default memory."""
    return admin_request(url, "POST", body={"memory": memory, "action": "swap", "keep_previous": keep_previous},
                         api_key=api_key)


def _run(call, as_json: bool) -> None:
    try:
        out = call()
    except ReplicaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"default memory: {out.get('default') or 'none (the plain model name is the base model)'}"
               + (f" (was {out['previous'] or 'none'})" if "previous" in out else ""))
    for m in out.get("memories") or []:
        flags = [f for f, on in (("default", m["memory"] == out.get("default")), ("pinned", m.get("pinned")),
                                 ("retiring", m.get("retired"))) if on]
        typer.echo(f"  {m['memory']} v{m['version']}: {m['facts']} facts" + (f" ({', '.join(flags)})" if flags else ""))


_URL = typer.Argument(..., help="the replica's base URL, e.g. http://127.0.0.1:8000")
_KEY = typer.Option(None, "--api-key", envvar="KVEDIT_API_KEY", help="the replica's API key")
_JSON = typer.Option(False, "--json", help="print the replica's answer as JSON")


@replica_app.command("swap")
def swap_command(url: str = _URL,
                 memory: str = typer.Option(..., "--memory", help="NAME to follow, NAME@VERSION to pin"),
                 keep_previous: bool = typer.Option(False, "--keep-previous", help="keep the previous default loaded"),
                 api_key: Optional[str] = _KEY, as_json: bool = _JSON) -> None:
    """Serve MEMORY as the replica's memory, between two forward steps (the old one retires)."""
    _run(lambda: swap(url, memory, api_key, keep_previous), as_json)


@replica_app.command("add")
def add_command(url: str = _URL, memory: str = typer.Option(..., "--memory", help="NAME or NAME@VERSION"),
                api_key: Optional[str] = _KEY, as_json: bool = _JSON) -> None:
    """Load one more memory; requests choose it with the model MODEL:NAME."""
    _run(lambda: admin_request(url, "POST", body={"memory": memory, "action": "add"}, api_key=api_key), as_json)


@replica_app.command("remove")
def remove_command(url: str = _URL, memory: str = typer.Option(..., "--memory", help="NAME"),
                   api_key: Optional[str] = _KEY, as_json: bool = _JSON) -> None:
    """Stop serving a memory (it stays loaded until the requests using it finish)."""
    _run(lambda: admin_request(url, "DELETE", f"/{memory}", api_key=api_key), as_json)


@replica_app.command("ls")
def ls_command(url: str = _URL, api_key: Optional[str] = _KEY, as_json: bool = _JSON) -> None:
    """The memories a replica serves and its default."""
    _run(lambda: admin_request(url, "GET", api_key=api_key), as_json)
