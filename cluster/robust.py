"""Train a REP robust-key adapter for a store memory and commit it as the memory's next version.

The adapter (`editing.rep.RobustKeys`) is trained on the memory's own rows and the subject
rephrasings of the records they were made from, stored as a content-addressed artifact, and
named in the router config of a new version (no rows change). Serving replicas that follow the
memory load it with that version and route through it (`serving.memory.MemoryFollower`).

The rephrasings it was trained on are stored beside it, so it can be retrained on the whole memory when
rows are added: by hand (`kvedit edit robust-keys` without `--data`), or by the job coordinator after a job
that grew the memory by the config's `retrain_growth` (`retrain_due`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import torch

from store.artifacts import REPHRASES_KIND, read_rephrases

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


RETRAIN_GROWTH = 0.25  # default: retrain after a job leaves the memory 25% more rows than the adapter saw
# Jobs retrain automatically up to this many rows (config "retrain_max_rows" overrides): training computes 13 keys
# per row and scores them against every row, about 10 minutes at 2,000 rows on 2 CPU cores; larger memories are
# retrained by hand (`kvedit edit robust-keys`), where the wait is chosen, not imposed on a job.
RETRAIN_MAX_ROWS = 2000


def retrain_due(router: dict | None, n_rows: int) -> bool:
    """True when the memory's adapter retrains itself (`"retrain_growth"` in its config), the memory now
    holds that share more rows than the adapter was trained on, and no more than `"retrain_max_rows"`
    (default `RETRAIN_MAX_ROWS`). Rows are counted, not compared: rows deleted and replaced by as many new
    ones do not trigger a retrain."""
    rk = (router or {}).get("robust_keys") or {}
    growth, trained = rk.get("retrain_growth"), rk.get("rows")
    if not growth or not trained or n_rows > rk.get("retrain_max_rows", RETRAIN_MAX_ROWS):
        return False
    return n_rows - trained >= growth * trained


def train_robust_keys(editor, st, memory: str, records=(), hp=None, seed: int = 0, negative_text: str | None = None,
                      message: str = "", retrain_growth: float | None = RETRAIN_GROWTH) -> dict:
    """Fit an adapter on every row of `memory` and commit it (artifacts + router config).

    records: `EditRequest`s of (some of) the memory's rows; their `subject_rephrases` join those the previous
    adapter was trained on (stored with it as a `REPHRASES_KIND` artifact), so a retrain needs only the new
    rows' records. Every row trains on its own prompt, a shuffled subject and a long unrelated prefix; rows
    with rephrasings on those too. A record matching no row is an error naming it.
    retrain_growth: written into the config (None: retrain only by hand); see `retrain_due`.
    Returns {"memory", "version", "artifact", "rows", "rephrased_rows", "seconds"}. Nothing is committed when
    training fails; a memory changed by another writer meanwhile gets the adapter on its newer version (the
    adapter only rewrites queries, rows added since are routed as before).
    """
    from cluster.commit import memory_stats
    from editing.records import EditRequest
    from editing.rep import ARTIFACT_KIND, RobustKeyHparams, fit_robust_keys
    from editing.stats import corpus_half, default_corpus_path
    from editing.table import table_tensors

    if retrain_growth is not None and not retrain_growth > 0:
        raise ValueError(f"retrain_growth must be > 0 (or None: retrain by hand), not {retrain_growth!r}")
    t0 = time.perf_counter()
    info, table = st.load(memory, spec=editor.spec)
    hp = hp or RobustKeyHparams(steps=(info.router.get("robust_keys") or {}).get("steps", RobustKeyHparams.steps))
    if not table.num_rows:
        raise ValueError(f"memory {memory!r} v{info.version} has no rows to train robust keys on")
    ids, keys, residuals = table_tensors(table, editor.spec)
    rephrases = read_rephrases(st, info.router, f"memory {memory!r} v{info.version}")
    rows, reqs = match_records(table, records)
    for i, r in zip(rows, reqs):
        if r.subject_rephrases:
            rephrases[ids[i]] = list(r.subject_rephrases)
    rephrases = {e: rephrases[e] for e in ids if e in rephrases}  # deleted rows drop out
    if not rephrases:
        raise ValueError(f"memory {memory!r} v{info.version}: robust keys train on subject rephrasings, and none of "
                         "its rows has any (give records with `subject_rephrase`)")
    col = {c: table.column(c).to_pylist() for c in ("subject", "prompt", "target_new", "target_true")}
    train = [EditRequest(subject=col["subject"][i], prompt=col["prompt"][i], target_new=col["target_new"][i],
                         target_true=col["target_true"][i] or "", subject_rephrases=rephrases.get(e, []))
             for i, e in enumerate(ids)]
    routed = editor.new_memory(router=info.router.get("name", "cosine"), threshold=info.router.get("threshold"),
                               stats=memory_stats(st, editor.spec, info.router))
    routed.add(ids, keys, residuals)
    text = negative_text if negative_text is not None else corpus_half(default_corpus_path().read_text(), "first")
    adapter = fit_robust_keys(editor, routed, train, keys, text, rephrases=slice(0, None), hp=hp, seed=seed)
    key = adapter.digest()
    blob = json.dumps(rephrases, sort_keys=True).encode()
    rkey = hashlib.sha256(blob).hexdigest()[:24]
    st.put_artifact(REPHRASES_KIND, rkey, blob, {"memory": memory, "rows": len(rephrases)})
    st.put_artifact(ARTIFACT_KIND, key, adapter.to_bytes(),
                    {"memory": memory, "trained_on_version": info.version, "rows": len(ids), **adapter.config()})
    patch = {"artifact": key, **adapter.config(), "rows": len(ids), "trained_on_version": info.version,
             "rephrases": rkey, "steps": hp.steps, "retrain_growth": retrain_growth,
             "retrain_max_rows": (info.router.get("robust_keys") or {}).get("retrain_max_rows", RETRAIN_MAX_ROWS)}
    v = st.commit(memory, router_patch={"robust_keys": patch},
                  message=message or f"robust keys trained on {len(ids)} rows ({len(rephrases)} with rephrasings)")
    seconds = round(time.perf_counter() - t0, 2)
    log.info("memory %r v%d: robust keys %s (%d rows, %d rephrased, %.1fs)", memory, v.version, key, len(ids),
             len(rephrases), seconds)
    return {"memory": memory, "version": v.version, "artifact": key, "rows": len(ids),
            "rephrased_rows": len(rephrases), "seconds": seconds}


def drop_robust_keys(st, memory: str) -> dict:
    """Commit a version without the adapter. Returns {"memory", "version"}."""
    v = st.commit(memory, router_patch={"robust_keys": None}, message="robust keys removed")
    return {"memory": memory, "version": v.version}
