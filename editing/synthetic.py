"""Synthetic facts for the scale protocol: invented subjects in real CounterFact relations.

A relation is one CounterFact prompt template ("The mother tongue of {} is"); its targets are
every `target_new` and `target_true` the shared data gives for that template. A synthetic fact
puts a seeded, pronounceable invented name ("Dovira Kestamel") into a template and asks for one
of that relation's real targets, so the model has no prior knowledge of the subject and the
answer is always a plausible word.

`scale_memory` builds a memory of N such facts from their keys (what routing depends on), with
real residuals only for a small sample: optimising 100K values is far too slow on a CPU.
`measure_scale` then reports routing capacity (the share of facts whose own prompt routes to
their own row and passes the gate) and the false-gate rate on held-out WikiText tokens.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from editing.keys import compute_keys, token_keys
from editing.prompts import pad_batch
from editing.records import EditRecordError, EditRequest, load_records
from editing.stats import corpus_chunks, corpus_half, default_corpus_path
from editing.table import make_edit_id

COUNTERFACT_FILES = ("counterfact_valid.json", "counterfact_test.json")

# Syllables of an invented name: onset + vowel (+ optional coda). Plain Latin letters, so every
# tokenizer splits the name into a few ordinary pieces.
ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "z")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "", "l", "n", "r", "s", "m", "k")


@dataclass(frozen=True)
class Relation:
    """A real prompt template with "{}" for the subject, and the real targets seen with it."""

    template: str
    targets: tuple[str, ...]


def relations_from_records(records: list[EditRequest]) -> list[Relation]:
    """Group records by their prompt template (the prompt with the subject replaced by "{}").

    Keeps templates with at least two distinct targets (a fact needs a new and a true one),
    in order of first appearance.
    """
    targets: dict[str, list[str]] = {}
    for r in records:
        if r.prompt.count(r.subject) != 1 or "{" in r.prompt or "}" in r.prompt:
            continue
        seen = targets.setdefault(r.prompt.replace(r.subject, "{}", 1), [])
        for t in (r.target_new, r.target_true):
            if t and t not in seen:
                seen.append(t)
    return [Relation(t, tuple(v)) for t, v in targets.items() if len(v) >= 2]


def load_relations(paths: list[str | Path] | None = None) -> list[Relation]:
    """Relations of the shared CounterFact files (or of `paths`)."""
    from editing.data import data_file

    records: list[EditRequest] = []
    for p in paths or [data_file(f) for f in COUNTERFACT_FILES]:
        records += load_records(p)
    rels = relations_from_records(records)
    if not rels:
        raise EditRecordError(None, "prompt", "no relation template with two or more targets", source=str(paths))
    return rels


def invent_name(rng: random.Random) -> str:
    """A pronounceable two-word name of 2-3 syllables per word, e.g. "Dovira Kestamel"."""
    def word() -> str:
        n = rng.choice((2, 2, 3))
        syl = [rng.choice(ONSETS) + rng.choice(VOWELS) + (rng.choice(CODAS) if i == n - 1 else "") for i in range(n)]
        return "".join(syl).capitalize()

    return f"{word()} {word()}"


def synthetic_requests(n: int, seed: int = 0, relations: list[Relation] | None = None) -> list[EditRequest]:
    """`n` facts with unique invented subjects, deterministic under `seed`.

    Each fact takes a random relation; `target_new` and `target_true` are two different real
    targets of that relation. `case_id` is "synth-<seed>-<i>".
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rels = relations if relations is not None else load_relations()
    rng = random.Random(seed)
    used: set[str] = set()
    out = []
    for i in range(n):
        name = invent_name(rng)
        while name in used:
            name = invent_name(rng)
        used.add(name)
        rel = rng.choice(rels)
        new, true = rng.sample(rel.targets, 2)
        out.append(EditRequest(subject=name, prompt=rel.template.format(name), target_new=new, target_true=true,
                               case_id=f"synth-{seed}-{i}", source="synthetic"))
    return out


