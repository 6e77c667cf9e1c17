"""The core engine on the real default model (SmolLM2-135M), loaded once per test run."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import DEFAULT_MODEL as MODEL
from editing import EditRecordError, EditRequest
from editing.metrics import next_token_logits
from editing.table import MemoryMismatchError, MemorySpec, read_edit_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ten_edits(smol, cf_valid):
    recs = cf_valid[:10]
    return recs, smol.compute(recs)


def test_ten_counterfact_edits_work_and_deleting_restores_exact_logits(smol, ten_edits):
    recs, edits = ten_edits
    loc = [p for r in recs for p in r.locality_prompts]
    probe = loc + [r.prompt for r in recs]
    smol.detach()
    base = next_token_logits(smol.model, smol.tok, probe)
    pre = smol.efficacy(recs)
    mem = smol.attach()
    try:
        assert torch.equal(next_token_logits(smol.model, smol.tok, probe), base), "empty memory is bit-identical"
        mem.add(edits.edit_ids, edits.keys, edits.residuals)
        eff = smol.efficacy(recs)
        assert sum(eff) / len(eff) >= 0.9, f"efficacy {eff} (before editing {pre})"
        after = next_token_logits(smol.model, smol.tok, loc)
        changed = [p for p, a, b in zip(loc, after.argmax(-1), base[: len(loc)].argmax(-1)) if a != b]
        assert not changed, f"locality prompts whose top-1 changed: {changed}"
        assert mem.delete(edits.edit_ids) == 10
        assert torch.equal(next_token_logits(smol.model, smol.tok, probe), base), "deletion restores exact logits"
    finally:
        smol.detach()


def test_edit_table_round_trips(smol, ten_edits, tmp_path):
    from editing.table import table_tensors, write_edit_table

    _, edits = ten_edits
    spec, table = read_edit_table(write_edit_table(edits.table, tmp_path))
    assert spec == smol.spec
    ids, k, v = table_tensors(table, smol.spec)
    assert ids == edits.edit_ids
    assert torch.equal(k, edits.keys) and torch.equal(v, edits.residuals)
    other = MemorySpec("llama-0000", spec.layer, spec.d_key, spec.d_model)
    with pytest.raises(MemoryMismatchError, match="model_fingerprint"):
        smol.attach(table, spec=other)
    with pytest.raises(MemoryMismatchError, match="layer"):
        table_tensors(table, MemorySpec(spec.model_fingerprint, spec.layer + 1, spec.d_key, spec.d_model))
    smol.detach()


@pytest.mark.parametrize("req, field", [
    (EditRequest(subject="Paris", prompt="The capital of France is", target_new="Rome"), "subject"),
    (EditRequest(subject="France", prompt="The capital of France is", target_new="  "), "target_new"),
    (EditRequest(subject="France", prompt="The capital of France is", target_new="a " * 40), "target_new"),
    (EditRequest(subject=3, prompt="The capital of France is", target_new="Rome"), "subject"),
])
def test_bad_records_name_the_field(smol, req, field):
    with pytest.raises(EditRecordError) as exc:
        smol.validate([EditRequest(subject="France", prompt="France is in", target_new="Europe"), req])
    assert exc.value.field == field and exc.value.index == 1, str(exc.value)


def test_conflicting_targets_in_one_batch_are_refused(smol):
    a = EditRequest(subject="France", prompt="The capital of France is", target_new="Rome")
    b = EditRequest(subject="France", prompt="The capital of France is", target_new="Berlin")
    with pytest.raises(EditRecordError, match="conflicts with record 0"):
        smol.validate([a, b])


def test_cli_edit_run_and_generate(tmp_path, cf_valid):
    from cluster.cli import app

    runner = CliRunner()
    out = tmp_path / "mem"
    res = runner.invoke(app, ["edit", "run", "counterfact_valid.json", "--limit", "2", "--offset", "10",
                              "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["n_edits"] == 2 and len(report["edit_ids"]) == 2 and report["seconds"] > 0
    assert report["efficacy"] >= 0.5, "the written edits change the answers"
    spec, table = read_edit_table(out)
    assert table.num_rows == 2 and table.column("subject").to_pylist() == [r.subject for r in cf_valid[10:12]]
    res = runner.invoke(app, ["generate", "--memory", str(out), "--max-new-tokens", "5", "--json", cf_valid[10].prompt])
    assert res.exit_code == 0, res.output
    gen = json.loads(res.stdout.strip().splitlines()[-1])["generations"][0]
    assert set(gen) == {"prompt", "base", "edited"}
    assert gen["edited"] != gen["base"], "generate serves the memory it was given"


def test_cli_bad_batch_writes_nothing(tmp_path):
    from cluster.cli import app

    data = tmp_path / "bad.jsonl"
    data.write_text(
        json.dumps({"case_id": 1, "subject": "France", "prompt": "The capital of France is", "target_new": "Rome", "target_true": "Paris"}) + "\n"
        + json.dumps({"case_id": 2, "subject": "Spain", "prompt": "The capital of France is", "target_new": "Rome", "target_true": "Paris"}) + "\n"
    )
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["edit", "run", str(data), "--out", str(out), "--json"])
    assert res.exit_code == 2
    assert "record 1" in res.output and "case_id=2" in res.output and "'subject'" in res.output
    assert not out.exists()
    data.write_text(data.read_text().splitlines()[0] + "\n")
    res = CliRunner().invoke(app, ["edit", "run", str(data), "--out", str(out), "--layer", "99"])
    assert res.exit_code == 2 and "out of range" in res.output


def test_cli_edit_run_refuses_a_mismatched_memory_before_computing(smol, tmp_path):
    """A memory that cannot take the edits (another threshold) is an error up front, not a traceback
    after the optimisation; nothing is written to the store."""
    from cluster.cli import app
    from store import MemoryStore, stop_embedded_redis

    root = tmp_path / "store"
    st = MemoryStore(str(root))
    try:
        st.create("m", smol.spec, {"name": "cosine", "threshold": 0.9})
        data = tmp_path / "one.jsonl"
        data.write_text(json.dumps({"subject": "France", "prompt": "The capital of France is", "target_new": "Rome"}) + "\n")
        res = CliRunner().invoke(app, ["edit", "run", str(data), "--memory", "m", "--store", str(root), "--threshold", "0.5"])
        assert res.exit_code == 2 and "threshold fixed at 0.9" in res.output and "optimis" not in res.output
        assert st.info("m").version == 0 and st.info("m").n_rows == 0
    finally:
        st.close()
        stop_embedded_redis(root)


def test_token_accuracy_follows_the_edit(smol, ten_edits):
    """zsRE scoring (top-1 token accuracy, teacher forced): low for the new targets before the edits,
    high after, and per prompt a share of the target's tokens."""
    from editing.evaluate import TOKEN_ACCURACY, efficacy, success_metric, token_accuracy

    recs, edits = ten_edits
    smol.detach()
    acc = token_accuracy(smol, [r.prompt for r in recs], [r.target_new for r in recs])
    ntok = [len(smol.tok(" " + r.target_new, add_special_tokens=False)["input_ids"]) for r in recs]
    assert acc.shape == (10,) and all(float(a) * n == pytest.approx(round(float(a) * n)) for a, n in zip(acc, ntok))
    before = efficacy(smol, recs, TOKEN_ACCURACY)
    try:
        smol.attach(edits.table)
        after = efficacy(smol, recs, TOKEN_ACCURACY)
    finally:
        smol.detach()
    assert before <= 0.3 and after >= 0.8, (before, after)
    assert success_metric("zsre_test.json") == TOKEN_ACCURACY and success_metric("counterfact_test.json") == "nll"
    assert success_metric("zsre_test.json", "nll") == "nll"
    with pytest.raises(ValueError, match="unknown success metric 'f1'"):
        success_metric("x.json", "f1")


