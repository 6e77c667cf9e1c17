"""Evaluation metrics of edits, after rome/memit's eval_utils_counterfact and eval_utils_zsre.

All functions take an `Editor` whose model may or may not have a memory attached, so the same
code scores the unedited and the edited model. Targets are continued as " " + target.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import torch

from editing.metrics import greedy_generate, new_beats_true, next_token_logits, target_nll
from editing.prompts import pad_batch, target_token_ids
from editing.records import EditRequest


def _rate(flags: torch.Tensor | list) -> float | None:
    flags = torch.as_tensor(flags, dtype=torch.float32)
    return None if flags.numel() == 0 else float(flags.mean())


def efficacy(ed, reqs: list[EditRequest]) -> float | None:
    """Share of edited prompts where " target_new" beats " target_true" (mean per-token NLL)."""
    return _rate(new_beats_true(ed.model, ed.tok, [r.prompt for r in reqs], [r.target_new for r in reqs],
                                [r.target_true for r in reqs]))


def generalization(ed, reqs: list[EditRequest]) -> float | None:
    """The same comparison on every paraphrase prompt."""
    pairs = [(p, r) for r in reqs for p in r.rephrase_prompts]
    if not pairs:
        return None
    return _rate(new_beats_true(ed.model, ed.tok, [p for p, _ in pairs], [r.target_new for _, r in pairs],
                                [r.target_true for _, r in pairs]))


def neighborhood(ed, reqs: list[EditRequest]) -> float | None:
    """Share of neighbourhood prompts where the true answer still beats " target_new" (specificity)."""
    triples = [(p, a or r.target_true, r.target_new) for r in reqs for p, a in zip(r.locality_prompts, r.locality_answers)]
    if not triples:
        return None
    nll_true = target_nll(ed.model, ed.tok, [t[0] for t in triples], [t[1] for t in triples])
    nll_new = target_nll(ed.model, ed.tok, [t[0] for t in triples], [t[2] for t in triples])
    return _rate(nll_true < nll_new)


def substituted(reqs: list[EditRequest], subjects_of) -> list[tuple[str, EditRequest]]:
    """(prompt with the subject replaced, request) for every substitute subject."""
    return [(r.prompt.replace(r.subject, s, 1), r) for r in reqs for s in subjects_of(r)]


def subject_rephrase(ed, reqs: list[EditRequest]) -> float | None:
    """Success of the new target with the subject replaced by each of its rephrasings (REP)."""
    pairs = substituted(reqs, lambda r: r.subject_rephrases)
    if not pairs:
        return None
    return _rate(new_beats_true(ed.model, ed.tok, [p for p, _ in pairs], [r.target_new for _, r in pairs],
                                [r.target_true for _, r in pairs]))


def shuffle_subject(tok, subject: str, seed: int) -> str:
    """The subject with its tokens in a seeded random order (a different order when possible)."""
    ids = tok(subject, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    order = list(range(len(ids)))
    for _ in range(10):
        rng.shuffle(order)
        if order != sorted(order) or len(ids) < 2:
            break
    return tok.decode([ids[i] for i in order])


def shuffled_subject(ed, reqs: list[EditRequest], seed: int = 0) -> float | None:
    """Success of the new target with the subject's tokens shuffled (REP)."""
    pairs = [(r.prompt.replace(r.subject, shuffle_subject(ed.tok, r.subject, seed + i), 1), r) for i, r in enumerate(reqs)]
    return _rate(new_beats_true(ed.model, ed.tok, [p for p, _ in pairs], [r.target_new for _, r in pairs],
                                [r.target_true for _, r in pairs]))


def long_context(ed, reqs: list[EditRequest], context: str, tokens: int = 512) -> float | None:
    """Success of the new target with about `tokens` tokens of unrelated text prepended (REP)."""
    ids = ed.tok(context)["input_ids"][:tokens]
    prefix = ed.tok.decode(ids).strip() + "\n\n"
    return _rate(new_beats_true(ed.model, ed.tok, [prefix + r.prompt for r in reqs], [r.target_new for r in reqs],
                                [r.target_true for r in reqs]))


