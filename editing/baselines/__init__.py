"""Baselines kvedit is compared with, selectable by name (`kvedit eval --method NAME`).

One file per method, each registering its class with `@register_baseline`:
- `rome` (rome.py): a rank-one update of the edit layer's down-projection;
- `memit` (memit.py): updates spread over a layer range, with lambda * C0 as in MEMIT;
- `alphaedit` (alphaedit.py): MEMIT's layer range, updates projected on the null space of C0;
- `scr` (scr.py): retrieval in context, the facts stored as text and prepended to the prompt.

The in-place editors share the memory's keys (`editing.keys`), values (`editing.values`) and
statistics (`editing.stats`), and edit a copy of the weights (see `base.WeightEditor`).
"""

from __future__ import annotations

from editing.baselines.base import (BASELINES, Baseline, EditMethod, WeightEditor, baseline_names, make_baseline,
                                    register_baseline)
from editing.baselines import alphaedit, memit, rome, scr  # noqa: F401  (register the methods)

__all__ = ["BASELINES", "Baseline", "EditMethod", "WeightEditor", "baseline_names", "make_baseline", "register_baseline"]