def test_withdrawal_restores_exact_base_logits_for_deleted_edits(smol, ten_edits):
    from editing.evaluate import efficacy, withdrawal, withdrawn_prompts

    recs, edits = ten_edits
    smol.detach()
    base = next_token_logits(smol.model, smol.tok, withdrawn_prompts(recs))
    try:
        smol.attach(edits.table)
        before = efficacy(smol, recs)
        edited = next_token_logits(smol.model, smol.tok, withdrawn_prompts(recs))
        assert before >= 0.9 and all(not torch.equal(e, b) for e, b in zip(edited, base)), \
            "every withdrawn prompt is changed by its edit before the deletion"
        out = withdrawal(smol, recs, edits.edit_ids, base)
        assert out["withdrawal_reverted"] == 1.0, "deleted edits must give exactly the unedited model's logits"
        assert out["withdrawal_retained"] >= before - 0.2 and smol.memory.n_facts == 5
        assert out["withdrawal_shared_subject"] == 0.0 and out["withdrawal_reverted_unshared"] == 1.0
    finally:
        smol.detach()


def test_robust_keys_reroute_rephrased_subjects_and_leave_the_rest(smol, ten_edits):
    """REP adapter: in-domain subject rephrasings route to their own edit far more often, stored keys
    still select themselves, WikiText tokens stay gated off, and the base path is untouched."""
    from editing.keys import compute_keys
    from editing.rep import RobustKeyHparams, _negative_keys, fit_robust_keys, variant_requests
    from editing.stats import corpus_half, default_corpus_path

    recs, edits = ten_edits
    text = default_corpus_path().read_text()
    first = corpus_half(text, "first")
    mem = smol.new_memory()
    mem.add(edits.edit_ids, edits.keys, edits.residuals)
    adapter = fit_robust_keys(smol, mem, recs, edits.keys, first[:60_000], hp=RobustKeyHparams(steps=200, negatives=1024))

    var, owner = variant_requests(recs, slice(0, 5), smol.tok, seed=100_000)  # the in-domain variants
    q = compute_keys(smol.model, smol.tok, smol.adapter, smol.layer, var, ["{}"])
    own = torch.tensor(owner)
    neg = _negative_keys(smol, recs, first[200_000:260_000], 1024)  # WikiText the adapter never saw

    def routed_to_own(keys):
        best, _, w = mem.route(keys)
        return float(((best == own) & (w > 0)).float().mean())

    before, before_neg = routed_to_own(q), float((mem.route(neg)[2] > 0).float().mean())
    mem.query_adapter = adapter
    after, after_neg = routed_to_own(q), float((mem.route(neg)[2] > 0).float().mean())
    best, _, w = mem.route(edits.keys)
    assert torch.equal(best, torch.arange(10)) and bool((w > 0).all()), "stored keys still select themselves"
    assert after >= before + 0.2, f"in-domain rephrasings routed to their edit: {before:.2f} -> {after:.2f}"
    assert after_neg <= before_neg + 0.01, f"WikiText false gates {before_neg:.4f} -> {after_neg:.4f}"
    # trained on random minibatches (how a large memory is trained): the same effect
    mem.query_adapter = fit_robust_keys(smol, mem, recs, edits.keys, first[:60_000],
                                        hp=RobustKeyHparams(steps=200, negatives=1024, batch=32))
    mini, mini_neg = routed_to_own(q), float((mem.route(neg)[2] > 0).float().mean())
    assert mini >= before + 0.2 and mini_neg <= before_neg + 0.01, (before, mini, before_neg, mini_neg)
    mem.query_adapter = adapter

    probe = [r.prompt for r in recs]
    smol.detach()
    base = next_token_logits(smol.model, smol.tok, probe)
    mem.clear()
    smol.attach(memory=mem)
    try:
        assert torch.equal(next_token_logits(smol.model, smol.tok, probe), base), "adapter never touches the base path"
    finally:
        smol.detach()


