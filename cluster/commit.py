"""Commit computed edits into a named store memory (shared by `edit run` and the job workers).

A memory's router config is `{"name", "threshold"}` with a fixed threshold, or a calibrated one
(docs/adr/0006-calibrated-gates.md):

    {"name": "cosine", "threshold": 0.71, "calibrate": true, "calibration": {"false_gate_rate": ..., ...}}

For a calibrated memory every commit first re-chooses the threshold (`editing.calibrate`) on the
rows the memory will hold after the commit, and writes it with its statistics into the router
config of the new version, in the same store transaction; serving applies it with the rows.
`"calibrate"` may also be a dict of `CalibrationConfig` fields (e.g. `{"target_rate": 1e-4}`).
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

AUTO = "auto"
# New memories are calibrated unless given a fixed threshold: at the false-gate-rate bound with 3e-3 of the
# negatives allowed, which matches the best fixed threshold on counterfact_valid (benchmarks/RESULTS.md,
# 2026-12-07 "Calibrated gates by default") and, unlike it, rises as the memory grows.
CALIBRATE_BY_DEFAULT = True
DEFAULT_CALIBRATION = {"target_rate": 3e-3, "placement": 0.0}  # `editing.calibrate.CalibrationConfig` fields


def router_config(name: str, threshold: float | str | None) -> dict:
    """The router configuration a new memory is bound to.

    threshold: a number (fixed), "auto" (calibrated at every commit with `DEFAULT_CALIBRATION`), or
    None: calibrated when `CALIBRATE_BY_DEFAULT`, else the router's default threshold. The calibration
    settings are written into the memory's config, so a later change of the defaults leaves it as it is.
    """
    from editing.routers import ROUTERS

    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(sorted(ROUTERS))}")
    default = ROUTERS[name].default_threshold
    if threshold == AUTO or (threshold is None and CALIBRATE_BY_DEFAULT):
        return {"name": name, "threshold": default, "calibrate": dict(DEFAULT_CALIBRATION)}
    if isinstance(threshold, str):
        raise ValueError(f"threshold must be a number or {AUTO!r}, not {threshold!r}")
    return {"name": name, "threshold": default if threshold is None else ROUTERS[name].check_threshold(threshold)}


def is_calibrated(config: dict) -> bool:
    return bool((config or {}).get("calibrate"))


CALIBRATED_ATTEMPTS = 3  # a calibrated commit recalibrates and retries when an adapter retrain lands meanwhile


def calibrated_through(router: dict | None, patch: dict | None) -> dict | None:
    """`router_expect` for committing a recalibrated `patch`: the REP adapter entry of the config the threshold
    was chosen with must still be the head's, else a retrain committed meanwhile and the threshold does not fit
    its adapter (`CommitConflictError`; recalibrate). None when `patch` sets no threshold."""
    if not patch or "threshold" not in patch:
        return None
    return {"robust_keys": (router or {}).get("robust_keys")}


def open_store(store: str | None = None, redis_url: str | None = None):
    from store import MemoryStore

    return MemoryStore(store, redis_url=redis_url)


def ensure_memory(st, memory: str, spec, router: str, threshold: float | str | None = None,
                  create: bool = True) -> dict | None:
    """Create `memory` if missing, bound to `spec` and the router; return its router config.

    An existing memory must match `spec` and the router name. Its threshold is kept when
    `threshold` is None; a number must equal its fixed threshold, and "auto" needs a calibrated
    memory (`MemoryMismatchError` otherwise, nothing written). With `create=False` nothing is
    ever written: a missing memory returns None (a check before a long computation).
    """
    from editing.table import MemoryMismatchError

    wanted = router_config(router, threshold)
    if not st.exists(memory):
        if not create:
            return None
        st.create(memory, spec, wanted, exist_ok=True)
    info = st.info(memory)
    info.check(spec)
    have = info.router
    if have.get("name", "cosine") != router:  # a config without a name (older imports) means cosine, as serving reads it
        raise MemoryMismatchError(f"memory {memory!r} v{info.version} uses router {have.get('name')!r}, not {router!r}")
    if threshold is not None and (is_calibrated(wanted) != is_calibrated(have)
                                  or (not is_calibrated(have) and have.get("threshold") != wanted["threshold"])):
        now = "calibrated" if is_calibrated(have) else f"fixed at {have.get('threshold')}"
        raise MemoryMismatchError(f"memory {memory!r} v{info.version} has its threshold {now}, not {threshold!r}")
    return have


def calibrated_router(editor, st, memory: str, table: pa.Table, requests: dict | None = None, stats=None,
                      adapter=None) -> dict | None:
    """The router-config patch (`threshold`, `calibration`: `MemoryStore.commit(router_patch=...)`) for the
    version committing `table` into `memory`; None unless it is calibrated. The threshold is chosen on the
    rows read here; rows another writer commits meanwhile are covered by the next calibrated commit.

    editor: an `Editor` of the memory's model and layer. requests: edit_id -> `EditRequest` of the
    new rows (their paraphrases become positives too). stats: C0 for the whitened router
    (default: the one the memory names, else `editor.stats()`). Queries pass through the memory's REP
    adapter when it has one, as they do when served (`adapter`: a `RobustKeys` to gate through instead, the one
    a retrain is about to commit). Rows already in the memory are kept as they are (skip_existing).
    """
    from editing.calibrate import CalibrationConfig, calibrate, fact_prompts
    from editing.table import table_tensors
    from store.artifacts import read_robust_keys

    info, current = st.load(memory, spec=editor.spec)
    if not is_calibrated(info.router):
        return None
    new = table.filter(pc.invert(pc.is_in(table.column("edit_id"), value_set=current.column("edit_id"))))
    rows = pa.concat_tables([current, new.select(current.schema.names).cast(current.schema)])
    name = info.router["name"]
    routed = editor.new_memory(router=name, stats=stats if stats is not None else memory_stats(st, editor.spec, info.router))
    ids, keys, residuals = table_tensors(rows, editor.spec)
    routed.add(ids, keys, residuals)
    if adapter is None:
        adapter = read_robust_keys(st, info.router, editor.spec.d_key, f"memory {memory!r} v{info.version}")
    routed.query_adapter = None if adapter is None else adapter.to(routed.rows.device)  # gate what replicas gate
    facts = list(zip(ids, rows.column("subject").to_pylist(), rows.column("prompt").to_pylist()))
    requests = requests or {}
    facts += [f for f in fact_prompts(list(requests), list(requests.values())) if f[2] != requests[f[0]].prompt]
    options = info.router["calibrate"] if isinstance(info.router["calibrate"], dict) else {}
    cal = calibrate(editor, routed, facts, CalibrationConfig(**options))
    if cal is None:
        return None
    log.info("memory %r: calibrated %s threshold %.4f (recall %.3f, false-gate rate %.2g, %s)", memory, name,
             cal.threshold, cal.recall, cal.false_gate_rate, cal.objective)
    return {"threshold": round(cal.threshold, 6), "calibration": cal.to_dict()}


def memory_stats(st, spec, router: dict):
    """C0 a whitened memory routes with: the artifact its router config names (None: not whitened, or
    no statistics named yet). Once named it never changes, so every replica and every later commit,
    calibration and adapter uses the same C0 (`store.artifacts.read_second_moment`)."""
    from store.artifacts import read_second_moment

    if router.get("name") != "whitened" or not router.get("stats"):
        return None
    return read_second_moment(st, spec.model_fingerprint, spec.layer, router["stats"])


def stats_patch(editor, st, have: dict) -> dict | None:
    """For a whitened memory that names no statistics yet: put the editor's C0 in the store (artifact
    "stats", `store.artifacts.stats_key`, as jobs do) and return the router-config patch naming it, so
    replicas on other hosts route with the statistics the edits were made with. None otherwise."""
    from store.artifacts import STATS_KIND, stats_key

    if have.get("name") != "whitened" or have.get("stats"):
        return None
    c0 = editor.stats()
    key = stats_key(editor.spec.model_fingerprint, editor.layer, c0.meta.get("corpus_hash", "unknown"))
    if st.find_artifact(STATS_KIND, key) != key:
        st.put_artifact(STATS_KIND, key, c0.to_bytes(), {**c0.meta, "tokens": c0.count})
    return {"stats": key}


def commit_edits(editor, table: pa.Table, memory: str, store: str | None, redis_url: str | None, router: str,
                 threshold: float | str | None = None, job_id: str | None = None, records: list | None = None) -> dict:
    """Create `memory` if needed (bound to the editor's model, layer and router) and commit `table`.

    records: the `EditRequest`s of `table`'s rows, in order (their paraphrases help calibration).
    Returns {"memory", "version", "store", "threshold"} (+ "calibration" for a calibrated memory).
    Raises the store's errors (mismatched spec or router, unreachable Redis) before anything is written.
    """
    from store import CommitConflictError

    requests = dict(zip(table.column("edit_id").to_pylist(), records)) if records else None
    with open_store(store, redis_url) as st:
        for attempt in range(1, CALIBRATED_ATTEMPTS + 1):
            have = ensure_memory(st, memory, editor.spec, router, threshold)
            stats = memory_stats(st, editor.spec, have)
            # retrains keep landing: the last attempt keeps the edits and the threshold the last retrain chose
            calibrate = is_calibrated(have) and attempt < CALIBRATED_ATTEMPTS
            update = calibrated_router(editor, st, memory, table, requests, stats) if calibrate else None
            expect = calibrated_through(have, update)
            update = {**(update or {}), **(stats_patch(editor, st, have) or {})} or None
            try:
                v = st.commit(memory, add=table, message=f"edit run: {table.num_rows} edits", job_id=job_id,
                              router_patch=update, router_expect=expect)
                break
            except CommitConflictError:  # a new REP adapter landed while calibrating: nothing written, again
                if attempt == CALIBRATED_ATTEMPTS:
                    raise
                log.info("memory %r: its robust keys changed while calibrating; calibrating again", memory)
    cfg = {**have, **(update or {})}
    out = {"memory": memory, "version": v.version, "store": st.root, "threshold": cfg.get("threshold")}
    if "calibration" in cfg:
        out["calibration"] = cfg["calibration"]
    return out
