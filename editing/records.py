"""Edit records: what a user asks to change, read from the shared data formats and validated.

Three input formats are auto-detected per record:
- the REP format of `../shared/data/*.json` (`subject`, `prompt`, `target_new`, `target_true`, ...);
- the original CounterFact JSON (`requested_rewrite` with a "{}" prompt template);
- the MEND zsRE JSON (`src`, `alt`, `answers`, `rephrase`, `loc`, `loc_ans`, `subject`).
A file is a JSON list or JSONL. Every error names the file, the record and the field.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)


class EditRecordError(ValueError):
    """A bad edit record. Names the record (index and case_id) and the offending field."""

    def __init__(self, index: int | None, field: str, reason: str, case_id: Any = None, source: str | None = None):
        self.index, self.field, self.reason, self.case_id, self.source = index, field, reason, case_id, source
        where = []
        if source:
            where.append(str(source))
        if index is not None:
            where.append(f"record {index}")
        if case_id is not None:
            where.append(f"case_id={case_id}")
        super().__init__(f"{', '.join(where) or 'record'}: field {field!r}: {reason}")

    def to_dict(self) -> dict:
        return {"index": self.index, "case_id": self.case_id, "field": self.field, "reason": self.reason}


@dataclass
class EditRequest:
    """One fact to write: in `prompt` (which contains `subject`), the answer becomes `target_new`.

    The optional lists are for evaluation only: paraphrases of the prompt, neighbourhood
    prompts whose answer (`locality_answers`) must not change, and rephrasings of the subject.
    """

    subject: str
    prompt: str
    target_new: str
    target_true: str = ""
    case_id: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality_prompts: list[str] = field(default_factory=list)
    locality_answers: list[str] = field(default_factory=list)
    subject_rephrases: list[str] = field(default_factory=list)
    source: str | None = None
    index: int | None = None  # the record's position in `source`, for error messages

    def where(self, fallback: int) -> dict:
        """`EditRecordError` arguments naming this record: its file position (else `fallback`), case_id, file."""
        return {"index": fallback if self.index is None else self.index, "case_id": self.case_id, "source": self.source}

    def to_dict(self) -> dict:
        return asdict(self)


def _req_str(rec: dict, key: str, index: int, case_id, source, allow_empty=False, within: str = "") -> str:
    """`rec[key]`, a non-empty string; errors name the field as `within` + key (e.g. "requested_rewrite.")."""
    name = within + key
    if key not in rec:
        raise EditRecordError(index, name, "missing", case_id, source)
    val = rec[key]
    if not isinstance(val, str):
        raise EditRecordError(index, name, f"expected a string, got {type(val).__name__}", case_id, source)
    if not allow_empty and not val.strip():
        raise EditRecordError(index, name, "empty", case_id, source)
    return val


def _str_list(rec: dict, key: str, index: int, case_id, source, keep_empty: bool = False) -> list[str]:
    """An evaluation list of prompts. Empty entries are left out with a warning naming them (`_drop_empty`) unless
    `keep_empty` (the caller drops them with what it pairs them with)."""
    val = rec.get(key)
    if val is None:
        return []
    if isinstance(val, str):
        val = [val]
    if not isinstance(val, list):
        raise EditRecordError(index, key, "expected a list of strings", case_id, source)
    bad = next((i for i, x in enumerate(val) if not isinstance(x, str)), None)
    if bad is not None:
        raise EditRecordError(index, f"{key}[{bad}]", f"expected a string, got {type(val[bad]).__name__}",
                              case_id, source)
    return list(val) if keep_empty else _drop_empty(list(val), key, index, case_id, source)[0]


def _drop_empty(prompts: list[str], key: str, index: int, case_id, source, paired: list | None = None):
    """(prompts, paired) without the empty prompts and their paired entries, with a warning naming them: an empty
    prompt has no tokens to score after (the shared CounterFact sets hold a few empty paraphrases)."""
    empty = [i for i, x in enumerate(prompts) if not x.strip()]
    if empty:
        logger.warning("%s", EditRecordError(index, ", ".join(f"{key}[{i}]" for i in empty),
                                             "empty, left out", case_id, source))
    keep = [i for i, x in enumerate(prompts) if x.strip()]
    return [prompts[i] for i in keep], None if paired is None else [paired[i] for i in keep]


def parse_record(rec: Any, index: int, source: str | None = None) -> EditRequest:
    """Parse one record of any supported format into an `EditRequest` (raises `EditRecordError`)."""
    if not isinstance(rec, dict):
        raise EditRecordError(index, "<record>", f"expected an object, got {type(rec).__name__}", None, source)
    case_id = rec.get("case_id")
    case_id = None if case_id is None else str(case_id)
    if "requested_rewrite" in rec:  # original CounterFact
        rw = rec["requested_rewrite"]
        if not isinstance(rw, dict):
            raise EditRecordError(index, "requested_rewrite", "expected an object", case_id, source)
        subject = _req_str(rw, "subject", index, case_id, source, within="requested_rewrite.")
        template = _req_str(rw, "prompt", index, case_id, source, within="requested_rewrite.")
        if "{}" not in template:
            raise EditRecordError(index, "requested_rewrite.prompt", "no '{}' placeholder for the subject", case_id, source)
        tn, tt = rw.get("target_new"), rw.get("target_true")
        for name, t in (("target_new", tn), ("target_true", tt)):
            if not isinstance(t, dict) or not isinstance(t.get("str"), str):
                raise EditRecordError(index, f"requested_rewrite.{name}.str", "missing or not a string", case_id, source)
        if not tn["str"].strip():
            raise EditRecordError(index, "requested_rewrite.target_new.str", "empty", case_id, source)
        neighbours = _str_list(rec, "neighborhood_prompts", index, case_id, source)
        req = EditRequest(
            # replace, not str.format: a template may hold other braces ("{} is {x}")
            subject=subject, prompt=template.replace("{}", subject, 1), target_new=tn["str"], target_true=tt["str"],
            case_id=case_id,
            rephrase_prompts=_str_list(rec, "paraphrase_prompts", index, case_id, source),
            locality_prompts=neighbours, locality_answers=[tt["str"]] * len(neighbours),
            source=source,
        )
    elif "src" in rec and "alt" in rec:  # MEND zsRE
        subject = _req_str(rec, "subject", index, case_id, source)
        prompt = _req_str(rec, "src", index, case_id, source)
        answers = _str_list(rec, "answers", index, case_id, source)
        loc = rec.get("loc")
        loc_ans = rec.get("loc_ans")
        if loc is not None and not isinstance(loc, str):
            raise EditRecordError(index, "loc", "expected a string", case_id, source)
        if loc_ans is not None and not isinstance(loc_ans, str):
            raise EditRecordError(index, "loc_ans", "expected a string", case_id, source)
        if loc and not loc_ans:
            raise EditRecordError(index, "loc_ans", "missing or empty: 'loc' needs its answer", case_id, source)
        req = EditRequest(
            subject=subject, prompt=prompt, target_new=_req_str(rec, "alt", index, case_id, source),
            target_true=answers[0] if answers else "", case_id=case_id,
            rephrase_prompts=_str_list(rec, "rephrase", index, case_id, source),
            locality_prompts=[loc] if loc else [], locality_answers=[loc_ans] if loc else [],
            source=source,
        )
    else:  # REP / flat format
        subject = _req_str(rec, "subject", index, case_id, source)
        loc_prompts = _str_list(rec, "locality_prompt", index, case_id, source, keep_empty=True)
        loc_gt = rec.get("locality_ground_truth")
        if isinstance(loc_gt, str) or loc_gt is None:
            loc_answers = [loc_gt or ""] * len(loc_prompts)
        elif isinstance(loc_gt, list) and all(isinstance(x, str) for x in loc_gt):
            if len(loc_gt) != len(loc_prompts) and len(loc_gt) != 1:
                raise EditRecordError(index, "locality_ground_truth",
                                      f"{len(loc_gt)} answers for {len(loc_prompts)} locality prompts (give one, or one each)",
                                      case_id, source)
            loc_answers = loc_gt if len(loc_gt) == len(loc_prompts) else loc_gt * len(loc_prompts)
        else:
            raise EditRecordError(index, "locality_ground_truth", "expected a string or list of strings", case_id, source)
        loc_prompts, loc_answers = _drop_empty(loc_prompts, "locality_prompt", index, case_id, source, loc_answers)
        req = EditRequest(
            subject=subject, prompt=_req_str(rec, "prompt", index, case_id, source),
            target_new=_req_str(rec, "target_new", index, case_id, source),
            target_true=_req_str(rec, "target_true", index, case_id, source, allow_empty=True) if "target_true" in rec else "",
            case_id=case_id,
            rephrase_prompts=_str_list(rec, "rephrase_prompt", index, case_id, source),
            locality_prompts=loc_prompts, locality_answers=loc_answers,
            subject_rephrases=_str_list(rec, "subject_rephrase", index, case_id, source),
            source=source,
        )
        if rec.get("rephrase_target") is not None and rec["rephrase_target"] != req.target_new:
            raise EditRecordError(index, "rephrase_target", f"{rec['rephrase_target']!r} differs from target_new "
                                  f"{req.target_new!r}: paraphrases are scored against target_new", case_id, source)
    if req.subject not in req.prompt:
        raise EditRecordError(index, "subject", f"{req.subject!r} not found in prompt {req.prompt!r}", case_id, source)
    req.index = index
    return req


def read_raw_records(path: str | Path) -> list:
    """Read a JSON list (or {"records": [...]}) or a JSONL file as raw Python objects."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path}: is a directory, not a data file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EditRecordError(None, "<file>", f"not UTF-8 text (a binary file?): {exc}", None, str(path)) from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EditRecordError(None, "<file>", f"invalid JSON: {exc}", None, str(path)) from exc
        return data
    if stripped.startswith("{"):  # {"records": [...]}, or a single record; else JSONL (below)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            if "records" not in data:
                return [data]
            if not isinstance(data["records"], list):
                raise EditRecordError(None, "records", "expected a list of records", None, str(path))
            return data["records"]
    records = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EditRecordError(len(records), "<line>", f"line {i + 1}: invalid JSON: {exc}", None, str(path)) from exc
    return records


def load_records(path: str | Path, limit: int | None = None, offset: int = 0) -> list[EditRequest]:
    """Read and validate every record of a data file (auto-detected format).

    Raises `EditRecordError` naming the file, the record and the field of the first bad record.
    """
    raw = read_raw_records(path)
    if not isinstance(raw, list):
        raise EditRecordError(None, "<file>", "expected a JSON list of records or JSONL", None, str(path))
    if not raw:
        raise EditRecordError(None, "<file>", "holds no records", None, str(path))
    raw = raw[offset: None if limit is None else offset + limit]
    return [parse_record(rec, offset + i, str(path)) for i, rec in enumerate(raw)]


def check_batch_conflicts(requests: Iterable[EditRequest]) -> None:
    """Refuse two records with the same subject and prompt but different targets."""
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for i, r in enumerate(requests):
        key = (r.subject, r.prompt)
        if key in seen and seen[key][1] != r.target_new:
            j = seen[key][0]
            raise EditRecordError(
                field="target_new",
                reason=f"conflicts with record {j}: same subject and prompt but target {r.target_new!r} != {seen[key][1]!r}",
                **r.where(i),
            )
        seen.setdefault(key, (r.where(i)["index"], r.target_new))