@torch.no_grad()
def token_accuracy(ed, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """zsRE top-1 token accuracy with teacher forcing, per prompt. Returns [n] float."""
    device = next(ed.model.parameters()).device
    out = []
    for p, t in zip(prompts, targets):
        p_ids, t_ids = ed.tok(p)["input_ids"], target_token_ids(ed.tok, p, t)
        ids = torch.tensor([p_ids + t_ids], device=device)
        logits = ed.model(input_ids=ids, use_cache=False).logits[0]
        pred = logits[len(p_ids) - 1: len(p_ids) - 1 + len(t_ids)].argmax(-1)
        out.append((pred == torch.tensor(t_ids, device=device)).float().mean())
    return torch.stack(out).cpu() if out else torch.zeros(0)


@torch.no_grad()
def answer_top1(ed, prompts: list[str], answers: list[str]) -> list[torch.Tensor]:
    """Top-1 predicted tokens at each answer position (teacher forced), per prompt."""
    device = next(ed.model.parameters()).device
    out = []
    for p, a in zip(prompts, answers):
        p_ids, a_ids = ed.tok(p)["input_ids"], target_token_ids(ed.tok, p, a)
        logits = ed.model(input_ids=torch.tensor([p_ids + a_ids], device=device), use_cache=False).logits[0]
        out.append(logits[len(p_ids) - 1: len(p_ids) - 1 + len(a_ids)].argmax(-1).cpu())
    return out


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure for one text: mean over n of weight_n * H(n-gram frequencies), in bits."""
    words = text.split()
    vals = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i: i + n]) for i in range(max(len(words) - n + 1, 0)))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        vals.append(w * h)
    return sum(vals) / len(vals)


def fluency(ed, prompts: list[str], max_new_tokens: int = 40) -> float:
    """Mean n-gram entropy of greedy generations."""
    gens = greedy_generate(ed.model, ed.tok, prompts, max_new_tokens)
    return sum(ngram_entropy(p + g) for p, g in zip(prompts, gens)) / max(len(gens), 1)


@torch.no_grad()
def perplexity(ed, text: str, max_tokens: int = 4096, chunk: int = 512) -> float:
    """Perplexity of `text` (first `max_tokens` tokens) in chunks of `chunk` tokens."""
    device = next(ed.model.parameters()).device
    ids = ed.tok(text)["input_ids"][:max_tokens]
    chunks = [ids[i: i + chunk] for i in range(0, len(ids), chunk) if len(ids[i: i + chunk]) > 1]
    nll, count = 0.0, 0
    for i in range(0, len(chunks), 4):
        batch, mask = pad_batch(chunks[i: i + 4], ed.tok.pad_token_id, device)
        logp = torch.log_softmax(ed.model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float(), -1)
        tgt = batch[:, 1:]
        m = mask[:, 1:].bool()
        tok_lp = logp[:, :-1].gather(-1, tgt[..., None]).squeeze(-1)
        nll -= float(tok_lp[m].sum())
        count += int(m.sum())
    return math.exp(nll / max(count, 1))


def withdrawal(ed, reqs: list[EditRequest], edit_ids: list[str], base_logits: torch.Tensor) -> tuple[float, float]:
    """Delete every other edit from the attached memory.

    `base_logits` [n, vocab]: the unedited model's next-token logits on each request's prompt.
    Returns (share of deleted edits whose logits equal the unedited model's exactly,
    share of kept edits still successful). The deleted edits stay deleted.
    """
    mem = ed.memory
    gone, kept = list(range(0, len(reqs), 2)), list(range(1, len(reqs), 2))
    mem.delete([edit_ids[i] for i in gone])
    after = next_token_logits(ed.model, ed.tok, [reqs[i].prompt for i in gone])
    reverted = _rate([torch.equal(after[j], base_logits[i]) for j, i in enumerate(gone)])
    retained = efficacy(ed, [reqs[i] for i in kept]) if kept else None
    return reverted, retained


def run_sequential(ed, reqs: list[EditRequest], batch: int, router: str | None = None, threshold: float | None = None,
                   perplexity_text: str | None = None, long_context_text: str | None = None, fluency_prompts: int = 20,
                   progress=None) -> dict:
    """Sequential editing: apply the edits in batches of `batch` (each computed on the model with
    the earlier edits attached), then evaluate all of them at the end.

    Returns the `kvedit eval` JSON fields (robustness fields only where the data has them).
    """
    import time

    t0 = time.perf_counter()
    ed.detach()
    base_logits = next_token_logits(ed.model, ed.tok, [r.prompt for r in reqs])
    pre_spec = neighborhood(ed, reqs)
    pre_ppl = perplexity(ed, perplexity_text) if perplexity_text else None
    pre_flu = fluency(ed, [r.prompt for r in reqs[:fluency_prompts]])
    mem = ed.attach(router=router, threshold=threshold)
    ids: list[str] = []
    for i in range(0, len(reqs), batch):
        chunk = reqs[i: i + batch]
        edits = ed.compute(chunk)
        mem.add(edits.edit_ids, edits.keys, edits.residuals)
        ids += edits.edit_ids
        if progress:
            progress(len(chunk))
    out = {
        "n_edits": len(reqs), "batch": batch, "router": mem.router.name, "threshold": float(mem.threshold),
        "layer": ed.layer,
        "efficacy": efficacy(ed, reqs), "generalization": generalization(ed, reqs),
        "specificity": neighborhood(ed, reqs), "pre_specificity": pre_spec,
        "fluency": fluency(ed, [r.prompt for r in reqs[:fluency_prompts]]), "pre_fluency": pre_flu,
    }
    if pre_ppl is not None:
        out["perplexity_delta"] = perplexity(ed, perplexity_text) / pre_ppl - 1
    if any(r.subject_rephrases for r in reqs):
        out["subject_rephrase"] = subject_rephrase(ed, reqs)
    out["shuffled_subject"] = shuffled_subject(ed, reqs)
    if long_context_text:
        out["long_context"] = long_context(ed, reqs, long_context_text)
    if any(r.locality_prompts for r in reqs):
        ed.memory.enabled.fill_(False)
        locs = [(p, a) for r in reqs for p, a in zip(r.locality_prompts, r.locality_answers) if a]
        base_top1 = answer_top1(ed, [p for p, _ in locs], [a for _, a in locs])
        ed.memory.enabled.fill_(True)
        after = answer_top1(ed, [p for p, _ in locs], [a for _, a in locs])
        same = torch.cat([(x == y).float() for x, y in zip(base_top1, after)]) if locs else torch.zeros(0)
        out["locality"] = _rate(same)
    out["withdrawal_reverted"], out["withdrawal_retained"] = withdrawal(ed, reqs, ids, base_logits)
    ed.detach()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