def test_robust_keys_are_committed_with_the_memory_and_served_from_it(smol, ten_edits, tmp_path):
    """`kvedit edit robust-keys` trains an adapter on a store memory's edits and commits it as the next
    version (artifact + router config); a replica following the memory routes through exactly it.
    Records that are not the memory's edits are refused by record, and nothing is committed."""
    from typer.testing import CliRunner

    from cluster.cli import app
    from store.artifacts import REPHRASES_KIND
    from editing.keys import compute_keys
    from editing.rep import ARTIFACT_KIND, RobustKeys, variant_requests
    from serving.memory import MemoryFollower, ServedModel, build_routed, resolve_memory
    from serving.settings import MemoryRef, MemorySettings
    from store import MemoryStore, embedded_url, stop_embedded_redis

    recs, edits = ten_edits
    root = tmp_path / "store"
    st = MemoryStore(str(root))
    try:
        st.create("facts", smol.spec, {"name": "cosine"})
        st.commit("facts", edits.table)
        args = ["edit", "robust-keys", "--memory", "facts", "--store", str(root), "--steps", "40", "--json"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and "no stored rephrasings" in res.output, res.output
        res = CliRunner().invoke(app, args + ["--data", "counterfact_valid.json", "--offset", "20", "--limit", "2"])
        said = " ".join(res.output.split())  # unwrapped
        assert res.exit_code == 2 and "no row in the memory" in said
        assert "counterfact_valid.json, record 20" in said, "the record is named by its place in the file"
        assert st.info("facts").version == 1, "nothing committed for records of other edits"

        res = CliRunner().invoke(app, args + ["--data", "counterfact_valid.json", "--limit", "10"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout.strip().splitlines()[-1])
        info = st.info("facts")
        assert out["version"] == info.version == 2 and out["rows"] == 10 and info.n_rows == 10
        ref = info.router["robust_keys"]
        assert ref["artifact"] == out["artifact"] and ref["d_key"] == smol.adapter.d_key
        assert ref["rows"] == 10 and ref["trained_on_version"] == 1 and ref["rank"] == 64  # 64 per started 100 edits
        shown = CliRunner().invoke(app, ["memory", "show", "facts", "--store", str(root)], terminal_width=200)
        assert shown.exit_code == 0 and "trained on 10 rows at v1" in shown.output, shown.output
        adapter = RobustKeys.from_bytes(st.get_artifact(ARTIFACT_KIND, ref["artifact"])[0])

        settings = MemorySettings(MemoryRef("facts"), store=str(root), redis_url=embedded_url(root))
        served = ServedModel(smol.spec.model_fingerprint, smol.model.config.num_hidden_layers, smol.adapter.d_key,
                             smol.adapter.d_model)
        resolved = resolve_memory(settings, served)
        follower = MemoryFollower(resolved, build_routed(resolved))
        follower.load()
        try:
            routed = follower.routed
            assert routed.version == 2 and routed.query_adapter is not None
            var, _ = variant_requests(recs, slice(0, None), smol.tok, seed=0)
            q = compute_keys(smol.model, smol.tok, smol.adapter, smol.layer, var, ["{}"]).float()
            torch.testing.assert_close(routed.query_adapter(q), adapter(q), rtol=0, atol=0)
            assert not torch.allclose(adapter(q), q), "a trained adapter moves rephrased keys (a new one is the identity)"
        finally:
            follower.close()

        # retrained by hand without records: the rephrasings stored with the adapter are used again
        stored = json.loads(st.get_artifact(REPHRASES_KIND, ref["rephrases"])[0])
        eids = edits.table.column("edit_id").to_pylist()
        assert stored == {e: r.subject_rephrases for e, r in zip(eids, recs)}
        res = CliRunner().invoke(app, args + ["--retrain-growth", "0"])
        assert res.exit_code == 0, res.output
        again = json.loads(res.stdout.strip().splitlines()[-1])
        info = st.info("facts")
        assert (again["version"], again["rows"], again["rephrased_rows"]) == (3, 10, 10)
        assert info.router["robust_keys"]["rephrases"] == ref["rephrases"]
        assert info.router["robust_keys"]["retrain_growth"] is None and ref["retrain_growth"] == 0.25
        assert info.router["robust_keys"]["steps"] == 40
        res = CliRunner().invoke(app, ["edit", "robust-keys", "--memory", "facts", "--store", str(root), "--json"])
        assert res.exit_code == 0, res.output
        kept = st.info("facts").router["robust_keys"]
        assert kept["retrain_growth"] is None and kept["steps"] == 40, "a retrain without flags keeps the settings"
    finally:
        st.close()
        stop_embedded_redis(root)


def test_job_evaluator_follows_each_versions_threshold_and_robust_keys(smol, ten_edits, tmp_path):
    """The job `Evaluator` measures a version as replicas serve it: a commit that only changes the
    router config (a recalibrated threshold, a REP adapter) must reach its attached memory by delta."""
    from editing.rep import ARTIFACT_KIND, RobustKeys
    from store import MemoryStore, stop_embedded_redis
    from workers.evaluator import Evaluator

    recs, edits = ten_edits
    root = tmp_path / "store"
    st = MemoryStore(str(root))
    smol.detach()
    try:
        st.create("m", smol.spec, {"name": "cosine", "threshold": 0.5})
        st.commit("m", edits.table)
        ev = Evaluator()
        routed = ev._memory_at(MODEL, smol, st, "m", 1, None)
        assert routed.version == 1 and float(routed.threshold) == 0.5 and routed.query_adapter is None
        assert all(smol.efficacy(recs[:3]))
        adapter = RobustKeys(smol.adapter.d_key, rank=4)
        key = st.put_artifact(ARTIFACT_KIND, adapter.digest(), adapter.to_bytes()) and adapter.digest()
        st.commit("m", router_update={"name": "cosine", "threshold": 1.01, "robust_keys": {"artifact": key, **adapter.config()}})
        routed = ev._memory_at(MODEL, smol, st, "m", 2, None)
        assert routed is smol.memory and routed.version == 2, "followed by delta, not reloaded"
        assert float(routed.threshold) == pytest.approx(1.01) and routed.query_adapter is not None
        assert not any(smol.efficacy(recs[:3])), "no cosine passes 1.01: the new threshold is in force"
        st.commit("m", router_update={"name": "cosine", "threshold": 0.5})
        routed = ev._memory_at(MODEL, smol, st, "m", 3, None)
        assert float(routed.threshold) == 0.5 and routed.query_adapter is None
        # a job at another layer of the same model: its editor shares the weights, so the first memory comes off
        from editing import EditConfig, Editor

        other = Editor(smol.model, smol.tok, EditConfig.for_model(MODEL, layer=smol.layer + 1), model_name=MODEL)
        st.create("n", other.spec, {"name": "cosine", "threshold": 0.5})
        routed_n = ev._memory_at(MODEL, other, st, "n", 0, None)
        assert other.memory is routed_n and smol.memory is None, "one memory at a time on the shared weights"
        assert list(ev._attached) == [MODEL], "the first memory's buffers are not kept"
        assert ev._memory_at(MODEL, smol, st, "m", 3, None) is smol.memory and other.memory is None
        st.commit("m", router_update={"name": "cosine", "threshold": 0.5, "robust_keys": {"artifact": "missing"}})
        with pytest.raises(Exception, match="robust-keys artifact 'missing' is not in the store"):
            Evaluator()._memory_at(MODEL, smol, st, "m", 4, None)
    finally:
        smol.detach()
        st.close()
        stop_embedded_redis(root)


def test_edit_cache_reuses_a_batch_only_on_the_same_memory(smol, cf_valid, monkeypatch):
    """Campaign cells share edit batches: a batch is reused when the memory it was computed on is
    the same (router, threshold and earlier batches), and computed again otherwise."""
    from editing.evaluate import open_method

    a, b, c = cf_valid[20:23]
    computed: list[str] = []
    compute = smol.compute

    def counting(reqs):
        computed.extend(r.subject for r in reqs)
        return compute(reqs)

    monkeypatch.setattr(smol, "compute", counting)
    cache: dict = {}

    def run(threshold, reqs):
        with open_method(smol, "cosine", threshold, None, cache) as m:
            ids = [i for r in reqs for i in m.edit([r])]
            return ids, torch.cat([k for _, k in m.history])

    ids1, keys1 = run(0.5, [a, b])
    assert computed == [a.subject, b.subject]
    ids2, keys2 = run(0.5, [a, b, c])  # T = 3 after T = 2: only the new batch is computed
    assert computed == [a.subject, b.subject, c.subject]
    assert ids2[:2] == ids1 and torch.equal(keys2[:2], keys1)
    run(0.9, [a, b])  # another threshold: the first batch (empty memory) is shared, the second is not
    assert computed == [a.subject, b.subject, c.subject, b.subject]
    run(0.5, [b, a])  # another order: b on an empty memory and a after b are both new
    assert computed[4:] == [b.subject, a.subject]
    run(0.9, [a, b])  # the same sequence again: nothing to compute
    assert len(computed) == 6
