"""Where memories live and how Lance datasets are opened, with Lance errors turned into store errors.

A store root is a local directory (the embedded default) or any URI Lance's object store
understands (`s3://`, `gs://`, `az://`, `memory://`...). Each memory is one Lance dataset at
`<root>/<name>.lance`; `_catalog.lance` and `_artifacts.lance` sit next to them.

Lance version = kvedit version + 1: the empty dataset written by `create` is Lance version 1,
kvedit version 0.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import lance

from .errors import CorruptMemoryError, InvalidNameError, MemoryNotFoundError, StoreError, VersionNotFoundError, where

STORE_ENV = "KVEDIT_STORE"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_U64_MAX = 2**64 - 1

_SESSION: lance.Session | None = None


def session() -> lance.Session:
    """One Lance session per process: shares metadata caches, and makes `memory://` stores process-wide."""
    global _SESSION
    if _SESSION is None:
        _SESSION = lance.Session()
    return _SESSION


_KEEP: dict[str, lance.LanceDataset] = {}


def keep_alive(uri: str, ds: lance.LanceDataset) -> lance.LanceDataset:
    """Hold one dataset per `memory://` URI for the life of the process.

    Lance keeps in-memory object stores only while something references them; without this
    a `memory://` memory would vanish as soon as the object that created it is collected.
    """
    if uri.startswith("memory://") and uri not in _KEEP:
        _KEEP[uri] = ds
    return ds


def default_root() -> str:
    return os.environ.get(STORE_ENV) or str(Path("~/.cache/kvedit/store").expanduser())


def normalize_root(uri: str | os.PathLike | None) -> tuple[str, bool]:
    """(root URI without trailing slash, is_local). Local roots are made absolute and created."""
    raw = str(uri) if uri is not None else default_root()
    if raw.startswith("file://"):
        raw = raw[len("file://"):]
    if "://" not in raw:
        path = Path(raw).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission
            raise StoreError(f"store {raw!r}: cannot use it as a store directory: {exc}") from exc
        return str(path), True
    return raw.rstrip("/"), False


def store_id(root: str) -> str:
    return hashlib.sha1(root.encode()).hexdigest()[:12]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name.endswith(".lance"):
        raise InvalidNameError(
            f"memory {name!r}: invalid name (letters, digits, '.', '_', '-'; starting with a letter or digit; at most 128)",
            str(name),
        )
    return name


def lance_version(version: int) -> int:
    return version + 1


def kv_version(lance_v: int) -> int:
    return lance_v - 1


def _manifest_version(message: str) -> int | None:
    """The kvedit version of the manifest named in a Lance error, if any (V1 or V2 manifest names)."""
    m = re.search(r"_versions/(\d+)\.manifest", message)
    if not m:
        return None
    n = int(m.group(1))
    lv = _U64_MAX - n if n > 2**63 else n
    return kv_version(lv)


def _not_found(message: str) -> bool:
    low = message.lower()
    return "not found" in low or "no such file" in low or "does not exist" in low


def open_dataset(
    uri: str, memory: str, version: int | None = None, storage_options: dict | None = None
) -> lance.LanceDataset:
    """The dataset of `memory` at kvedit `version` (latest if None), or a store error naming both."""
    try:
        return keep_alive(uri, lance.dataset(
            uri, version=None if version is None else lance_version(version),
            session=session(), storage_options=storage_options,
        ))
    except (ValueError, OSError, RuntimeError) as exc:
        msg = str(exc)
        if _not_found(msg):
            missing = MemoryNotFoundError(f"{where(memory)}: no such memory in {uri.rsplit('/', 1)[0]}", memory)
            if version is None:
                raise missing from exc
            try:
                latest = lance.dataset(uri, session=session(), storage_options=storage_options)
            except (ValueError, OSError, RuntimeError):
                raise missing from exc
            versions = [kv_version(v["version"]) for v in latest.versions()]
            raise VersionNotFoundError(
                f"{where(memory, version)}: no such version (available: {_ranges(versions)})", memory, version
            ) from exc
        bad = _manifest_version(msg)
        if bad is None and version is None:
            bad = _latest_local_version(uri)
        raise CorruptMemoryError(
            f"{where(memory, bad if bad is not None else version)}: corrupt or truncated manifest: {msg}",
            memory, bad if bad is not None else version,
        ) from exc


def _latest_local_version(uri: str) -> int | None:
    """The newest kvedit version whose manifest file exists, for local datasets (to name it in errors)."""
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path or not os.path.isdir(os.path.join(path, "_versions")):
        return None
    numbers = [int(n.split(".")[0]) for n in os.listdir(os.path.join(path, "_versions")) if re.fullmatch(r"\d+\.manifest", n)]
    if not numbers:
        return None
    return max(kv_version(_U64_MAX - n if n > 2**63 else n) for n in numbers)


def _ranges(versions: list[int]) -> str:
    if not versions:
        return "none"
    versions = sorted(versions)
    if versions == list(range(versions[0], versions[-1] + 1)):
        return f"{versions[0]}..{versions[-1]}"
    return ", ".join(map(str, versions[:20])) + (" ..." if len(versions) > 20 else "")


def data_error(exc: Exception, memory: str, version: int, what: str = "read") -> CorruptMemoryError:
    """A `CorruptMemoryError` for a failed read of data or deletion files."""
    return CorruptMemoryError(f"{where(memory, version)}: cannot {what} the memory's files (corrupt or truncated?): {exc}", memory, version)


def append_rows(uri: str, table, storage_options: dict | None = None, attempts: int = 20) -> None:
    """Append rows to a small side dataset (catalog, artifacts), creating it on first use.

    Lance appends commute, so concurrent writers never conflict; only two first writers can
    race to create the dataset, and the loser simply appends.
    """
    import time

    last: Exception | None = None
    for i in range(attempts):
        try:
            try:
                lance.dataset(uri, session=session(), storage_options=storage_options)
                mode = "append"
            except (ValueError, OSError) as exc:
                if not _not_found(str(exc)):
                    raise
                mode = "create"
            keep_alive(uri, lance.write_dataset(table, uri, mode=mode, session=session(), storage_options=storage_options))
            return
        except OSError as exc:  # lost a create race or a commit race: retry as an append
            last = exc
            time.sleep(0.01 * (i + 1))
    raise OSError(f"{uri}: could not append after {attempts} attempts: {last}")
