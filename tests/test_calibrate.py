"""Calibrated gates: the threshold objective, on the real model, through a commit and `kvedit memory show`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from editing.calibrate import CalibrationConfig, calibrate, choose_threshold, fact_prompts, negative_keys, route_scores

# Small samples keep the test fast; a 1% target over 2048 WikiText tokens allows 20 false gates.
CONFIG = {"target_rate": 0.01, "negative_tokens": 2048}


def test_threshold_objective_on_known_scores():
    neg = torch.linspace(0.0, 0.5, 1000)  # 1000 negatives up to 0.5
    pos = torch.tensor([0.7, 0.8, 0.9, float("-inf")])  # one positive routed to another edit
    thr, objective = choose_threshold(pos, neg, target_rate=0.01, min_recall=0.5)
    assert objective == "recall_at_rate"
    assert float((neg > thr).float().mean()) <= 0.01
    assert (pos > thr).sum() == 3 and thr < 0.7, thr  # every correctly routed positive fires
    lo = float(neg.sort(descending=True).values[10])  # the highest negative the rate allows
    assert thr == pytest.approx((lo + 0.7) / 2)  # default placement: the widest margin
    loose, _ = choose_threshold(pos, neg, target_rate=0.01, min_recall=0.5, placement=0.0)
    assert loose == pytest.approx(lo) and float((neg > loose).float().mean()) <= 0.01  # the rate bound itself
    tight, _ = choose_threshold(pos, neg, target_rate=0.01, min_recall=0.5, placement=1.0)
    assert tight == pytest.approx(0.7) and (pos > tight).sum() == 2  # at the next positive, which then misses

    overlap = torch.tensor([0.3, 0.35, 0.4, 0.45])  # inside the negatives: the rate target leaves no recall
    thr, objective = choose_threshold(overlap, neg, target_rate=0.01, min_recall=0.5)
    tpr, fpr = float((overlap > thr).float().mean()), float((neg > thr).float().mean())
    best = max(0.5 * (float((overlap > c).float().mean()) + 1 - float((neg > c).float().mean())) for c in neg.tolist())
    assert objective == "balanced_accuracy" and 0.5 * (tpr + 1 - fpr) == pytest.approx(best)


@pytest.fixture(scope="module")
def edits(smol, cf_valid):
    """Real edits of four CounterFact records. Calibration reads only the keys, so the residuals
    get two optimiser steps, to stay fast."""
    from editing import EditConfig, Editor

    ed = Editor(smol.model, smol.tok, EditConfig.for_model("smollm2-135m", values={"steps": 2}), model_name="smollm2-135m")
    ed._templates = smol.templates
    recs = cf_valid[:4]
    return recs, ed.compute(recs)


def test_threshold_separates_stored_keys_from_held_out_wikitext(smol, edits):
    recs, computed = edits
    cfg = CalibrationConfig(**CONFIG)
    mem = smol.new_memory(router="cosine")
    mem.add(computed.edit_ids, computed.keys, computed.residuals)
    cal = calibrate(smol, mem, fact_prompts(computed.edit_ids, recs), cfg)
    assert cal.objective == "recall_at_rate" and cal.false_gate_rate <= cfg.target_rate
    assert cal.n_positive > len(recs)  # paraphrases containing the subject count as positives
    best, self_score = route_scores(mem, computed.keys)
    assert (self_score > cal.threshold).all() and best.tolist() == [mem.slots[e] for e in computed.edit_ids]
    # A fresh WikiText slice (first half, far from the calibration sample): the rate holds within
    # three binomial standard deviations of the target.
    fresh = negative_keys(smol, tokens=2048, offset=smol.config.stats_tokens + 40_000)
    _, fresh_score = route_scores(mem, fresh)
    rate = float((fresh_score > cal.threshold).float().mean())
    n = fresh.shape[0]
    assert rate <= cfg.target_rate + 3 * math.sqrt(cfg.target_rate * (1 - cfg.target_rate) / n), (rate, cal)
    # Deterministic under the seed, also when a sample of the edits is drawn.
    sampled = CalibrationConfig(**CONFIG, max_edits=2, seed=3)
    again = [calibrate(smol, mem, fact_prompts(computed.edit_ids, recs), sampled) for _ in range(2)]
    assert again[0].threshold == again[1].threshold and again[0].n_edits == 2
    assert calibrate(smol, smol.new_memory(router="cosine"), [], cfg) is None  # nothing stored, nothing to choose


def test_commit_recalibrates_and_memory_show_reports_it(smol, edits, tmp_path):
    from typer.testing import CliRunner

    from cluster.commit import commit_edits, ensure_memory
    from editing.table import MemoryMismatchError
    from store import MemoryStore
    from store.cli import memory_app

    recs, computed = edits
    root = str(tmp_path / "store")
    st = MemoryStore(root)
    try:
        st.create("facts", smol.spec, {"name": "cosine", "threshold": 0.65, "calibrate": CONFIG})
        first = commit_edits(smol, computed.table.slice(0, 2), "facts", root, None, "cosine", records=recs[:2])
        second = commit_edits(smol, computed.table.slice(2), "facts", root, None, "cosine", records=recs[2:])
        v1, v2 = st.info("facts", 1).router, st.info("facts", 2).router
        with pytest.raises(MemoryMismatchError, match="calibrated"):
            ensure_memory(st, "facts", smol.spec, "cosine", 0.7)  # a fixed threshold cannot be forced on it
    finally:
        st.close()
    assert (first["version"], second["version"]) == (1, 2)
    assert v1["calibrate"] == CONFIG and v1["threshold"] == first["threshold"] and v2["threshold"] == second["threshold"]
    for v in (v1, v2):  # the threshold written is the one calibration chose, not the memory's starting 0.65
        assert v["threshold"] == v["calibration"]["threshold"] != 0.65
    assert (v1["calibration"]["n_edits"], v2["calibration"]["n_edits"]) == (2, 4)
    assert v2["calibration"]["false_gate_rate"] <= CONFIG["target_rate"]

    res = CliRunner().invoke(memory_app, ["show", "facts", "--store", root, "--json"])
    assert res.exit_code == 0, res.output
    gate = json.loads(res.output)["gate"]
    assert gate == {"threshold": v2["threshold"], "calibrated": True, **{k: v2["calibration"][k] for k in
                    ("false_gate_rate", "recall", "target_rate", "objective")}}
    res = CliRunner().invoke(memory_app, ["show", "facts", "--store", root])
    assert "false-gate rate (est.)" in res.output and "calibrated" in res.output


def test_a_new_memory_is_calibrated_by_default_and_a_fixed_threshold_opts_out(smol, edits, tmp_path):
    from cluster.commit import DEFAULT_CALIBRATION, commit_edits
    from store import MemoryStore

    recs, computed = edits
    root = str(tmp_path / "store")
    out = commit_edits(smol, computed.table, "default", root, None, "cosine", records=recs)
    fixed = commit_edits(smol, computed.table, "fixed", root, None, "cosine", 0.5, records=recs)
    with MemoryStore(root) as st:
        cfg, fixed_cfg = st.info("default").router, st.info("fixed").router
    assert cfg["calibrate"] == DEFAULT_CALIBRATION and cfg["threshold"] == out["threshold"]
    assert cfg["calibration"]["target_rate"] == DEFAULT_CALIBRATION["target_rate"] and cfg["calibration"]["n_edits"] == len(recs)
    assert fixed_cfg == {"name": "cosine", "threshold": 0.5} and fixed["threshold"] == 0.5


def test_recalibration_gates_through_the_memory_s_robust_keys(smol, edits, tmp_path):
    """A calibrated memory with a REP adapter: every commit chooses its threshold on adapted queries, the
    ones replicas gate; the same commits without the adapter choose another threshold."""
    from cluster.commit import commit_edits
    from editing.rep import ARTIFACT_KIND, RobustKeys
    from store import MemoryStore

    recs, computed = edits
    root = str(tmp_path / "store")
    torch.manual_seed(0)
    adapter = RobustKeys(smol.spec.d_key, rank=4)
    with torch.no_grad():  # an adapter that moves every query a lot, so its effect on the threshold shows
        adapter.up.normal_(0.0, 1.0)
        adapter.gate_b.fill_(10.0)
    with MemoryStore(root) as st:
        for name in ("plain", "adapted"):
            st.create(name, smol.spec, {"name": "cosine", "threshold": 0.65, "calibrate": CONFIG})
            commit_edits(smol, computed.table.slice(0, 2), name, root, None, "cosine", records=recs[:2])
        st.put_artifact(ARTIFACT_KIND, adapter.digest(), adapter.to_bytes())
        st.commit("adapted", router_patch={"robust_keys": {"artifact": adapter.digest(), **adapter.config()}})
    plain = commit_edits(smol, computed.table.slice(2), "plain", root, None, "cosine", records=recs[2:])
    adapted = commit_edits(smol, computed.table.slice(2), "adapted", root, None, "cosine", records=recs[2:])
    assert adapted["threshold"] != plain["threshold"]  # equal when calibration ignored the adapter


def test_whitened_commit_puts_its_statistics_in_the_store(smol, edits, tmp_path, monkeypatch):
    """`edit run --memory` into a whitened memory: the C0 it routes with goes into the store and the
    version names it, so a replica on another host (no local statistics cache) routes the same way."""
    from cluster.commit import commit_edits
    from editing.routers import WhitenedRouter
    from serving.memory import make_memory_router
    from store import MemoryStore

    from editing import EditConfig, Editor

    recs, computed = edits
    root = str(tmp_path / "store")
    first = commit_edits(smol, computed.table.slice(0, 2), "white", root, None, "whitened", records=recs[:2])
    # a later writer whose own C0 is over another corpus sample: the memory keeps the statistics it named
    other = Editor(smol.model, smol.tok, EditConfig.for_model("smollm2-135m", stats_tokens=2048), model_name="smollm2-135m")
    commit_edits(other, computed.table.slice(2), "white", root, None, "whitened", records=recs[2:])
    assert other._stats is None, "the named C0 is read from the store, not recomputed"
    monkeypatch.setenv("KVEDIT_CACHE", str(tmp_path / "elsewhere"))
    with MemoryStore(root) as st:
        v1, v2 = st.info("white", 1), st.info("white", 2)
        router, threshold = make_memory_router(v2.router, v2.spec, st)
    assert v1.router["stats"] == v2.router["stats"] and v1.router["stats"].startswith(f"{smol.spec.model_fingerprint}-L{smol.layer}-")
    assert threshold == v2.router["threshold"] and v1.router["threshold"] == first["threshold"]
    assert torch.equal(router.c0_inv, WhitenedRouter(smol.stats().mean).c0_inv)


def test_sequential_eval_recalibrates_after_every_batch(smol, cf_valid):
    """`kvedit eval --calibrate` / campaign "+cal": each batch re-chooses the threshold on every row so far."""
    from editing import EditConfig, Editor
    from editing.evaluate import MemoryMethod

    ed = Editor(smol.model, smol.tok, EditConfig.for_model("smollm2-135m", values={"steps": 2}), model_name="smollm2-135m")
    ed._templates = smol.templates
    cfg = CalibrationConfig(**CONFIG, placement=0.0)
    recs = cf_valid[:4]
    with MemoryMethod(ed, "cosine", calibration=cfg) as m:
        ids = m.edit(recs[:2])
        first = m.last_calibration
        assert first.n_edits == 2 and float(m.mem.threshold) == pytest.approx(first.threshold)
        ids += m.edit(recs[2:])
        cal = m.last_calibration
        assert cal.n_edits == 4 and float(m.mem.threshold) == pytest.approx(cal.threshold)
        # placement 0 puts the threshold at the rate bound over the *whole* memory's negatives (WikiText and
        # the non-subject tokens of all four edit prompts), scored here independently of `calibrate`
        from editing.calibrate import prompt_keys

        _, _, prompt_neg = prompt_keys(ed, [(e, r.subject, r.prompt) for e, r in zip(ids, recs)])
        neg = torch.cat([route_scores(m.mem, negative_keys(ed, cfg.negative_tokens, cfg.negative_offset))[1],
                         route_scores(m.mem, prompt_neg)[1]])
        assert cal.objective == "recall_at_rate" and cal.n_negative == neg.numel()
        k = math.floor(cfg.target_rate * neg.numel())  # at most k negatives above, the threshold is the next one
        assert int((neg > cal.threshold).sum()) <= k < int((neg >= cal.threshold).sum())
        assert bool((neg == cal.threshold).any()) and cal.false_gate_rate <= cfg.target_rate
        assert m.describe()["calibration"]["threshold"] == pytest.approx(cal.threshold, abs=1e-6)
        # measured on held-out WikiText: within the sampling error of both samples (the threshold sits
        # at the rate bound, an order statistic of the 2,048 calibration tokens), and the gate is real
        held_out, p = m.false_gate_rate(), cfg.target_rate
        assert held_out <= p + 3 * math.sqrt(p * (1 - p) / 2048) + 3 * math.sqrt(p * (1 - p) / 16_384), held_out
        m.mem.threshold.fill_(-1.0)
        assert m.false_gate_rate() == 1.0  # every token passes a threshold below every score
        # why failures fail: with the gate shut every failure is gate_off; all failures are classified
        from editing.evaluate import efficacy, miss_reasons

        for thr in (2.0, -1.0, cal.threshold):
            m.mem.threshold.fill_(thr)
            why = miss_reasons(m, recs, ids)
            failures = round((1 - efficacy(m, recs)) * len(recs))
            assert why["checked"] == 4 and why["gate_off"] + why["misrouted"] + why["own_row"] == failures, (thr, why)
            if thr == 2.0:  # gate shut: every failure is gate-off
                assert why["gate_off"] == failures
            elif thr == -1.0:  # gate open everywhere: none is
                assert why["gate_off"] == 0
        m.delete(ids[::2])  # a delete keeps the threshold, as a delete commit does
        assert float(m.mem.threshold) == pytest.approx(cal.threshold)
    with pytest.raises(ValueError, match="chooses its own threshold"):
        MemoryMethod(ed, "cosine", threshold=0.5, calibration=cfg)


def test_a_threshold_always_matches_the_adapter_it_was_chosen_through(smol, tmp_path, monkeypatch):
    """A calibrated commit and a REP retrain race on one memory: whichever lands second chose its threshold
    through the other's adapter or rows, so it calibrates again (`router_expect`) instead of committing a
    threshold that does not fit the adapter replicas route through."""
    import cluster.commit as commit
    import editing.rep as rep
    from cluster.robust import train_robust_keys
    from editing.records import EditRequest
    from store import MemoryStore, stop_embedded_redis
    from store.loadgen import synthetic_rows

    root = tmp_path / "s"
    st = MemoryStore(root)
    try:
        st.create("cal", smol.spec, {"name": "cosine", "threshold": 0.5, "calibrate": {"target_rate": 3e-3}})
        st.commit("cal", synthetic_rows(smol.spec, ["a", "b"]))
        monkeypatch.setattr(rep, "fit_robust_keys", lambda *a, **k: rep.RobustKeys(smol.spec.d_key, rank=4))
        calls = []

        def retrain_lands_during_first(editor, st, memory, table, requests=None, stats=None, adapter=None):
            calls.append(adapter)
            if len(calls) == 1:  # a job commits a threshold chosen through the old adapter meanwhile
                st.commit(memory, router_patch={"threshold": 0.31, "calibration": {"by": "job"}})
            return {"threshold": [0.41, 0.42][len(calls) - 1], "calibration": {"by": "retrain"}}

        monkeypatch.setattr(commit, "calibrated_router", retrain_lands_during_first)
        rephrased = {e: EditRequest(subject=f"subject {e}", prompt=f"subject {e} is located in", target_new="x",
                                    subject_rephrases=[f"the subject {e}"]) for e in ("a", "b")}
        out = train_robust_keys(smol, st, "cal", records_by_id=rephrased)
        router = st.info("cal").router
        assert len(calls) == 2 and all(a is not None for a in calls), "calibrated again, through the new adapter"
        assert out["version"] == st.info("cal").version and router["threshold"] == out["threshold"] == 0.42
        assert router["robust_keys"]["artifact"] == out["artifact"]

        calls.clear()

        def adapter_lands_during_first(editor, st, memory, table, requests=None, stats=None, adapter=None):
            calls.append(st.info(memory).router["robust_keys"]["artifact"])
            if len(calls) == 1:  # a retrain commits a new adapter while this commit calibrates through the old
                st.commit(memory, router_patch={"robust_keys": {**st.info(memory).router["robust_keys"],
                                                                "artifact": "f" * 24}})
            return {"threshold": [0.51, 0.52][len(calls) - 1], "calibration": {"by": "commit"}}

        monkeypatch.setattr(commit, "calibrated_router", adapter_lands_during_first)
        result = commit.commit_edits(smol, synthetic_rows(smol.spec, ["c"], seed=1), "cal", str(root), None, "cosine")
        info = st.info("cal")
        assert calls == [out["artifact"], "f" * 24], "the second calibration reads the new adapter"
        assert result["threshold"] == info.router["threshold"] == 0.52 and info.n_rows == 3
        assert info.router["robust_keys"]["artifact"] == "f" * 24, "the retrain's adapter stays"
    finally:
        st.close()
        stop_embedded_redis(root)
