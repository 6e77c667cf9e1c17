"""Evaluation campaigns: spec validation, synthetic facts, the scale measurement, and a small real campaign
run end to end on a local Ray (one actor, the real default model) with its report read back."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest

from cluster.campaign import CampaignSpecError, load_campaign, parse_campaign

CAMPAIGNS = Path(__file__).resolve().parent.parent / "campaigns"


def _yaml(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


GOOD = """
name: t
datasets: [counterfact_valid.json]
grid: {method: [cosine], T: [10]}
"""


@pytest.mark.parametrize("text, field", [
    (GOOD.replace("T: [10]", "T: [0]"), "grid.T[0]"),
    (GOOD.replace("T: [10]", "T: [10], depth: [3]"), "grid.depth"),
    (GOOD.replace("method: [cosine]", "method: [cosine, cosine]"), "grid.method"),
    (GOOD.replace("T: [10]", "T: [10], threshold: {margin: [0.5]}"), "grid.threshold.margin"),
    (GOOD.replace("T: [10]", "T: [10], threshold: [high]"), "grid.threshold[0]"),
    (GOOD + "options: {fluency_prompts: many}\n", "options.fluency_prompts"),
    (GOOD + "options: {colour: red}\n", "options.colour"),
    (GOOD + "options: {edit_config: {values: {stepz: 3}}}\n", "options.edit_config"),
    (GOOD + "options: {calibration: {target_rate: 2}}\n", "options.calibration"),
    (GOOD + "options: {calibration: {rate: 0.01}}\n", "options.calibration"),
    (GOOD + "options: {calibration: {placement: true}}\n", "options.calibration.placement"),
    (GOOD + "options: {calibration: {max_edits: 1024.0}}\n", "options.calibration.max_edits"),  # an integer
    (GOOD + "options: {edit_config: {layer: 3}}\n", "options.edit_config.layer"),  # the grid's layer axis sets it
    (GOOD + "options: {edit_config: {seed: 7}}\n", "options.edit_config.seed"),
    (GOOD.replace("method: [cosine]", "method: [cosine, rome]").replace("T: [10]", "T: [10], threshold: [0.5]"),
     "grid.threshold.rome"),  # an in-place editor has no threshold: every cell would fail after loading the model
    (GOOD.replace("name: t", "name: 'bad name/'"), "name"),
    (GOOD.replace("datasets: [counterfact_valid.json]\n", ""), "datasets"),
    (GOOD + "sed: 1\n", "sed"),
    (GOOD.replace("method: [cosine]", "method: [cosine, ferret]"), "grid.method[1]"),
    (GOOD.replace("method: [cosine]", "method: [memit+cal]"), "grid.method[0]"),
    (GOOD.replace("method: [cosine]", "method: [cosine+cal]").replace("T: [10]", "T: [10], threshold: [0.5]"),
     "grid.threshold.cosine+cal"),
    ("name: t\ngrid: [1, 2\n", "<file>"),
    (GOOD.replace("T: [10]", "T: [10], threshold: [-2]"), "grid.threshold.cosine"),  # a cosine is never below -1
    (GOOD.replace("method: [cosine]", "method: [margin]").replace("T: [10]", "T: [10], threshold: [1.0]"),
     "grid.threshold.margin"),  # the margin activation would divide by gelu(0)
    (GOOD.replace("[counterfact_valid.json]", "[synthetic]").replace("method: [cosine]", "method: [cosine, cosine+cal]"),
     "grid.method[1]"),  # scale cells measure a plain router
    (GOOD.replace("[counterfact_valid.json]", "[synthetic]").replace("method: [cosine]", "method: [rome]"), "grid.method[0]"),
])
def test_bad_campaign_yaml_names_the_field(tmp_path, text, field):
    with pytest.raises(CampaignSpecError) as exc:
        load_campaign(_yaml(tmp_path, text))
    assert exc.value.field == field
    assert repr(field) in str(exc.value) and "c.yaml" in str(exc.value)


def test_a_rate_written_with_an_exponent_is_a_number(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; the documented `target_rate: 1e-3` must parse as 0.001."""
    from cluster.campaign import select_cells

    p = tmp_path / "c.yaml"
    p.write_text(GOOD.replace("[cosine]", "[cosine+cal]") + "options: {calibration: {target_rate: 1e-3}}\n")
    (cell,) = load_campaign(p).cells()
    assert cell.options["calibration"] == {"target_rate": 0.001}
    assert select_cells([cell], ["T=1e1"]) == [cell], "--only values read the same way"


