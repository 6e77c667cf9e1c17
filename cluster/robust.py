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

from editing.rep import RETRAIN_GROWTH, RETRAIN_MAX_ROWS, retrain_rows  # noqa: F401 - re-exported for callers
from store.artifacts import REPHRASES_KIND, read_rephrases

log = logging.getLogger(__name__)


def match_records(table, records) -> tuple[list[int], list]:
    """Pair memory rows with the records they were edited from: by (prompt, subject, target_new), else by
    (prompt, subject) with the newest such row.

    Returns (row indices, records); a record matching no row is an error naming it (its edit is not in the
    memory).
    """
    from editing.records import EditRecordError

    cols = [table.column(c).to_pylist() for c in ("prompt", "subject", "target_new")]
    exact, loose = {}, {}
    for i, (p, s, t) in enumerate(zip(*cols)):
        exact.setdefault((p, s, t), i)
        loose[(p, s)] = i
    rows, reqs = [], []
    for n, r in enumerate(records):
        i = exact.get((r.prompt, r.subject, r.target_new), loose.get((r.prompt, r.subject)))
        if i is None:
            where = r.where(n) if hasattr(r, "where") else {"index": n, "case_id": getattr(r, "case_id", None)}
            raise EditRecordError(field="prompt", reason=f"({r.prompt!r}, subject {r.subject!r}) has no row in the "
                                  "memory", **where)
        rows.append(i)
        reqs.append(r)
    return rows, reqs


KEEP = "keep"  # `train_robust_keys(retrain_growth=KEEP)`: the memory's current setting (a new adapter: the default)


def retrain_due(router: dict | None, n_rows: int) -> bool:
    """True when a memory of `n_rows` rows with this router config retrains its adapter after a job
    (`editing.rep.retrain_rows`: its growth share past the rows it was trained on, up to the row cap).
    Rows are counted, not compared: rows deleted and replaced by as many new ones do not trigger a retrain."""
    window = retrain_rows((router or {}).get("robust_keys"))
    return window is not None and window[0] <= n_rows <= window[1]


class RetrainBackoff:
    """Per memory: after a retrain failed, the retrains later jobs find due wait `base` seconds, doubling
    with each further failure up to `16 * base`; a retrain that lands clears it. In-process (a restarted
    coordinator tries at once), so a memory whose retrain keeps failing (an actor timeout, a corrupt
    artifact) does not hold every job that grows it for another full attempt."""

    MAX_DOUBLINGS = 4

    def __init__(self, base: float, clock=time.monotonic):
        self.base = base
        self.clock = clock
        self._failed: dict[str, tuple[int, float]] = {}  # memory -> (failures in a row, retry not before)

    def wait(self, memory: str) -> float:
        """Seconds until `memory` may retrain again (0: now)."""
        failures, until = self._failed.get(memory, (0, 0.0))
        return max(0.0, until - self.clock()) if failures else 0.0

    def failed(self, memory: str) -> float:
        """Count a failure; returns the delay before the next try."""
        failures = self._failed.get(memory, (0, 0.0))[0] + 1
        delay = self.base * 2 ** min(failures - 1, self.MAX_DOUBLINGS)
        self._failed[memory] = (failures, self.clock() + delay)
        return delay

    def succeeded(self, memory: str) -> None:
        self._failed.pop(memory, None)


