"""Calibrated gates against the best fixed threshold of a sweep (issue 7, `kvedit bench calibration`).

One set of edits is computed on the unedited model and attached under each router; between
measurements only the threshold buffer changes, so every point sees the same keys and residuals.
The score is the mean of efficacy, generalization and specificity (`editing.evaluate`).

Three calibrations are measured: with the records' paraphrases as positives (what a commit does
when the records carry paraphrases; those are also the generalization prompts, so that variant
is tuned on data the metric reads), and with the edit prompts alone (nothing the metrics read),
placed at the widest margin (`CalibrationConfig.placement` 0.5) and at the rate bound (0).
The sweep's best point is chosen on the metrics themselves, an oracle no deployment has.
"""

from __future__ import annotations

import json
import sys
import time

SWEEP = {"cosine": (0.5, 0.6, 0.65, 0.7, 0.8, 0.9), "whitened": (0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
         "margin": (0.5, 0.6, 0.7, 0.8, 0.9)}


def _metrics(ed, reqs) -> dict:
    from editing.evaluate import efficacy, generalization, neighborhood

    m = {"efficacy": efficacy(ed, reqs), "generalization": generalization(ed, reqs), "specificity": neighborhood(ed, reqs)}
    m["average"] = sum(m.values()) / 3
    return {k: round(v, 4) for k, v in m.items()}


def _edits(ed, reqs, edits_dir: str | None):
    """The edits of `reqs`: computed, or the residuals of `kvedit edit run --out DIR` output of the
    same records with keys recomputed by the current `Editor.keys` (seconds; a residual does not
    depend on its key, so key settings can change without re-optimising)."""
    from editing.table import build_edit_table, make_edit_id, read_edit_table, table_tensors

    if edits_dir is None:
        return ed.compute(reqs).table
    spec, table = read_edit_table(edits_dir)
    ed.spec.check(spec, f"edits in {edits_dir}")
    want = [make_edit_id(spec.model_fingerprint, spec.layer, r.subject, r.prompt, r.target_new) for r in reqs]
    if table.column("edit_id").to_pylist() != want:
        raise ValueError(f"{edits_dir}: its edits are not those of the first {len(reqs)} records of counterfact_valid.json")
    ids, _, residuals = table_tensors(table, spec)
    return build_edit_table(spec, reqs, ed.keys(reqs).cpu(), residuals, edit_ids=ids)


def bench_calibration(model: str = "smollm2-135m", n_edits: int = 100, layer: int = 6,
                      routers: tuple[str, ...] = ("cosine", "whitened"), edits_dir: str | None = None,
                      sweep: dict | None = None, rates: tuple[float, ...] = ()) -> dict:
    """Per router: metrics at each fixed threshold of `SWEEP` and at the calibrated thresholds.

    edits_dir: reuse edits written by `kvedit edit run counterfact_valid.json --limit N --out DIR`.
    sweep: fixed thresholds per router instead of `SWEEP` (e.g. only a sweep's best points, re-measured).
    rates: further rate-bound calibrations (edit prompts as positives, placement 0), one per
        `CalibrationConfig.target_rate`, reported under "rate_points".
    """
    from editing import Editor, load_records
    from editing.calibrate import CalibrationConfig, calibrate, fact_prompts
    from editing.data import data_file

    ed = Editor.load(model, layer=layer)
    reqs = load_records(data_file("counterfact_valid.json"), limit=n_edits)
    t0 = time.perf_counter()
    table = _edits(ed, reqs, edits_dir)
    edit_ids = table.column("edit_id").to_pylist()
    out = {"benchmark": "calibration", "data": "counterfact_valid.json", "n_edits": len(reqs), "layer": ed.layer,
           "compute_seconds": round(time.perf_counter() - t0, 1), "unedited": _metrics(ed, reqs), "routers": {}}
    for name in routers:
        mem = ed.attach(table, router=name)
        with_paraphrases = calibrate(ed, mem, fact_prompts(edit_ids, reqs))
        prompt_facts = [(e, r.subject, r.prompt) for e, r in zip(edit_ids, reqs)]
        prompts_only = calibrate(ed, mem, prompt_facts)
        at_rate = calibrate(ed, mem, prompt_facts, CalibrationConfig(placement=0.0))
        points = [("fixed", t) for t in (sweep or SWEEP)[name]]
        at_rates = [calibrate(ed, mem, prompt_facts, CalibrationConfig(placement=0.0, target_rate=r)) for r in rates]
        points += [(f"calibrated at rate {r:g}", c.threshold) for r, c in zip(rates, at_rates)]
        points += [("calibrated", with_paraphrases.threshold), ("calibrated, prompts only", prompts_only.threshold),
                   ("calibrated, prompts only, at the rate bound", at_rate.threshold)]
        rows = []
        for label, thr in points:
            mem.threshold.fill_(thr)
            rows.append({"label": label, "threshold": round(thr, 4), **_metrics(ed, reqs)})
            print(json.dumps({"router": name, **rows[-1]}), file=sys.stderr, flush=True)  # progress: a long run
        ed.detach()
        best = max((r for r in rows if r["label"] == "fixed"), key=lambda r: r["average"])
        cal, bare, loose = rows[-3], rows[-2], rows[-1]
        out["routers"][name] = {
            "points": rows, "best_fixed": best, "calibrated": cal, "calibrated_prompts_only": bare,
            "delta_vs_best_fixed": round(cal["average"] - best["average"], 4),
            "delta_prompts_only_vs_best_fixed": round(bare["average"] - best["average"], 4),
            "calibrated_at_rate_bound": loose,
            "delta_at_rate_bound_vs_best_fixed": round(loose["average"] - best["average"], 4),
            "calibration": with_paraphrases.to_dict(), "calibration_prompts_only": prompts_only.to_dict(),
            "calibration_at_rate_bound": at_rate.to_dict(),
            "rate_points": [{"target_rate": r, **p, "delta_vs_best_fixed": round(p["average"] - best["average"], 4),
                             "calibration": c.to_dict()}
                            for r, c, p in zip(rates, at_rates, rows[len(rows) - 3 - len(rates): len(rows) - 3])],
        }
    out["calibrated_matches_best_fixed"] = all(r["delta_vs_best_fixed"] >= 0 for r in out["routers"].values())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