def test_campaign_model_must_exist_before_any_cell_runs(tmp_path):
    from typer.testing import CliRunner

    from cluster.campaign import check_model
    from cluster.cli import app

    path = _yaml(tmp_path, GOOD + "model: /nonexistent/model-folder\n")
    with pytest.raises(CampaignSpecError) as exc:
        check_model(load_campaign(path))
    assert exc.value.field == "model" and "/nonexistent/model-folder" in str(exc.value)
    res = CliRunner().invoke(app, ["campaign", "run", str(path), "--store", str(tmp_path / "store"), "--json"])
    assert res.exit_code == 2 and "'model'" in res.output and not (tmp_path / "store").exists()
    check_model(load_campaign(_yaml(tmp_path, GOOD)))  # the default model is a known name


def test_bad_campaign_cli_exits_with_the_field(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    res = CliRunner().invoke(app, ["campaign", "run", str(_yaml(tmp_path, GOOD.replace("T: [10]", "T: [-5]"))),
                                   "--store", str(tmp_path / "store"), "--json"])
    assert res.exit_code == 2
    err = json.loads(res.stdout.strip().splitlines()[-1])
    assert "'grid.T[0]'" in err["message"] and err["error"] == "CampaignSpecError"
    assert not (tmp_path / "store" / "campaigns").exists()  # nothing written


def test_shipped_campaigns_expand_to_their_grids():
    paper = load_campaign(CAMPAIGNS / "paper.yaml")
    cells = paper.cells()
    # datasets x T x (3 cosine + 3 whitened thresholds + margin, 2 robust-key and 2 calibrated variants, 4 baselines)
    assert len(cells) == 2 * 4 * (3 + 3 + 1 + 2 + 2 + 4)
    assert {c.method for c in cells} == {"cosine", "whitened", "margin", "cosine+rep", "whitened+rep", "cosine+cal",
                                         "whitened+cal", "rome", "memit", "alphaedit", "scr"}
    assert sorted({c.T for c in cells}) == [1, 10, 100, 400] and {c.batch for c in cells} == {1}
    smoke = load_campaign(CAMPAIGNS / "smoke.yaml").cells()
    assert [(c.method, c.threshold, c.T) for c in smoke] == [
        ("cosine", None, 10), ("cosine", 0.8, 10), ("margin", None, 10), ("margin", 0.8, 10)]
    assert len({c.cell_id for c in smoke}) == 4
    assert [c.cell_id for c in load_campaign(CAMPAIGNS / "smoke.yaml").cells()] == [c.cell_id for c in smoke]
    # batch is capped at T, so grid points that mean the same run collapse into one cell
    spec = parse_campaign({"name": "x", "datasets": ["synthetic"], "grid": {"method": ["cosine"], "T": [5], "batch": [5, 8]}})
    assert len(spec.cells()) == 1 and spec.cells()[0].batch == 5


def test_calibrated_cells_use_the_memories_default_calibration_and_their_id_follows_it():
    """"+cal" cells calibrate as a new store memory does (`DEFAULT_CALIBRATION`), so campaign numbers describe the
    shipped default; a campaign can override it, and only calibrated cells' ids change with it."""
    from cluster.campaign import calibration_config
    from cluster.commit import DEFAULT_CALIBRATION

    grid = {"method": ["cosine", "cosine+cal"], "T": [10]}
    plain = parse_campaign({"name": "x", "datasets": ["counterfact_valid.json"], "grid": grid}).cells()
    strict = parse_campaign({"name": "x", "datasets": ["counterfact_valid.json"], "grid": grid,
                             "options": {"calibration": {"target_rate": 1e-3}}}).cells()
    assert calibration_config(plain[1].options) == DEFAULT_CALIBRATION
    assert calibration_config(strict[1].options) == {**DEFAULT_CALIBRATION, "target_rate": 1e-3}
    assert plain[0].cell_id == strict[0].cell_id, "an uncalibrated cell does not use the calibration"
    assert plain[1].cell_id != strict[1].cell_id, "results at another target rate are not reused"


def test_a_baselines_revision_or_settings_make_its_old_cells_stale(monkeypatch):
    """A change of a baseline's code (its `revision`) or default settings changes its cells' ids, so a resumed
    campaign re-runs them instead of reporting numbers of the old method; router cells keep theirs."""
    from editing.baselines.base import BASELINES
    from editing.baselines.rome import RomeSettings

    def ids():
        cells = parse_campaign({"name": "x", "datasets": ["counterfact_valid.json"],
                                "grid": {"method": ["cosine", "rome"], "T": [10]}}).cells()
        return {c.method: c.cell_id for c in cells}

    before = ids()
    monkeypatch.setattr(BASELINES["rome"], "revision", BASELINES["rome"].revision + 1)
    revised = ids()
    assert revised["rome"] != before["rome"] and revised["cosine"] == before["cosine"]
    monkeypatch.setattr(RomeSettings.__init__, "__defaults__", (None, 12345))  # layer, stats_tokens
    assert ids()["rome"] not in (before["rome"], revised["rome"]), "a changed default"


def test_a_routers_default_threshold_or_reps_settings_make_their_cells_stale(monkeypatch):
    """Cells that leave the threshold to the router, and "+rep" cells, depend on defaults their grid point does
    not name: changing one changes those cells' ids (only theirs)."""
    from editing import evaluate, rep
    from editing.routers import ROUTERS

    def ids():
        cells = parse_campaign({"name": "x", "datasets": ["counterfact_valid.json"],
                                "grid": {"method": ["margin", "cosine", "cosine+rep"], "T": [10],
                                         "threshold": {"cosine": [0.5], "cosine+rep": [0.5]}}}).cells()
        return {c.method: c.cell_id for c in cells}

    before = ids()
    monkeypatch.setattr(ROUTERS["margin"], "default_threshold", 0.7)
    moved = ids()
    assert moved["margin"] != before["margin"]
    assert moved["cosine"] == before["cosine"] and moved["cosine+rep"] == before["cosine+rep"], "threshold given"
    shipped = rep.RobustKeyHparams

    @dataclasses.dataclass
    class Longer(shipped):
        steps: int = 600

    monkeypatch.setattr(rep, "RobustKeyHparams", Longer)
    assert ids()["cosine+rep"] != before["cosine+rep"] and ids()["cosine"] == before["cosine"]
    monkeypatch.setattr(rep, "RobustKeyHparams", shipped)
    assert ids()["cosine+rep"] == before["cosine+rep"]
    monkeypatch.setattr(evaluate, "TRAIN_REPHRASES", 3)
    assert ids()["cosine+rep"] != before["cosine+rep"]


def test_only_selects_grid_cells_by_value_and_keeps_their_ids():
    from cluster.campaign import select_cells

    cells = load_campaign(CAMPAIGNS / "targets.yaml").cells()
    assert len(cells) == 12
    one = select_cells(cells, ["method=cosine+rep", "T=400"])
    assert [(c.method, c.T) for c in one] == [("cosine+rep", 400)]
    assert one[0].cell_id in {c.cell_id for c in cells}  # same id, so it lands beside a full run's results
    assert len(select_cells(cells, ["batch=25"])) == 12, "the grid's batch, capped at T = 1 and 10 in those cells"
    two = select_cells(cells, ["T=100", "T=400", "threshold=null"])  # a repeated field matches either value
    assert [(c.method, c.T) for c in two] == [("cosine+cal", 100), ("cosine+cal", 400)]
    assert [c.T for c in select_cells(cells, ["threshold=0.5", "method=cosine"])] == [1, 10, 100, 400]
    assert select_cells(cells, None) == cells
    for only, reason in [(["depth=3"], "unknown field 'depth'"), (["T"], "FIELD=VALUE"), (["T="], "FIELD=VALUE"),
                         (["T=[1"], "not a YAML value"), (["method=cosine", "T=7"], "matches none of the 12 cells")]:
        with pytest.raises(CampaignSpecError) as exc:
            select_cells(cells, only)
        assert exc.value.field.startswith("--only") and reason in str(exc.value), (only, str(exc.value))


def test_only_with_no_match_exits_before_anything_is_written(tmp_path):
    from typer.testing import CliRunner

    from cluster.cli import app

    res = CliRunner().invoke(app, ["campaign", "run", str(_yaml(tmp_path, GOOD)), "--only", "T=400",
                                   "--store", str(tmp_path / "store"), "--json"])
    assert res.exit_code == 2
    err = json.loads(res.stdout.strip().splitlines()[-1])
    assert "'--only T=400'" in err["message"] and "matches none of the 1 cells" in err["message"]
    assert not (tmp_path / "store" / "campaigns").exists()


def test_synthetic_facts_are_seeded_unique_and_use_real_templates(tmp_path):
    from editing import load_records
    from editing.data import data_file
    from editing.synthetic import load_relations, synthetic_requests, write_jsonl

    real = load_records(data_file("counterfact_valid.json")) + load_records(data_file("counterfact_test.json"))
    real_targets: dict[str, set] = {}
    for r in real:
        real_targets.setdefault(r.prompt.replace(r.subject, "{}", 1), set()).update([r.target_new, r.target_true])
    rels = load_relations()
    assert len(rels) >= 30 and all(rel.template in real_targets for rel in rels)

    a = synthetic_requests(3000, seed=7, relations=rels)
    assert a == synthetic_requests(3000, seed=7, relations=rels)
    b = synthetic_requests(3000, seed=8, relations=rels)
    assert [r.subject for r in a] != [r.subject for r in b]
    assert len({r.subject for r in a}) == 3000
    real_subjects = {r.subject for r in real}
    used_templates = set()
    for r in a:
        assert r.subject not in real_subjects and re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", r.subject)
        template = r.prompt.replace(r.subject, "{}", 1)
        assert template in real_targets
        assert {r.target_new, r.target_true} <= real_targets[template] and r.target_new != r.target_true
        used_templates.add(template)
    assert len(used_templates) > 0.9 * len(rels)
    back = load_records(write_jsonl(a[:50], tmp_path / "f.jsonl"))
    assert [(r.subject, r.prompt, r.target_new, r.target_true) for r in back] == \
        [(r.subject, r.prompt, r.target_new, r.target_true) for r in a[:50]]


def test_scale_measurement_on_the_real_model(smol):
    from editing.synthetic import measure_scale, scale_memory, synthetic_requests

    reqs = synthetic_requests(200, seed=3)
    sm = scale_memory(smol, reqs, router="cosine", value_sample=2)
    assert sm.memory.n_facts == 200 and smol.memory is None
    assert sm.memory.residuals[[sm.memory.slots[e] for e in sm.edit_ids[2:]]].abs().sum() == 0  # zeros past the sample
    res = measure_scale(smol, sm, wikitext_tokens=1000)
    assert smol.memory is None
    assert res["n_facts"] == 200 and res["wikitext_tokens"] == 1000 and res["threshold"] == pytest.approx(0.65)
    # each invented subject's own prompt finds its own row among 200, and the gate opens for it
    assert res["routing_top1"] >= 0.9 and res["routing_capacity"] >= 0.8
    assert res["false_gate_rate"] < 0.05
    assert res["sample_efficacy"] == 1.0
    # a gate no cosine score passes: nothing routes; a gate at 0: nearly every WikiText token gates on
    sm.memory.threshold.fill_(1.01)
    shut = measure_scale(smol, sm, wikitext_tokens=1000)
    assert shut["routing_capacity"] == 0 and shut["false_gate_rate"] == 0
    assert shut["routing_top1"] == res["routing_top1"]
    sm.memory.threshold.fill_(0.0)
    wide = measure_scale(smol, sm, wikitext_tokens=1000)
    assert wide["false_gate_rate"] > 0.5 and wide["routing_capacity"] == wide["routing_top1"]


def _png_ok(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_report_leaves_out_cells_of_an_earlier_grid(tmp_path):
    """A results table can hold cells of an earlier grid or scoring (their ids differ); the report shows the
    grid as last run and says how many it left out."""

    from cluster.campaign import CampaignResults
    from cluster.campaign_report import write_report

    spec = load_campaign(CAMPAIGNS / "smoke.yaml")
    store = str(tmp_path / "store")
    results = CampaignResults("smoke", store)
    results.write_spec(spec)
    cells = spec.cells()
    for i, cell in enumerate(cells):
        results.write_cell(cell, {"n_edits": cell.T, "threshold": 0.5 + 0.1 * i, "layer": 6, "efficacy": 0.9})
    old = dataclasses.replace(cells[0], T=7, batch=7)  # a grid point the campaign no longer has
    results.write_cell(old, {"n_edits": 7, "threshold": 0.5, "layer": 6, "efficacy": 0.123})
    assert len(results.frame()) == len(cells) + 1
    text = write_report("smoke", tmp_path / "report", store=store).read_text()
    assert "1 recorded cell(s) of an earlier grid or scoring left out" in text
    assert "T = 7" not in text and "12.3" not in text and f"cells: {len(cells)} finished" in text


def test_report_of_baselines_without_a_layer_and_lines_by_grid_batch_and_threshold(tmp_path):
    """scr has no layer beside in-place editors that report theirs: the table shows "–" (it crashed on NaN);
    lines against T follow the grid's batch (capped at T per cell) and threshold (a calibrated cell's own
    threshold differs per T), so each method is one line, not one dot per T."""
    import pandas as pd

    from cluster.campaign import CampaignResults
    from cluster.campaign_report import _by_grid_batch, write_report

    spec = parse_campaign({"name": "mix", "datasets": ["counterfact_valid.json"], "grid": {
        "method": ["cosine+cal", "rome", "scr"], "T": [1, 10], "batch": [5]}})
    store = str(tmp_path / "store")
    results = CampaignResults("mix", store)
    results.write_spec(spec)
    layers = {"cosine+cal": 6, "rome": 8, "scr": None}
    for i, cell in enumerate(spec.cells()):
        results.write_cell(cell, {"n_edits": cell.T, "threshold": 0.5 + 0.01 * i, "layer": layers[cell.method],
                                  "efficacy": 0.5 + 0.04 * i})
    text = write_report("mix", tmp_path / "report", store=store).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| scr |"))
    assert "| – |" in row and "| Layer |" in text
    frame = _by_grid_batch(results.frame(), [5])
    assert sorted(frame["grid_batch"]) == [5] * 6, "the T = 1 cells (batch 1) stand for the grid's batch 5"
    both = _by_grid_batch(pd.DataFrame({"T": [1, 10], "batch": [1, 1]}), [1, 32])
    assert sorted(both["grid_batch"]) == [1, 1, 32], "T = 1 stands for both batches; T = 10 at batch 1 for one"


def test_spec_as_last_run_and_ok_results_survive_a_rerun_and_a_late_error(tmp_path):
    """Going back to a grid whose cells are all finished makes it the grid the report shows (nothing runs,
    no Ray); a concurrent run's error for a cell another run finished does not replace the result."""
    from cluster.campaign import CampaignResults, run_campaign
    from cluster.campaign_report import write_report

    store = str(tmp_path / "store")
    grid_a = parse_campaign({"name": "g", "datasets": ["counterfact_valid.json"], "grid": {"method": ["cosine"], "T": [2]}})
    grid_b = parse_campaign({"name": "g", "datasets": ["counterfact_valid.json"], "grid": {"method": ["cosine"], "T": [3]}})
    results = CampaignResults("g", store)
    (cell,) = grid_a.cells()
    results.write_cell(cell, {"n_edits": 2, "threshold": 0.5, "layer": 6, "efficacy": 1.0})
    results.write_spec(grid_b)  # grid B was started (and interrupted) last
    run = run_campaign(grid_a, store=store)
    assert run.skipped == 1 and run.ok == 0
    assert "T = 2" in write_report("g", tmp_path / "r", store=store).read_text()
    results.write_cell(cell, error="RuntimeError: a second run failed late")
    assert results.finished() == {cell.cell_id: "ok"}


def test_a_dataset_that_is_not_a_file_is_refused_before_anything_runs(tmp_path):
    from cluster.campaign import check_datasets

    spec = parse_campaign({"name": "d", "datasets": [str(tmp_path)], "grid": {"method": ["cosine"], "T": [2]}})
    with pytest.raises(CampaignSpecError) as exc:
        check_datasets(spec)
    assert exc.value.field == "datasets[0]" and "not a file" in str(exc.value)


def test_small_campaign_end_to_end_with_report_and_resume(tmp_path):
    import pandas as pd

    from cluster.campaign import CampaignResults, run_campaign
    from cluster.campaign_report import format_value, write_report

    spec = load_campaign(CAMPAIGNS / "smoke.yaml")
    spec.methods.append("no-such-method")  # one cell that must fail without stopping the others
    spec.thresholds["no-such-method"] = [None]
    store = str(tmp_path / "store")
    seen = []
    run = run_campaign(spec, store=store, workers=1, on_cell=lambda cell, row: seen.append((cell.cell_id, row["status"])))
    assert (run.cells, run.skipped, run.ok, run.failed) == (5, 0, 4, 1)
    assert len(seen) == 5 and sorted(s for _, s in seen) == ["error"] + ["ok"] * 4

    df = pd.read_parquet(CampaignResults("smoke", store).results_dir)  # the store's results table, read by pandas
    assert len(df) == 5 and set(df["cell_id"]) == {c.cell_id for c in spec.cells()}
    bad = df[df["status"] == "error"].iloc[0]
    assert bad["method"] == "no-such-method" and "no-such-method" in bad["error"]
    ok = df[df["status"] == "ok"]
    assert (ok["n_edits"] == 10).all() and ok["efficacy"].notna().all() and ok["withdrawal_reverted"].notna().all()
    assert (ok["withdrawal_reverted"] == 1.0).all()  # deleted edits give exactly the unedited logits
    assert sorted(ok["threshold_used"].round(2)) == [0.6, 0.65, 0.8, 0.8]  # margin/cosine defaults, then 0.8
    assert (ok[ok["threshold_used"].round(2) < 0.8]["efficacy"] >= 0.8).all()  # the edits work at the defaults

    report = write_report("smoke", tmp_path / "report", store=store)
    text = report.read_text()
    pngs = sorted((tmp_path / "report" / "plots").glob("*.png"))
    assert {"T_efficacy.png", "threshold_efficacy.png", "T_withdrawal_reverted.png"} <= {p.name for p in pngs}
    assert all(_png_ok(p) for p in pngs)
    for p in pngs:
        assert f"(plots/{p.name})" in text
    # the comparison table carries each cell's numbers as stored in the results table
    table_rows = [line for line in text.splitlines() if line.startswith("| cosine") or line.startswith("| margin")]
    assert len(table_rows) == 4
    for _, r in ok.iterrows():
        row = next(line for line in table_rows if line.startswith(f"| {r['method']} | {r['threshold_used']:.2f} |"))
        cols = [c.strip() for c in row.strip("|").split("|")]
        assert cols[2] == format_value("efficacy", r["efficacy"])
        assert cols[3] == format_value("generalization", r["generalization"])
        assert cols[4] == f"{format_value('specificity', r['specificity'])} ({format_value('pre_specificity', r['pre_specificity'])})"
        assert format_value("withdrawal_reverted", r["withdrawal_reverted"]) == "100.0" and "100.0" in cols
    assert "## Failed cells" in text and "no-such-method" in text.split("## Failed cells")[1]

    # resume: every cell is recorded, so a second run starts nothing (no Ray, no model) and is quick
    t0 = time.perf_counter()
    again = run_campaign(spec, store=store, workers=1, retry_failed=False)
    assert (again.skipped, again.ok, again.failed) == (5, 0, 0) and time.perf_counter() - t0 < 10
    assert len(pd.read_parquet(CampaignResults("smoke", store).results_dir)) == 5

    # the same through the CLI (the shipped smoke.yaml: its 4 cells are all done)
    from typer.testing import CliRunner

    from cluster.cli import app

    res = CliRunner().invoke(app, ["campaign", "run", str(CAMPAIGNS / "smoke.yaml"), "--store", store, "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["cells"], summary["skipped"], summary["ok"]) == (4, 4, 0)
    res = CliRunner().invoke(app, ["campaign", "report", "smoke", "--out", str(tmp_path / "cli-report"), "--store", store])
    assert res.exit_code == 0 and Path(res.stdout.strip()).read_text().count("| cosine |") == 2