def train_robust_keys(editor, st, memory: str, records=(), hp=None, seed: int = 0, negative_text: str | None = None,
                      message: str = "", retrain_growth: float | None | str = KEEP,
                      records_by_id: dict | None = None) -> dict:
    """Fit an adapter on every row of `memory` and commit it (artifacts + router config).

    records: `EditRequest`s of (some of) the memory's rows, paired by `match_records` (a record matching no
    row is an error naming it); records_by_id: {edit_id: EditRequest} (ids no longer in the memory are
    skipped). Their `subject_rephrases` join those the previous adapter was trained on (stored with it as a
    `REPHRASES_KIND` artifact), so a retrain needs only the new rows' records. Every row trains on its own
    prompt, a shuffled subject and a long unrelated prefix; rows with rephrasings on those too.
    hp: `RobustKeyHparams` (None: the steps the memory's adapter was trained with).
    retrain_growth: written into the config (None: retrain only by hand; `KEEP`: as it is); see `retrain_due`.
    A calibrated memory gets its threshold re-chosen through the new adapter in the same version.
    The commit is conditional on the memory's adapter entry being the one read here: a removal or another
    retrain meanwhile wins (`CommitConflictError`, nothing committed). Rows added meanwhile are kept and
    count as growth; a threshold a job calibrated meanwhile (through the old adapter) is re-chosen through
    the new one before committing, so the two always match.
    Returns {"memory", "version", "artifact", "rows", "rephrased_rows", "threshold", "seconds"}.
    """
    from cluster.commit import CALIBRATED_ATTEMPTS, calibrated_router, memory_stats
    from store import CommitConflictError
    from editing.records import EditRequest
    from editing.rep import ARTIFACT_KIND, RobustKeyHparams, fit_robust_keys
    from editing.stats import corpus_half, default_corpus_path
    from editing.table import table_tensors

    t0 = time.perf_counter()
    info, table = st.load(memory, spec=editor.spec)
    where = f"memory {memory!r} v{info.version}"
    current = info.router.get("robust_keys") or None
    if retrain_growth == KEEP:
        retrain_growth = current.get("retrain_growth") if current else RETRAIN_GROWTH
    if retrain_growth is not None and not retrain_growth > 0:
        raise ValueError(f"retrain_growth must be > 0 (or None: retrain by hand), not {retrain_growth!r}")
    hp = hp or RobustKeyHparams(steps=(current or {}).get("steps", RobustKeyHparams.steps))
    if not table.num_rows:
        raise ValueError(f"{where} has no rows to train robust keys on")
    ids, keys, residuals = table_tensors(table, editor.spec)
    rephrases = read_rephrases(st, info.router, where)
    rows, reqs = match_records(table, records)
    given = {ids[i]: r for i, r in zip(rows, reqs)}
    live = set(ids)
    given.update({e: r for e, r in (records_by_id or {}).items() if e in live and e not in given})  # --data wins
    rephrases.update({e: list(r.subject_rephrases) for e, r in given.items() if r.subject_rephrases})
    rephrases = {e: rephrases[e] for e in ids if e in rephrases}  # deleted rows drop out
    if not rephrases:
        raise ValueError(f"{where}: robust keys train on subject rephrasings, and none of its rows has any "
                         "(give records with `subject_rephrase`)")
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
    patch = {"robust_keys": {"artifact": key, **adapter.config(), "rows": len(ids), "trained_on_version": info.version,
                             "rephrases": rkey, "steps": hp.steps, "retrain_growth": retrain_growth,
                             "retrain_max_rows": (current or {}).get("retrain_max_rows", RETRAIN_MAX_ROWS)}}
    for attempt in range(1, CALIBRATED_ATTEMPTS + 1):
        head = st.info(memory).router  # the threshold is chosen on the rows and config read from here on
        expect = {"robust_keys": current, "threshold": head.get("threshold"), "calibration": head.get("calibration")}
        calibrated = calibrated_router(editor, st, memory, table.slice(0, 0), adapter=adapter) or {}
        try:
            v = st.commit(memory, router_patch={**patch, **calibrated}, router_expect=expect,
                          message=message or f"robust keys trained on {len(ids)} rows ({len(rephrases)} with rephrasings)")
            break
        except CommitConflictError:
            if attempt == CALIBRATED_ATTEMPTS or st.info(memory).router.get("robust_keys") != current:
                raise  # another adapter (or its removal) won; or jobs keep recalibrating: the next job retries
            log.info("memory %r: a job recalibrated its threshold meanwhile; calibrating through the new adapter "
                     "again", memory)
    seconds = round(time.perf_counter() - t0, 2)
    log.info("memory %r v%d: robust keys %s (%d rows, %d rephrased, %.1fs)", memory, v.version, key, len(ids),
             len(rephrases), seconds)
    return {"memory": memory, "version": v.version, "artifact": key, "rows": len(ids),
            "rephrased_rows": len(rephrases), "threshold": calibrated.get("threshold", head.get("threshold")),
            "seconds": seconds}


def records_of_rows(jobs, table, known: set[str]) -> dict:
    """{edit_id: EditRequest} for rows of `table` not in `known` whose job (the row's `job_id`) is still in the
    job store `jobs` (`cluster.jobs.JobStore`): the records a retrain needs for rows whose rephrasings were never
    stored (added by jobs that did not retrain). Rows of deleted jobs, `edit run` and imports are left out."""
    from cluster.jobs import JobNotFoundError, job_edit_id, legacy_job_edit_id
    from editing.records import EditRecordError, parse_record

    missing: dict[str, set[str]] = {}
    for eid, jid in zip(table.column("edit_id").to_pylist(), table.column("job_id").to_pylist()):
        if eid not in known and jid:
            missing.setdefault(jid, set()).add(eid)
    out = {}
    for jid, eids in missing.items():
        try:
            spec = jobs.spec(jid)
        except JobNotFoundError:
            continue
        for i, raw in enumerate(spec.records):
            eid = next((e for e in (job_edit_id(jid, i, raw), legacy_job_edit_id(jid, i)) if e in eids), None)
            if eid is not None:
                try:
                    out[eid] = parse_record(raw, i, spec.source)
                except EditRecordError:
                    continue
    return out


def drop_robust_keys(st, memory: str) -> dict:
    """Commit a version without the adapter. Returns {"memory", "version"}."""
    v = st.commit(memory, router_patch={"robust_keys": None}, message="robust keys removed")
    return {"memory": memory, "version": v.version}
