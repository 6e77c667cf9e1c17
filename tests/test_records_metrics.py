"""Format readers with good and bad records, and metric functions against hand-computed values."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from editing.evaluate import _rate_per_edit, ngram_entropy, shuffle_subject, shuffled_prompt
from editing.records import EditRecordError, load_records, parse_record


def _write(tmp_path, records, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


def test_shared_rep_format_reads_every_record():
    from editing.data import data_file

    for name, n in [("counterfact_valid.json", 100), ("counterfact_test.json", 400), ("zsre_test.json", 400)]:
        recs = load_records(data_file(name))
        assert len(recs) == n
        assert all(r.subject in r.prompt and r.target_new for r in recs)
    cf = load_records(data_file("counterfact_valid.json"), limit=1)[0]
    raw = json.loads(data_file("counterfact_valid.json").read_text())[0]
    assert cf.rephrase_prompts and cf.locality_prompts and len(cf.subject_rephrases) == 10
    assert cf.locality_answers == [raw["locality_ground_truth"]] * len(cf.locality_prompts) and cf.index == 0


def test_original_counterfact_format(tmp_path):
    rec = {"case_id": 7, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                               "target_new": {"str": "English"}, "target_true": {"str": "French"}},
           "paraphrase_prompts": ["Danielle Darrieux spoke"], "neighborhood_prompts": ["Léon Blum spoke"],
           "generation_prompts": ["Danielle Darrieux's mother tongue is"]}
    r = load_records(_write(tmp_path, [rec]))[0]
    assert r.prompt == "The mother tongue of Danielle Darrieux is" and r.target_new == "English"
    assert r.case_id == "7" and r.locality_answers == ["French"]
    bad = dict(rec, requested_rewrite=dict(rec["requested_rewrite"], prompt="no placeholder"))
    with pytest.raises(EditRecordError, match=r"record 1, case_id=7: field 'requested_rewrite.prompt'"):
        load_records(_write(tmp_path, [rec, bad]))


def test_nested_counterfact_fields_are_named_in_full(tmp_path):
    rw = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
          "target_new": {"str": "English"}, "target_true": {"str": "French"}}
    for broken, field in ((dict(rw, subject=""), "requested_rewrite.subject"),
                          ({k: v for k, v in rw.items() if k != "prompt"}, "requested_rewrite.prompt"),
                          (dict(rw, target_new={"str": " "}), "requested_rewrite.target_new.str")):
        with pytest.raises(EditRecordError) as exc:
            load_records(_write(tmp_path, [{"case_id": 2, "requested_rewrite": broken}]))
        assert exc.value.field == field


def test_empty_evaluation_prompts_are_left_out_and_named(tmp_path, caplog):
    """An empty paraphrase has no token to score the target after (the shared sets hold a few): it is dropped,
    with a warning naming the record and the entry, instead of being scored at another position."""
    rec = {"case_id": 5, "subject": "Y", "prompt": "Y is", "target_new": "Z", "target_true": "W",
           "rephrase_prompt": ["Y, it is", "", " "], "subject_rephrase": ["", "Why"]}
    with caplog.at_level("WARNING", logger="editing.records"):
        r = load_records(_write(tmp_path, [rec]))[0]
    assert r.rephrase_prompts == ["Y, it is"] and r.subject_rephrases == ["Why"]
    assert "record 0, case_id=5: field 'rephrase_prompt[1], rephrase_prompt[2]': empty, left out" in caplog.text
    assert "subject_rephrase[0]" in caplog.text
    paired = dict(rec, locality_prompt=["A is", "", "C is"], locality_ground_truth=["a", "b", "c"])
    r = load_records(_write(tmp_path, [paired]))[0]
    assert list(zip(r.locality_prompts, r.locality_answers)) == [("A is", "a"), ("C is", "c")], "answers stay paired"
    with pytest.raises(EditRecordError, match="2 answers for 3 locality prompts"):
        load_records(_write(tmp_path, [dict(paired, locality_ground_truth=["a", "b"])]))


def test_a_prompt_without_tokens_cannot_be_scored(tokenizer):
    from conftest import build_tiny
    from editing.metrics import target_nll

    with pytest.raises(ValueError, match="no tokens"):
        target_nll(build_tiny("llama"), tokenizer, ["A prompt", ""], [" Paris", " Paris"])


def test_mend_zsre_format(tmp_path):
    rec = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "alt": "University of Michigan",
           "answers": ["Illinois Institute of Technology"], "rephrase": "What university did Watts Humphrey take part in?",
           "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}
    r = load_records(_write(tmp_path, [rec]))[0]
    assert r.target_new == "University of Michigan" and r.rephrase_prompts == [rec["rephrase"]]
    assert r.locality_prompts == [rec["loc"]] and r.locality_answers == ["Hugo Weaving"]
    with pytest.raises(EditRecordError, match="field 'alt'"):
        load_records(_write(tmp_path, [dict(rec, alt=5)]))


@pytest.mark.parametrize("rec, field", [
    ({"subject": "X", "prompt": "Y is", "target_new": "Z", "target_true": "W"}, "subject"),
    ({"subject": "Y", "prompt": "Y is", "target_new": "", "target_true": "W"}, "target_new"),
    ({"subject": "Y", "prompt": "Y is", "target_true": "W"}, "target_new"),
    ({"subject": "Y", "prompt": 3, "target_new": "Z"}, "prompt"),
    ({"subject": "Y", "prompt": "Y is", "target_new": "Z", "subject_rephrase": "notalist", "rephrase_prompt": [1]}, "rephrase_prompt[0]"),
    ({"subject": "Y", "prompt": "Y is", "target_new": "Z", "rephrase_prompt": {"a": 1}}, "rephrase_prompt"),
    ({"subject": "Y", "prompt": "Y is", "target_new": "Z", "rephrase_target": "Q"}, "rephrase_target"),
    ("not an object", "<record>"),
])
def test_bad_rep_records_name_file_record_and_field(tmp_path, rec, field):
    good = {"case_id": 1, "subject": "Y", "prompt": "Y is", "target_new": "Z", "target_true": "W"}
    path = _write(tmp_path, [good, rec])
    with pytest.raises(EditRecordError) as exc:
        load_records(path)
    assert exc.value.field == field and exc.value.index == 1 and str(path) in str(exc.value)


def test_counterfact_template_with_other_braces_and_string_neighbourhood(tmp_path):
    rec = {"case_id": 3, "requested_rewrite": {"prompt": "{} is a {kind} of", "subject": "Paris",
                                               "target_new": {"str": "Rome"}, "target_true": {"str": "France"}},
           "neighborhood_prompts": "Lyon is a city of"}
    r = load_records(_write(tmp_path, [rec]))[0]
    assert r.prompt == "Paris is a {kind} of"
    assert r.locality_prompts == ["Lyon is a city of"] and r.locality_answers == ["France"]


def test_locality_answers_must_match_their_prompts(tmp_path):
    zsre = {"subject": "Watts Humphrey", "src": "Where did Watts Humphrey study?", "alt": "Michigan", "answers": ["IIT"],
            "loc": "nq question: who wrote hamlet"}
    with pytest.raises(EditRecordError, match="record 0: field 'loc_ans'"):
        load_records(_write(tmp_path, [zsre]))
    rep = {"subject": "Y", "prompt": "Y is", "target_new": "Z", "locality_prompt": ["a", "b", "c"],
           "locality_ground_truth": ["x", "y"]}
    with pytest.raises(EditRecordError, match="field 'locality_ground_truth': 2 answers for 3"):
        load_records(_write(tmp_path, [rep]))
    one = load_records(_write(tmp_path, [dict(rep, locality_ground_truth=["x"])]))[0]
    assert one.locality_answers == ["x", "x", "x"]


def test_records_object_and_single_record_files(tmp_path):
    rec = {"subject": "Y", "prompt": "Y is", "target_new": "Z"}
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"records": [rec, dict(rec, target_new="W")]}))
    assert [r.target_new for r in load_records(p)] == ["Z", "W"]
    p.write_text(json.dumps(rec, indent=1))  # one record, pretty-printed over several lines
    assert [r.target_new for r in load_records(p)] == ["Z"]
    p.write_text(json.dumps({"records": {"subject": "Y"}}))
    with pytest.raises(EditRecordError, match="field 'records': expected a list"):
        load_records(p)


def test_validation_errors_name_the_file_position_of_the_record(tmp_path, tokenizer):
    from editing.prompts import check_request
    from editing.records import check_batch_conflicts

    recs = [{"subject": "Y", "prompt": "Y is", "target_new": "Z"}] * 50 + [
        {"case_id": 51, "subject": "Y", "prompt": "Y is", "target_new": "word " * 40}]
    path = _write(tmp_path, recs)
    reqs = load_records(path, offset=49)
    with pytest.raises(EditRecordError, match=r"record 50, case_id=51: field 'target_new': \d+ tokens") as exc:
        check_request(tokenizer, reqs[1], 1, max_target_tokens=16)  # index 1 in the batch, 50 in the file
    assert str(path) in str(exc.value)
    with pytest.raises(EditRecordError, match="record 50, case_id=51: field 'target_new': conflicts with record 49"):
        check_batch_conflicts(reqs)


def test_jsonl_and_bad_json(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"subject": "Y", "prompt": "Y is", "target_new": "Z"}) + "\n\n{broken\n")
    with pytest.raises(EditRecordError, match="line 3: invalid JSON"):
        load_records(p)


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams (a,b)x2 (b,a)x1 -> H2 = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams (a,b,a),(b,a,b) -> H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("a a a a a") == 0.0
    assert ngram_entropy("") == 0.0


def test_rate_per_edit_averages_each_edit_first():
    # edit a: 3 of 3 paraphrases succeed, edit b: 0 of 1 -> (1 + 0) / 2, not the pooled 3 / 4 (rome's summarize.py)
    assert _rate_per_edit([1, 1, 1, 0], ["a", "a", "a", "b"]) == pytest.approx(0.5)
    assert _rate_per_edit([1, 0, 1, 0], [0, 0, 1, 1]) == pytest.approx(0.5)
    assert _rate_per_edit([], []) is None


def test_shuffle_subject_permutes_tokens(tokenizer):
    s = "Danielle Darrieux"
    for lead in (False, True):  # tokenized alone, or as inside a prompt after a word (" Danielle")
        shuffled = shuffle_subject(tokenizer, s, seed=0, leading_space=lead)
        assert shuffled != s and shuffled == shuffled.strip() and "  " not in shuffled
        ids = tokenizer((" " if lead else "") + s, add_special_tokens=False)["input_ids"]
        pieces = [tokenizer.decode([i]) for i in ids]
        assert len(pieces) > 1 and any(" ".join("".join(p).split()) == shuffled for p in itertools.permutations(pieces))
        assert shuffle_subject(tokenizer, s, seed=0, leading_space=lead) == shuffled
    from editing.records import EditRequest

    r = EditRequest(subject=s, prompt="The mother tongue of Danielle Darrieux is", target_new="English")
    p = shuffled_prompt(tokenizer, r, seed=0)
    assert p.startswith("The mother tongue of ") and p.endswith(" is") and "  " not in p and s not in p


def test_bad_records_stop_an_evaluation_before_any_edit(smol, cf_valid, monkeypatch):
    """Every record is checked before the first batch is computed, and NLL scoring needs target_true."""
    import dataclasses

    from editing.evaluate import run_sequential

    calls = []
    real = smol.compute
    monkeypatch.setattr(smol, "compute", lambda *a, **k: calls.append(1) or real(*a, **k))
    reqs = list(cf_valid[:3])
    no_true = reqs[:2] + [dataclasses.replace(reqs[2], target_true="")]
    with pytest.raises(EditRecordError, match=r"record 2.*target_true"):
        run_sequential(smol, no_true, batch=1, router="cosine", fluency_prompts=0)
    bad_subject = reqs[:2] + [dataclasses.replace(reqs[2], subject="Nobody Atall")]
    with pytest.raises(EditRecordError, match="subject"):
        run_sequential(smol, bad_subject, batch=1, router="cosine", fluency_prompts=0)
    assert calls == [] and smol.memory is None, "nothing was computed or attached"


def test_a_target_that_starts_with_a_space_gets_no_lone_space_token(tokenizer):
    """zsRE has targets like " Garcilaso": rome adds the space only when it is missing."""
    from editing.prompts import target_token_ids

    prompt = "The author of the novel is"
    spaced, plain = target_token_ids(tokenizer, prompt, " Garcilaso"), target_token_ids(tokenizer, prompt, "Garcilaso")
    assert spaced == plain and tokenizer.decode(plain[:1]).strip(), "the first target token is not a bare space"


def test_unreadable_or_empty_data_files_are_errors_naming_the_file(tmp_path):
    binary = tmp_path / "b.json"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(EditRecordError, match=r"b\.json.*not UTF-8"):
        load_records(binary)
    for text in ("[]", "", "{\"records\": []}"):
        empty = _write(tmp_path, [], name="e.json")
        empty.write_text(text)
        with pytest.raises(EditRecordError, match=r"e\.json.*holds no records"):
            load_records(empty)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_records(tmp_path)