def write_jsonl(requests: list[EditRequest], path: str | Path) -> Path:
    """Write requests as JSONL records of the shared REP format (readable by `load_records`); atomic."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; give a file name for the facts")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as fh:
            for r in requests:
                fh.write(json.dumps({"case_id": r.case_id, "subject": r.subject, "prompt": r.prompt,
                                     "target_new": r.target_new, "target_true": r.target_true}) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------- scale


@dataclass
class ScaleMemory:
    """A routed memory of N synthetic facts; real residuals only for the first `n_sample`."""

    memory: object  # RoutedFFN (not attached)
    requests: list[EditRequest]
    edit_ids: list[str]
    n_sample: int
    seconds: float


def scale_memory(ed, requests: list[EditRequest], router: str | None = None, threshold: float | None = None,
                 value_sample: int = 32, key_batch: int = 256, progress=None) -> ScaleMemory:
    """Build (but do not attach) a memory holding every request.

    The first `value_sample` facts are computed in full (`Editor.compute`: keys and optimised
    residuals); the rest get their real context-averaged keys [d_key] and zero residuals
    [d_model], which is all routing needs. `progress(n)` is called as keys are computed.
    """
    t0 = time.perf_counter()
    ed.validate(requests)  # a bad request means nothing is computed
    ed.detach()
    mem = ed.new_memory(router=router, threshold=threshold)
    spec = ed.spec
    ids = [make_edit_id(spec.model_fingerprint, spec.layer, r.subject, r.prompt, r.target_new) for r in requests]
    k = min(value_sample, len(requests))
    if k:
        edits = ed.compute(requests[:k], edit_ids=ids[:k])
        mem.add(ids[:k], edits.keys, edits.residuals)
        if progress:
            progress(k)
    for i in range(k, len(requests), key_batch):
        chunk = requests[i: i + key_batch]
        keys = ed.keys(chunk).cpu()  # [b, d_key]
        mem.add(ids[i: i + len(chunk)], keys, torch.zeros(len(chunk), ed.adapter.d_model))
        if progress:
            progress(len(chunk))
    mem.fit_basis()  # the serving prefilter, used from `prefilter_min_rows` rows on
    return ScaleMemory(mem, requests, ids, k, time.perf_counter() - t0)


def _route_chunks(mem, keys: torch.Tensor, chunk: int = 256):
    """`mem.route` over [n, d_key] keys in chunks (bounds the [chunk, capacity] score matrix)."""
    best, weight = [], []
    for i in range(0, keys.shape[0], chunk):
        b, _score, w = mem.route(keys[i: i + chunk].to(mem.rows.device))
        best.append(b.cpu())
        weight.append(w.cpu())
    if not best:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(best), torch.cat(weight)


@torch.no_grad()
def wikitext_keys(ed, tokens: int = 20_000, chunk_tokens: int = 256, batch_size: int = 8) -> torch.Tensor:
    """FFN keys of the edit layer on the first `tokens` tokens of WikiText's held-out (second) half.

    Returns [tokens, d_key] float32 on CPU.
    """
    text = corpus_half(default_corpus_path().read_text(), "second")
    chunks = corpus_chunks(ed.tok, text, chunk_tokens=chunk_tokens, max_tokens=tokens)
    device = next(ed.model.parameters()).device
    out = []
    for i in range(0, len(chunks), batch_size):
        ids, mask = pad_batch(chunks[i: i + batch_size], ed.tok.pad_token_id, device)
        k = token_keys(ed.model, ed.adapter, ed.layer, ids, mask)  # [b, T, d_key]
        out.append(k[mask.bool()].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, ed.adapter.d_key)


def measure_scale(ed, sm: ScaleMemory, wikitext_tokens: int = 20_000) -> dict:
    """Routing capacity and false gates of a synthetic memory (`scale_memory`), plus the sample's efficacy.

    - `routing_capacity`: share of facts whose bare prompt's key (subject's last token, no
      context prefix) picks the fact's own row and passes the gate;
    - `routing_top1`: share picking their own row, gate or not;
    - `false_gate_rate`: share of held-out WikiText tokens on which the gate fires;
    - `sample_efficacy`: efficacy of the facts with real residuals, with all N rows attached.
    """
    mem = sm.memory
    own = torch.tensor([mem.slots[e] for e in sm.edit_ids], dtype=torch.long)
    queries = torch.cat([compute_keys(ed.model, ed.tok, ed.adapter, ed.layer, sm.requests[i: i + 256], ["{}"]).cpu()
                         for i in range(0, len(sm.requests), 256)]) if sm.requests else torch.zeros(0, mem.d_key)
    best, weight = _route_chunks(mem, queries)
    hit = best == own
    wk = wikitext_keys(ed, wikitext_tokens)
    _, w_wiki = _route_chunks(mem, wk)
    out = {
        "n_facts": mem.n_facts, "n_value_sample": sm.n_sample, "router": mem.router.name,
        "threshold": float(mem.threshold), "layer": ed.layer,
        "routing_capacity": float((hit & (weight > 0)).float().mean()) if len(hit) else None,
        "routing_top1": float(hit.float().mean()) if len(hit) else None,
        "false_gate_rate": float((w_wiki > 0).float().mean()) if len(w_wiki) else None,
        "wikitext_tokens": int(wk.shape[0]),
    }
    if sm.n_sample:
        ed.attach(memory=mem)
        try:
            flags = ed.efficacy(sm.requests[: sm.n_sample])
        finally:
            ed.detach()
        out["sample_efficacy"] = sum(flags) / len(flags)
    return out
