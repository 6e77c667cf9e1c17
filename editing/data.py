"""Where the shared evaluation data lives (`$KVEDIT_DATA`, else the nearest `shared/data` above)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The shared data folder: `$KVEDIT_DATA`, or `shared/data` beside the repo or the working directory."""
    env = os.environ.get("KVEDIT_DATA")
    if env:
        return Path(env)
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for p in [start, *start.parents]:
            cand = p / "shared" / "data"
            if cand.is_dir():
                return cand
    raise FileNotFoundError("shared data folder not found: set KVEDIT_DATA or keep ../shared/data beside the repo")


def data_file(name: str) -> Path:
    """A file of the shared data folder, e.g. `counterfact_valid.json`; plain paths pass through."""
    p = Path(name)
    if p.exists():
        return p
    cand = data_dir() / name
    if not cand.exists():
        raise FileNotFoundError(f"{name}: not a file, and not in {data_dir()}")
    return cand
