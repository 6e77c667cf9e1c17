"""The served model's fingerprint, cached on disk.

`editing.models.fingerprint_folder` hashes every weight, which takes seconds per GB and
would run in every vLLM worker at every start. The value only depends on the folder's
files, so it is cached under `cache_dir()/fingerprints/`, keyed by the path plus the name,
size and modification time of every file it reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from editing.models import cache_dir, fingerprint_folder

logger = logging.getLogger(__name__)


def _cache_key(path: Path) -> str:
    parts = [str(path.resolve())]
    for f in sorted([path / "config.json", *path.glob("*.safetensors")]):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def served_fingerprint(path: str | os.PathLike) -> str:
    """`fingerprint_folder(path)`, computed once per version of the folder's files."""
    path = Path(path)
    key = _cache_key(path)
    cache = cache_dir() / "fingerprints" / f"{key}.json"
    try:
        return json.loads(cache.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    value = fingerprint_folder(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "fingerprint": value}))
        tmp.replace(cache)
    except OSError as exc:  # a read-only cache only costs time
        logger.warning("cannot cache the fingerprint of %s: %s", path, exc)
    return value
