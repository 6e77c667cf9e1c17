"""Baselines: rome, memit, alphaedit (in-place, on a copy of the weights) and scr (retrieval in context).

The closed-form updates are checked on small synthetic matrices; every method is run on the real
default model (the session's `smol`), with C0 from a small WikiText sample (cached on disk).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from editing import EditRecordError, EditRequest
from editing.baselines import make_baseline
from editing.baselines.alphaedit import alphaedit_update, null_space_projection
from editing.baselines.memit import memit_update
from editing.baselines.rome import batch_update, rank_one_update
from editing.evaluate import efficacy, known_methods, run_sequential
from editing.metrics import next_token_logits

STATS_TOKENS = 2048  # C0 sample for the real-model tests (the methods default to the Editor's 100k)
VALUE_STEPS = 6  # optimiser steps per edit in these tests (default 20, most edits stop early): enough to flip the answer
RANGE = [5, 6]  # memit / alphaedit layers in the tests (default: 4..8)
IN_PLACE = {"rome": {}, "memit": {"layers": RANGE}}  # alphaedit: its own two-edit test below


# ---------------------------------------------------------------------------------------- the math
def _background(n: int, d: int, rank: int, seed: int) -> torch.Tensor:
    """n keys [n, d] living in a fixed rank-`rank` subspace (C0 then has a null space)."""
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0]
    coef = torch.randn(n, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return coef @ basis[:, :rank].T


def test_rank_one_update_writes_the_target_and_spares_the_c0_orthogonal_complement():
    d_key, d_model = 12, 5
    x = _background(400, d_key, d_key, seed=1)
    c0 = x.T @ x / len(x)
    w = torch.randn(d_model, d_key, dtype=torch.float64)
    k, target = torch.randn(d_key, dtype=torch.float64), torch.randn(d_model, dtype=torch.float64)
    delta = rank_one_update(w, k, target, c0)
    torch.testing.assert_close((w + delta) @ k, target)
    u = torch.linalg.solve(c0, k)
    other = torch.randn(d_key, dtype=torch.float64)
    other -= (other @ u) / (u @ u) * u  # a key C0^-1-orthogonal to k keeps its output
    torch.testing.assert_close(delta @ other, torch.zeros(d_model, dtype=torch.float64), atol=1e-9, rtol=0)
    assert torch.linalg.matrix_rank(delta) == 1


def test_rome_batch_update_writes_every_target_of_the_batch():
    """Successive rank-one updates move the batch's earlier keys off their targets (k_j^T C0^-1 k_i != 0);
    the joint update meets them all, is rank n, and equals the rank-one update for one edit."""
    d_key, d_model, n = 12, 5, 4
    x = _background(400, d_key, d_key, seed=5)
    c0 = x.T @ x / len(x)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(d_model, d_key, generator=g, dtype=torch.float64)
    keys = torch.randn(n, d_key, generator=g, dtype=torch.float64) + 2.0  # correlated keys, as real ones are
    targets = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    seq = w.clone()
    for k, v in zip(keys, targets):
        seq += rank_one_update(seq, k, v, c0)
    assert torch.linalg.norm(keys[0] @ seq.T - targets[0]) > 1e-3, "the old successive form misses earlier targets"
    delta = batch_update(w, keys, targets, c0)
    torch.testing.assert_close(keys @ (w + delta).T, targets)
    assert torch.linalg.matrix_rank(delta) == n
    torch.testing.assert_close(batch_update(w, keys[:1], targets[:1], c0), rank_one_update(w, keys[0], targets[0], c0))
    # one subject edited twice: keys equal up to rounding, targets different. No map meets both; the update
    # must stay bounded (the mean of the two) instead of growing as 1 / rounding
    for eps in (0.0, 1e-9, 1e-5):
        twin = keys.clone()
        twin[1] = keys[0] + eps * torch.randn(d_key, generator=g, dtype=torch.float64)
        delta = batch_update(w, twin, targets, c0)
        assert torch.linalg.norm(delta) < 10 * torch.linalg.norm(batch_update(w, keys, targets, c0)), eps
        torch.testing.assert_close(twin[0] @ (w + delta).T, (targets[0] + targets[1]) / 2, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(twin[2:] @ (w + delta).T, targets[2:], atol=1e-5, rtol=1e-5)


def test_memit_update_is_the_least_squares_solution_with_c0_prior():
    d_key, d_model, n = 10, 4, 3
    x = _background(500, d_key, d_key, seed=2)
    c0 = x.T @ x / len(x)
    keys, resid = torch.randn(n, d_key, dtype=torch.float64), torch.randn(n, d_model, dtype=torch.float64)
    lam = 3.0
    delta = memit_update(resid, keys, c0, lam)
    # normal equations of min |ΔW K^T - R^T|^2 + λ tr(ΔW C0 ΔW^T)
    grad = (delta @ keys.T - resid.T) @ keys + lam * delta @ c0
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-9, rtol=0)
    assert torch.linalg.norm(memit_update(resid, keys, c0, 1e-6) @ keys.T - resid.T) < 1e-4


def test_alphaedit_null_space_keeps_text_keys_and_earlier_edits():
    d_key, d_model, rank = 16, 6, 10
    text = _background(300, d_key, rank, seed=3)  # ordinary tokens: a rank-10 subspace
    c0 = text.T @ text / len(text)
    proj = null_space_projection(c0, threshold=1e-8)
    assert round(float(proj.trace())) == d_key - rank
    assert torch.allclose(null_space_projection(c0, energy=1e-12), proj), "energy ~0: the exact null space"
    dense = _background(300, d_key, d_key, seed=8)  # no null space: the share bounds what text puts there
    c_dense = dense.T @ dense / len(dense)
    p_dense = null_space_projection(c_dense, energy=0.05)
    assert 0 < float(torch.trace(p_dense @ c_dense) / torch.trace(c_dense)) <= 0.05 and round(float(p_dense.trace())) >= 1
    with pytest.raises(ValueError, match="not both or neither"):
        null_space_projection(c0, threshold=1e-8, energy=0.1)
    g = torch.Generator().manual_seed(4)
    k1, k2 = torch.randn(2, d_key, generator=g, dtype=torch.float64).unbind(0)
    r1, r2 = torch.randn(2, d_model, generator=g, dtype=torch.float64).unbind(0)
    kept = torch.zeros(d_key, d_key, dtype=torch.float64)
    d1 = alphaedit_update(r1[None], k1[None], proj, kept, l2=1e-6)
    torch.testing.assert_close(d1 @ k1, r1, atol=1e-4, rtol=1e-4)
    assert torch.linalg.norm(d1 @ text.T) < 1e-8 * torch.linalg.norm(text), "text keys are untouched"
    kept += torch.outer(k1, k1)
    d2 = alphaedit_update(r2[None], k2[None], proj, kept, l2=1e-6)
    torch.testing.assert_close(d2 @ k2, r2, atol=1e-4, rtol=1e-4)
    assert torch.linalg.norm(d2 @ k1) < 1e-3 * torch.linalg.norm(r1), "the first edit's output is kept"
    no_memory = alphaedit_update(r2[None], k2[None], proj, torch.zeros_like(kept), l2=1e-6)
    assert torch.linalg.norm(no_memory @ k1) > 0.05 * torch.linalg.norm(r2), "without Kp the first edit moves"


# ---------------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def probe(smol, cf_valid):
    """Two facts of different relations, the unedited logits on their prompts and neighbours, and
    the unedited down-projection weights (the Parameter objects and their values). While the
    module runs, the value optimiser takes at most VALUE_STEPS steps."""
    smol.detach()
    recs = [cf_valid[0], cf_valid[2]]
    prompts = [r.prompt for r in recs] + [p for r in recs for p in r.locality_prompts[:3]]
    layers = sorted({smol.layer, *RANGE})
    params = {layer: smol.adapter.down_proj(layer).weight for layer in layers}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(smol.config, "values", replace(smol.config.values, steps=VALUE_STEPS))
        yield {"recs": recs, "prompts": prompts, "logits": next_token_logits(smol.model, smol.tok, prompts),
               "params": params, "values": {layer: p.detach().clone() for layer, p in params.items()}}


def _assert_base_model(smol, probe):
    for layer, p in probe["params"].items():
        assert smol.adapter.down_proj(layer).weight is p, f"layer {layer}: the original Parameter is back"
        assert torch.equal(p, probe["values"][layer]), f"layer {layer}: the original weight was never written"
    assert torch.equal(next_token_logits(smol.model, smol.tok, probe["prompts"]), probe["logits"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(IN_PLACE))
def test_in_place_edit_succeeds_on_a_copy_and_the_base_model_comes_back_bit_identical(smol, probe, name):
    rec = probe["recs"][0]
    assert efficacy(smol, [rec]) == 0.0, "the unedited model prefers the true target"
    with make_baseline(name, smol, stats_tokens=STATS_TOKENS, **IN_PLACE[name]) as m:
        m.edit([rec])
        assert efficacy(m, [rec]) == 1.0
        moved = [layer for layer in m.layers if not torch.equal(m.weight(layer), probe["values"][layer])]
        assert moved == m.layers, "every layer of the method was updated"
        assert all(torch.equal(p, probe["values"][layer]) for layer, p in probe["params"].items())
        with m.disabled():
            assert torch.equal(next_token_logits(smol.model, smol.tok, probe["prompts"]), probe["logits"])
        assert efficacy(m, [rec]) == 1.0, "the edits are back after disabled()"
    _assert_base_model(smol, probe)


@pytest.mark.slow
def test_alphaedit_edits_and_a_second_edit_leaves_the_first_edits_keys_alone(smol, probe):
    first, second = probe["recs"]
    with make_baseline("alphaedit", smol, stats_tokens=STATS_TOKENS, layers=RANGE) as m:
        m.edit([first])
        assert efficacy(m, [first]) == 1.0
        assert all(torch.equal(p, probe["values"][layer]) for layer, p in probe["params"].items())
        keys1 = {layer: smol.keys([first], layer)[0]
                 for layer in m.layers}
        after1 = {layer: m.weight(layer).detach().clone() for layer in m.layers}
        m.edit([second])
        keys2 = {layer: smol.keys([second], layer)[0]
                 for layer in m.layers}
        for layer in m.layers:
            delta2 = m.weight(layer) - after1[layer]
            kept, written = (delta2 @ keys1[layer]).norm(), (delta2 @ keys2[layer]).norm()
            assert kept < 0.1 * written, f"layer {layer}: the second edit moved the first key by {kept:.3g} ({written:.3g})"
        assert efficacy(m, [first, second]) == 1.0
    _assert_base_model(smol, probe)


@pytest.mark.slow
def test_a_batch_that_fails_part_way_writes_nothing_and_an_attached_memory_comes_back(smol, probe, monkeypatch):
    """A batch failing at its second layer (a non-finite update, out of memory) leaves no layer of it written
    and no key accumulated; a memory attached before the baseline is attached again after it."""
    first, second = probe["recs"]
    memory = smol.attach()
    try:
        with make_baseline("alphaedit", smol, stats_tokens=STATS_TOKENS, layers=RANGE) as m:
            assert smol.memory is None, "a baseline edits the bare model"
            ids = m.edit([first])
            weights = {layer: m.weight(layer).detach().clone() for layer in m.layers}
            kept = {layer: k.clone() for layer, k in m.kept.items()}
            real, calls = m.layer_update, []

            def failing(layer, keys, residual):
                calls.append(layer)
                if len(calls) == 2:
                    raise FloatingPointError("the second layer's update is not finite")
                return real(layer, keys, residual)

            monkeypatch.setattr(m, "layer_update", failing)
            with pytest.raises(FloatingPointError):
                m.edit([second])
            assert calls == RANGE, "the first layer was written before the failure"
            assert all(torch.equal(m.weight(layer), weights[layer]) for layer in m.layers), "and put back"
            assert all(torch.equal(m.kept[layer], kept[layer]) for layer in m.layers)
            assert m.edit_ids == ids and efficacy(m, [first]) == 1.0
        assert smol.memory is memory, "the memory attached before is back"
    finally:
        smol.detach()
    _assert_base_model(smol, probe)


@pytest.mark.slow
def test_scr_answers_from_the_retrieved_fact_and_leaves_other_prompts_alone(smol, probe):
    rec, other = probe["recs"]
    with make_baseline("scr", smol) as m:
        ids = m.edit([rec])
        assert efficacy(m, [rec]) == 1.0
        fact = f"{rec.prompt} {rec.target_new}."
        assert m.in_context([rec.prompt]) == [f"Fact: {fact}\nAccording to the fact above: {rec.prompt}"]
        assert m.in_context([other.prompt]) == [other.prompt], "an unrelated fact is not selected"
        long = " ".join(["The weather in the valley was mild that year and the harvest was good."] * 40)
        assert len(m.encoder.tok(long + "\n\n" + rec.prompt)["input_ids"]) > 2 * m.encoder.max_length
        assert m.retrieve([long + "\n\n" + rec.prompt])[0][0][0] == fact, "behind a long context: the question"
        assert m.retrieve([rec.prompt + "\n\n"])[0][0][0] == fact
        assert m.delete(ids) == 1 and m.in_context([rec.prompt]) == [rec.prompt]
    _assert_base_model(smol, probe)


@pytest.mark.slow
def test_bad_records_and_settings_are_refused_before_anything_is_written(smol, probe):
    good = probe["recs"][0]
    bad = EditRequest(subject="Paris", prompt="The capital of France is", target_new="Rome")
    with pytest.raises(ValueError, match="unknown memit settings: \\['lambda'\\]"):
        make_baseline("memit", smol, **{"lambda": 2.0})
    with pytest.raises(ValueError, match="unknown method 'ferret'.*alphaedit.*cosine.*memit.*rome.*scr"):
        run_sequential(smol, [good], 1, router="ferret")
    with make_baseline("rome", smol, stats_tokens=STATS_TOKENS) as m:
        with pytest.raises(EditRecordError) as exc:
            m.edit([good, bad])
        assert exc.value.index == 1 and exc.value.field == "subject"
        assert torch.equal(m.weight(smol.layer), probe["values"][smol.layer]), "nothing was written"
    _assert_base_model(smol, probe)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rome", "scr"])
def test_run_sequential_scores_a_baseline_like_the_memory(smol, probe, name):
    from editing.stats import corpus_half, default_corpus_path

    text = corpus_half(default_corpus_path().read_text(), "second")[:3000]
    # scr needs two facts (withdrawal deletes every other one); one keeps the in-place run short
    recs = probe["recs"] if name == "scr" else probe["recs"][:1]
    settings = {"stats_tokens": STATS_TOKENS} if name == "rome" else None
    out = run_sequential(smol, recs, 1, router=name, perplexity_text=text, fluency_prompts=1, settings=settings)
    assert out["router"] == name and out["n_edits"] == len(recs)
    assert out["efficacy"] == 1.0
    for key in ("generalization", "specificity", "pre_specificity", "locality", "subject_rephrase", "shuffled_subject"):
        assert 0.0 <= out[key] <= 1.0, key
    if name == "rome":  # in place: the weights moved, so does perplexity; no exact withdrawal
        assert out["perplexity_delta"] != 0.0 and out["withdrawal_reverted"] is None and out["layer"] == smol.layer
    else:  # retrieval: running text is untouched, a deleted fact is withdrawn exactly
        assert out["perplexity_delta"] == 0.0 and out["withdrawal_reverted"] == 1.0
    _assert_base_model(smol, probe)


def test_kvedit_eval_lists_the_known_methods_for_an_unknown_one():
    from cluster.cli import app

    res = CliRunner().invoke(app, ["eval", "--method", "ferret", "--edits", "1"])
    assert res.exit_code == 2
    assert "unknown method 'ferret'" in res.output and all(m in res.output for m in known_methods())
    res = CliRunner().invoke(app, ["eval", "--method", "rome", "--threshold", "0.5", "--edits", "1"])
    assert res.exit_code == 2 and "has no --threshold" in res.output
