"""Train a REP robust-key adapter for a store memory and commit it as the memory's next version.

The adapter (`editing.rep.RobustKeys`) is trained on the memory's own rows and the subject
rephrasings of the records they were made from, stored as a content-addressed artifact, and
named in the router config of a new version (no rows change). Serving replicas that follow the
memory load it with that version and route through it (`serving.memory.MemoryFollower`).
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)


def match_records(table, records) -> tuple[list[int], list]:
    """Pair memory rows with the records they were edited from, by (prompt, subject).

    Returns (row indices, records) for the rows that have a record; a record matching no row is
    an error naming it (its edit is not in the memory).
    """
    from editing.records import EditRecordError

    where = {}
    for i, (p, s) in enumerate(zip(table.column("prompt").to_pylist(), table.column("subject").to_pylist())):
        where.setdefault((p, s), i)
    rows, reqs = [], []
    for n, r in enumerate(records):
        i = where.get((r.prompt, r.subject))
        if i is None:
            raise EditRecordError(n, "prompt", f"({r.prompt!r}, subject {r.subject!r}) has no row in the memory",
                                  case_id=getattr(r, "case_id", None))
        rows.append(i)
        reqs.append(r)
    return rows, reqs


def train_robust_keys(editor, st, memory: str, records, hp=None, seed: int = 0, negative_text: str | None = None,
                      message: str = "") -> dict:
    """Fit an adapter for `memory`'s current rows and commit it (artifact + router config).

    records: `EditRequest`s of (some of) the memory's rows, with `subject_rephrases` to train on.
    Returns {"memory", "version", "artifact", "rows", "seconds"}. Nothing is committed when
    training fails; a memory changed by another writer meanwhile gets the adapter on its newer
    version (the adapter only rewrites queries, rows added since are routed as before).
    """
    from cluster.commit import memory_stats
    from editing.rep import ARTIFACT_KIND, RobustKeyHparams, fit_robust_keys
    from editing.stats import corpus_half, default_corpus_path
    from editing.table import table_tensors

    hp = hp or RobustKeyHparams()
    t0 = time.perf_counter()
    info, table = st.load(memory, spec=editor.spec)
    rows, reqs = match_records(table, records)
    if not reqs:
        raise ValueError(f"memory {memory!r} v{info.version}: no records to train robust keys on")
    if not any(r.subject_rephrases for r in reqs):
        raise ValueError("robust keys train on subject rephrasings; none of the records has `subject_rephrase`")
    ids, keys, residuals = table_tensors(table, editor.spec)
    routed = editor.new_memory(router=info.router.get("name", "cosine"), threshold=info.router.get("threshold"),
                               stats=memory_stats(st, editor.spec, info.router))
    routed.add(ids, keys, residuals)
    text = negative_text if negative_text is not None else corpus_half(default_corpus_path().read_text(), "first")
    adapter = fit_robust_keys(editor, routed, reqs, keys[torch.tensor(rows)], text,
                              rephrases=slice(0, None), hp=hp, seed=seed)
    key = adapter.digest()
    st.put_artifact(ARTIFACT_KIND, key, adapter.to_bytes(),
                    {"memory": memory, "trained_on_version": info.version, "rows": len(rows), **adapter.config()})
    v = st.commit(memory, router_patch={"robust_keys": {"artifact": key, **adapter.config(), "rows": len(rows),
                                                        "trained_on_version": info.version}},
                  message=message or f"robust keys trained on {len(rows)} rows")
    seconds = round(time.perf_counter() - t0, 2)
    log.info("memory %r v%d: robust keys %s (%d rows, %.1fs)", memory, v.version, key, len(rows), seconds)
    return {"memory": memory, "version": v.version, "artifact": key, "rows": len(rows), "seconds": seconds}


def drop_robust_keys(st, memory: str) -> dict:
    """Commit a version without the adapter. Returns {"memory", "version"}."""
    v = st.commit(memory, router_patch={"robust_keys": None}, message="robust keys removed")
    return {"memory": memory, "version": v.version}
