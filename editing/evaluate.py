"""Evaluation metrics of edits, after rome/memit's eval_utils_counterfact and eval_utils_zsre.

All functions take an `Editor` whose model may or may not have a memory attached, so the same
code scores the unedited and the edited model. Targets are continued as " " + target. A
baseline (`editing.baselines`) can stand in for the Editor: it has the same `model` and `tok`,
and its `in_context(prompts)` gives the prompts the model really sees (retrieval for `scr`).
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from collections import Counter

import torch

from editing.baselines import BASELINES, EditMethod, make_baseline
from editing.metrics import greedy_generate, new_beats_true, next_token_logits, target_nll
from editing.prompts import pad_batch, target_token_ids
from editing.records import EditRecordError, EditRequest
from editing.routers import ROUTERS


TRAIN_REPHRASES = 5  # subject rephrasings per edit that REP trains on (in domain); the rest are held out


def known_methods() -> list[str]:
    """Every name `run_sequential` accepts: the memory's routers, then the baselines."""
    return sorted(ROUTERS) + sorted(BASELINES)


def _in_context(ed, prompts: list[str]) -> list[str]:
    """The prompts as the model sees them (unchanged unless `ed` is a prompt-side baseline)."""
    rewrite = getattr(ed, "in_context", None)
    return rewrite(prompts) if rewrite else list(prompts)


def _beats(ed, prompts: list[str], targets_new: list[str], targets_true: list[str]) -> torch.Tensor:
    return new_beats_true(ed.model, ed.tok, _in_context(ed, prompts), targets_new, targets_true)


def _rate(flags: torch.Tensor | list) -> float | None:
    flags = torch.as_tensor(flags, dtype=torch.float32)
    return None if flags.numel() == 0 else float(flags.mean())


def _rate_per_edit(flags: torch.Tensor | list, owners: list) -> float | None:
    """The mean over edits of each edit's mean flag (`owners[i]` identifies the edit `flags[i]` belongs to).

    rome/memit's `summarize.py` averages paraphrase, neighbourhood and zsRE token scores per case
    first, so an edit with 30 paraphrases weighs as much as one with 2.
    """
    flags = torch.as_tensor(flags, dtype=torch.float32).reshape(-1)
    if flags.numel() == 0:
        return None
    groups: dict = {}
    for f, o in zip(flags.tolist(), owners):
        groups.setdefault(o, []).append(f)
    return sum(sum(v) / len(v) for v in groups.values()) / len(groups)


# How success on a prompt is scored (rome/memit): CounterFact compares the mean per-token NLL of
# " target_new" and " target_true" (`eval_utils_counterfact`); zsRE takes the top-1 token accuracy of
# " target_new" under teacher forcing, averaged per prompt (`eval_utils_zsre`).
NLL, TOKEN_ACCURACY = "nll", "token_accuracy"
SUCCESS_METRICS = (NLL, TOKEN_ACCURACY)


def success_metric(data: str | None, metric: str = "auto") -> str:
    """The success metric for a data file: `metric`, or with "auto" token accuracy for zsRE files
    (the name contains "zsre", as the shared `zsre_test.json`) and the NLL comparison otherwise."""
    if metric == "auto":
        return TOKEN_ACCURACY if data and "zsre" in Path(data).name.lower() else NLL
    if metric not in SUCCESS_METRICS:
        raise ValueError(f"unknown success metric {metric!r}; choose auto, {', '.join(SUCCESS_METRICS)}")
    return metric


def _success(ed, prompts: list[str], reqs: list[EditRequest], metric: str = NLL) -> float | None:
    """Success of " target_new" after each prompt (`reqs[i]` owns `prompts[i]`), by `metric`: the mean
    over requests of each request's mean over its prompts (`_rate_per_edit`)."""
    if not prompts:
        return None
    if metric == TOKEN_ACCURACY:
        flags = token_accuracy(ed, prompts, [r.target_new for r in reqs])
    else:
        flags = _beats(ed, prompts, [r.target_new for r in reqs], [r.target_true for r in reqs])
    return _rate_per_edit(flags, [id(r) for r in reqs])


def efficacy(ed, reqs: list[EditRequest], metric: str = NLL) -> float | None:
    """Success on the edited prompts: the share where " target_new" beats " target_true" (mean
    per-token NLL), or with `metric=TOKEN_ACCURACY` the mean top-1 token accuracy of " target_new"."""
    return _success(ed, [r.prompt for r in reqs], reqs, metric)


def generalization(ed, reqs: list[EditRequest], metric: str = NLL) -> float | None:
    """The same on every paraphrase prompt."""
    pairs = [(p, r) for r in reqs for p in r.rephrase_prompts]
    return _success(ed, [p for p, _ in pairs], [r for _, r in pairs], metric)


def neighborhood(ed, reqs: list[EditRequest]) -> float | None:
    """Share of neighbourhood prompts where the true answer still beats " target_new" (specificity),
    averaged per edit (`_rate_per_edit`)."""
    quads = [(p, a or r.target_true, r.target_new, i) for i, r in enumerate(reqs)
             for p, a in zip(r.locality_prompts, r.locality_answers)]
    if not quads:
        return None
    prompts = _in_context(ed, [t[0] for t in quads])
    nll_true = target_nll(ed.model, ed.tok, prompts, [t[1] for t in quads])
    nll_new = target_nll(ed.model, ed.tok, prompts, [t[2] for t in quads])
    return _rate_per_edit(nll_true < nll_new, [t[3] for t in quads])


@torch.no_grad()
def miss_reasons(m: "MemoryMethod", reqs: list[EditRequest], edit_ids: list[str], paraphrases: bool = False) -> dict:
    """Why a memory's failed prompts fail, read at the subject's last token (no context prefix).

    The prompts are each request's own prompt, or with `paraphrases` each paraphrase containing
    the subject verbatim. Every failed prompt (" target_new" does not beat " target_true") is
    one of: `gate_off` (its best score does not pass the threshold: the key is too far from every
    row), `misrouted` (another edit's row wins and fires), `own_row` (its own row fires, yet the
    residual does not carry the new target in this context). Returns the counts and `checked`.
    """
    from editing.calibrate import prompt_keys, route_scores

    facts = [(e, r, p) for e, r in zip(edit_ids, reqs)
             for p in ([q for q in r.rephrase_prompts if r.subject in q] if paraphrases else [r.prompt])]
    out = {"checked": len(facts), "gate_off": 0, "misrouted": 0, "own_row": 0}
    if not facts:
        return out
    ok = _beats(m, [p for _, _, p in facts], [r.target_new for _, r, _ in facts], [r.target_true for _, r, _ in facts])
    failed = [(e, r.subject, p) for (e, r, p), good in zip(facts, ok.tolist()) if not good]
    if not failed:
        return out
    keys, owners, _ = prompt_keys(m.ed, failed)
    best, score = route_scores(m.mem, keys)
    own = torch.tensor([m.mem.slots.get(e, -1) for e in owners])
    on = score > float(m.mem.threshold)
    out["gate_off"] = int((~on).sum())
    out["misrouted"] = int((on & (best != own)).sum())
    out["own_row"] = int((on & (best == own)).sum())
    return out


def substituted(reqs: list[EditRequest], subjects_of) -> list[tuple[str, EditRequest]]:
    """(prompt with the subject replaced, request) for every substitute subject."""
    return [(r.prompt.replace(r.subject, s, 1), r) for r in reqs for s in subjects_of(r)]


def subject_rephrase(ed, reqs: list[EditRequest], which: slice = slice(None), metric: str = NLL) -> float | None:
    """Success of the new target with the subject replaced by each of its rephrasings (REP);
    `which` selects rephrasings by position (e.g. the ones a REP adapter was trained on)."""
    pairs = substituted(reqs, lambda r: r.subject_rephrases[which])
    return _success(ed, [p for p, _ in pairs], [r for _, r in pairs], metric)


def shuffle_subject(tok, subject: str, seed: int, leading_space: bool = False) -> str:
    """The subject with its tokens in a seeded random order (a different order when possible).

    `leading_space`: tokenize " subject", as the subject is tokenized inside a prompt where a word
    precedes it. The decoded pieces are rejoined with single spaces, without a leading one.
    """
    ids = tok((" " if leading_space else "") + subject, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    order = list(range(len(ids)))
    for _ in range(10):
        rng.shuffle(order)
        if order != sorted(order) or len(ids) < 2:
            break
    return " ".join(tok.decode([ids[i] for i in order]).split())


def shuffled_prompt(tok, r: EditRequest, seed: int) -> str:
    """`r.prompt` with its subject's tokens shuffled (`shuffle_subject`, tokenized as in the prompt)."""
    at = r.prompt.find(r.subject)
    lead = at > 0 and r.prompt[at - 1] == " "
    return r.prompt.replace(r.subject, shuffle_subject(tok, r.subject, seed, lead), 1)


def shuffled_subject(ed, reqs: list[EditRequest], seed: int = 0, metric: str = NLL) -> float | None:
    """Success of the new target with the subject's tokens shuffled (REP), by `metric`."""
    return _success(ed, [shuffled_prompt(ed.tok, r, seed + i) for i, r in enumerate(reqs)], reqs, metric)


def long_context(ed, reqs: list[EditRequest], context: str, tokens: int = 512, metric: str = NLL) -> float | None:
    """Success of the new target with about `tokens` tokens of unrelated text prepended (REP), by `metric`."""
    ids = ed.tok(context, add_special_tokens=False)["input_ids"][:tokens]
    prefix = ed.tok.decode(ids, skip_special_tokens=True).strip() + "\n\n"
    return _success(ed, [prefix + r.prompt for r in reqs], reqs, metric)


def token_accuracy(ed, prompts: list[str], targets: list[str]) -> torch.Tensor:
    """zsRE top-1 token accuracy with teacher forcing: per prompt, the share of the target's tokens
    that are the top-1 prediction after the prompt and the target's earlier tokens. Returns [n] float."""
    preds = answer_top1(ed, prompts, targets)
    acc = [(p == torch.tensor(target_token_ids(ed.tok, c, t))).float().mean()
           for p, c, t in zip(preds, _in_context(ed, prompts), targets)]
    return torch.stack(acc) if acc else torch.zeros(0)


@torch.no_grad()
def answer_top1(ed, prompts: list[str], answers: list[str]) -> list[torch.Tensor]:
    """Top-1 predicted tokens at each answer position (teacher forced): per prompt a [len(answer tokens)]
    long tensor on CPU."""
    device = next(ed.model.parameters()).device
    out = []
    for p, a in zip(_in_context(ed, prompts), answers):
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
    gens = greedy_generate(ed.model, ed.tok, _in_context(ed, prompts), max_new_tokens)
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


def withdrawn_prompts(reqs: list[EditRequest]) -> list[str]:
    """The prompts of the edits `withdrawal` deletes (every other one, from the first)."""
    return [r.prompt for r in reqs[0::2]]


def withdrawal(ed, reqs: list[EditRequest], edit_ids: list[str], base_logits: torch.Tensor, metric: str = NLL) -> dict:
    """Delete every other edit (from the attached memory, or through `ed.delete` where `ed` has one).

    `base_logits` [ceil(n/2), vocab]: the unedited model's next-token logits on the prompts of the
    edits to delete, `withdrawn_prompts(reqs)`, computed as that one batch: CPU kernels are not
    batch-invariant (a different batch shape moves logits by ~1e-5), so "exactly" needs the same batch.
    Returns
    - `withdrawal_reverted`: share of deleted edits whose logits equal the unedited model's exactly;
    - `withdrawal_retained`: success of the kept edits (`efficacy` by `metric`);
    - `withdrawal_shared_subject`: share of deleted edits whose subject a kept edit also has (zsRE
      repeats subjects with other questions): the kept edit's row is the same subject's key, so it
      rightly still fires on the deleted edit's prompt;
    - `withdrawal_reverted_unshared`: `withdrawal_reverted` over the other deleted edits;
    - `withdrawal_reverted_top1`: share of deleted edits whose predicted next token (the argmax)
      is the unedited model's: a kept row that still gates on a deleted edit's prompt moves its
      logits, and this says how often it also moves the answer.
    The deleted edits stay deleted.
    """
    delete = getattr(ed, "delete", None) or ed.memory.delete
    gone, kept = list(range(0, len(reqs), 2)), list(range(1, len(reqs), 2))
    delete([edit_ids[i] for i in gone])
    after = next_token_logits(ed.model, ed.tok, _in_context(ed, [reqs[i].prompt for i in gone]))
    same = [torch.equal(after[j], base_logits[j]) for j in range(len(gone))]
    same_top1 = (after.argmax(-1) == base_logits.to(after.device).argmax(-1)).tolist()
    kept_subjects = {reqs[i].subject for i in kept}
    shared = [reqs[i].subject in kept_subjects for i in gone]
    return {
        "withdrawal_reverted": _rate(same),
        "withdrawal_retained": efficacy(ed, [reqs[i] for i in kept], metric) if kept else None,
        "withdrawal_shared_subject": _rate(shared),
        "withdrawal_reverted_unshared": _rate([x for x, s in zip(same, shared) if not s]),
        "withdrawal_reverted_top1": _rate(same_top1),
    }


class MemoryMethod(EditMethod):
    """The external memory as an editing method, with the interface of `editing.baselines.Baseline`."""

    can_delete = True

    def __init__(self, ed, router: str | None = None, threshold: float | None = None, edit_cache: dict | None = None,
                 calibration=None):
        super().__init__(ed)
        if calibration is not None and threshold is not None:
            raise ValueError(f"a calibrated gate chooses its own threshold (got threshold={threshold})")
        self.router, self.threshold = router, threshold
        # A `CalibrationConfig`: after every batch the threshold is re-chosen (`editing.calibrate`) on
        # the edit prompts of every row so far, as a calibrated memory does at every commit. Deleting
        # rows keeps the threshold, as a delete commit does.
        self.calibration = calibration
        self.last_calibration = None
        self.mem = None
        # An edit batch depends only on the Editor, the batch and the model it is computed on. The
        # memory's model is fixed by its router, threshold and the batches already added, so a batch
        # is cached under those: campaign cells that share a prefix of the same edit sequence (T = 100
        # and T = 400, or cosine and cosine+rep, whose adapter is trained after the edits) compute it
        # once. An empty memory is bit-identical to the unedited model, so first batches are shared
        # across routers and thresholds too.
        self.edit_cache = edit_cache
        self._done: tuple = ()  # the batches added so far, as cache keys
        self.history: list[tuple[list[EditRequest], torch.Tensor]] = []  # (requests, keys [n, d_key]) per edit()

    def __enter__(self) -> "MemoryMethod":
        self.mem = self.ed.attach(router=self.router, threshold=self.threshold)
        self.history = []
        self._done = ()
        self._ids: list[str] = []
        self.last_calibration = None
        return self

    def __exit__(self, *exc) -> None:
        self.ed.detach()

    def edit(self, reqs: list[EditRequest]) -> list[str]:
        batch = tuple((r.prompt, r.subject, r.target_new, r.target_true) for r in reqs)
        key = self._cache_key(batch)
        edits = self.edit_cache.get(key) if key is not None else None
        if edits is None:
            edits = self.ed.compute(reqs)
            if key is not None:
                self.edit_cache[key] = edits
        self.mem.add(edits.edit_ids, edits.keys, edits.residuals)
        self.history.append((reqs, edits.keys))
        self._done += (batch,)
        self._ids += list(edits.edit_ids)
        if self.calibration is not None:
            self.recalibrate()
        return edits.edit_ids

    def recalibrate(self) -> None:
        """Re-choose the gate threshold for the rows so far (positives: each edit's own prompt)."""
        from editing.calibrate import calibrate

        reqs = [r for chunk, _ in self.history for r in chunk]
        facts = [(eid, r.subject, r.prompt) for eid, r in zip(self._ids, reqs)]
        cal = calibrate(self.ed, self.mem, facts, self.calibration)
        if cal is not None:
            self.mem.threshold.fill_(cal.threshold)
            self.last_calibration = cal

    def _cache_key(self, batch: tuple) -> tuple | None:
        """The edit cache's key for `batch` on the memory as it is now; None when not caching."""
        if self.edit_cache is None or self.mem.n_facts != sum(len(b) for b in self._done):
            return None  # no cache, or rows this method did not add (never expected): compute
        r = self.mem
        model = None if not self._done else (tuple(sorted(r.router.config().items())), float(r.threshold),
                                             r.query_adapter is not None)
        return ("edits", id(self.ed), self.ed.layer, self.ed.config.batch_size, model, self._done, batch)

    def fit_robust_keys(self, negative_text: str, train_rephrases: int = TRAIN_REPHRASES, hp=None, seed: int = 0) -> dict:
        """Train a REP adapter (`editing.rep`) on every edit made so far and install it on the memory.

        The first `train_rephrases` subject rephrasings of each edit are seen in training, the rest
        stay out of domain. Returns what was trained, for the run's JSON.
        """
        import time

        from editing.rep import RobustKeyHparams, fit_robust_keys

        hp = hp or RobustKeyHparams()
        t0 = time.perf_counter()
        reqs = [r for chunk, _ in self.history for r in chunk]
        keys = torch.cat([k for _, k in self.history])
        adapter = fit_robust_keys(self.ed, self.mem, reqs, keys, negative_text,
                                  rephrases=slice(0, train_rephrases), hp=hp, seed=seed)
        self.mem.query_adapter = adapter.to(self.mem.rows.device)  # trained on the CPU; served where the rows are
        return {"rank": adapter.rank, "steps": hp.steps, "train_rephrases": train_rephrases,
                "seconds": round(time.perf_counter() - t0, 2)}

    def delete(self, edit_ids: list[str]) -> int:
        return self.mem.delete(edit_ids)

    @contextlib.contextmanager
    def disabled(self):
        self.mem.enabled.fill_(False)
        try:
            yield
        finally:
            self.mem.enabled.fill_(True)

    def describe(self) -> dict:
        out = {"router": self.mem.router.name, "threshold": float(self.mem.threshold), "layer": self.ed.layer}
        if self.calibration is not None:
            out["calibration"] = self.last_calibration.to_dict() if self.last_calibration else None
        return out

    def false_gate_rate(self) -> float:
        """The memory's share of held-out WikiText tokens gated on (`editing.calibrate`)."""
        from editing.calibrate import held_out_false_gate_rate

        return held_out_false_gate_rate(self.ed, self.mem)


def open_method(ed, name: str | None = None, threshold: float | None = None, settings: dict | None = None,
                edit_cache: dict | None = None, calibration=None):
    """A router name (or None: the Editor's router) gives the memory; a baseline name gives the baseline.

    `threshold` is the gate threshold of a router, or scr's `min_similarity`; the in-place
    editors have none and refuse one. `settings` override a baseline's settings.
    `edit_cache`, `calibration` (a `CalibrationConfig`): see `MemoryMethod` (memory methods only).
    """
    if name is None or name in ROUTERS:
        if settings:
            raise ValueError(f"settings {sorted(settings)} apply to baselines, not to the router {name!r}")
        return MemoryMethod(ed, name, threshold, edit_cache, calibration)
    if calibration is not None:
        raise ValueError(f"calibrated gates belong to the memory's routers; method {name!r} has none")
    if name not in BASELINES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(known_methods()))}")
    settings = dict(settings or {})
    if name == "scr":
        settings.setdefault("min_similarity", threshold)
    elif threshold is not None:
        raise ValueError(f"method {name!r} edits weights and has no threshold (got threshold={threshold})")
    return make_baseline(name, ed, **settings)


def _describe_baseline(method) -> dict:
    d = method.describe()
    layers = d["layers"]
    thr = d["settings"].get("min_similarity")
    extra = {k: v for k, v in d.items() if k not in ("method", "layers", "settings", "active")}
    return {"router": d["method"], "threshold": thr, "layer": layers[-1] if layers else None, "layers": layers,
            "settings": d["settings"], **extra}


def run_sequential(ed, reqs: list[EditRequest], batch: int, router: str | None = None, threshold: float | None = None,
                   perplexity_text: str | None = None, long_context_text: str | None = None, fluency_prompts: int = 20,
                   progress=None, settings: dict | None = None, edit_cache: dict | None = None,
                   robust_keys: bool = False, robust_keys_text: str | None = None, calibration=None,
                   metric: str = NLL) -> dict:
    """Sequential editing: apply the edits in batches of `batch` (each computed on the model with
    the earlier edits applied), then evaluate all of them at the end.

    `router` names the method (`known_methods()`): a router of the memory, or a baseline
    (`editing.baselines`; then `threshold` and `settings` are as in `open_method`). Every metric is computed the
    same way on the edited model; the in-place editors edit a copy of the weights, swapped out
    again on return, so the Editor's model is bit-identical afterwards.
    Withdrawal: the memory and `scr` delete single edits exactly; the in-place editors report
    None (subtracting an update is not exact in floating point, and later updates depend on it).
    Perplexity drift is measured for every method (a real change only for in-place editors).

    `edit_cache`: a dict shared by runs on the same Editor; the unedited model's measurements and the
    first-batch edits of a memory method (see `MemoryMethod`) are reused from it.
    `robust_keys`: after the edits, train a REP adapter on them (`MemoryMethod.fit_robust_keys`;
    memory methods only) on negatives from `robust_keys_text` (default: the first, statistics
    half of WikiText), and report `subject_rephrase_in_domain` / `_out_of_domain` (rephrasings
    seen / not seen in training) beside `subject_rephrase`.
    `calibration`: a `CalibrationConfig` (memory methods only): the gate threshold is re-chosen after
    every batch (`MemoryMethod`); the output adds the last `calibration`.
    `metric`: how efficacy, generalization, subject rephrase and withdrawal retention score a prompt
    (`NLL` for CounterFact, `TOKEN_ACCURACY` for zsRE: `success_metric`); reported as `metric`.
    Memory methods also report `false_gate_rate`: the share of held-out WikiText tokens the final
    memory gates on (`editing.calibrate.held_out_false_gate_rate`), and `misses`: why the failed
    edit prompts and paraphrases fail (`miss_reasons`).
    Returns the `kvedit eval` JSON fields (robustness fields only where the data has them).
    """
    import time

    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):  # every record before any edit: a bad one late in the file wastes no work
        ed.validate(reqs[i: i + batch])
    if metric == NLL:  # CounterFact-style success compares the new target with the true one
        for i, r in enumerate(reqs):
            if not r.target_true.strip():
                raise EditRecordError(**r.where(i), field="target_true",
                                      reason="empty: NLL scoring compares target_new with target_true "
                                             "(score zsRE-style data with token accuracy)")
    method = open_method(ed, router, threshold, settings, edit_cache, calibration)
    if robust_keys and not isinstance(method, MemoryMethod):
        raise ValueError(f"robust keys adapt the memory's routing; method {router!r} has no memory")
    ed.detach()
    # every field of every request: the neighbourhood prompts and targets decide pre_specificity
    before_key = ("unedited", id(ed), ed.layer, tuple(map(repr, reqs)), perplexity_text, fluency_prompts)
    before = edit_cache.get(before_key) if edit_cache is not None else None
    if before is None:  # the unedited model's side, shared by every run on the same Editor and requests
        before = (next_token_logits(ed.model, ed.tok, withdrawn_prompts(reqs)), neighborhood(ed, reqs),
                  perplexity(ed, perplexity_text) if perplexity_text else None,
                  fluency(ed, [r.prompt for r in reqs[:fluency_prompts]]))
        if edit_cache is not None:
            edit_cache[before_key] = before
    base_logits, pre_spec, pre_ppl, pre_flu = before
    with method:
        ids: list[str] = []
        for i in range(0, len(reqs), batch):
            chunk = reqs[i: i + batch]
            ids += method.edit(chunk)
            if progress:
                progress(len(chunk))
        m = method  # metrics read the model through the method (scr rewrites the prompts)
        trained = None
        if robust_keys:
            if robust_keys_text is None:
                from editing.stats import corpus_half, default_corpus_path

                robust_keys_text = corpus_half(default_corpus_path().read_text(), "first")
            trained = m.fit_robust_keys(robust_keys_text)
        out = {
            "n_edits": len(reqs), "batch": batch, "metric": metric,
            **(m.describe() if isinstance(m, MemoryMethod) else _describe_baseline(m)),
            **({"robust_keys": trained} if trained else {}),
            "efficacy": efficacy(m, reqs, metric), "generalization": generalization(m, reqs, metric),
            "specificity": neighborhood(m, reqs), "pre_specificity": pre_spec,
            "fluency": fluency(m, [r.prompt for r in reqs[:fluency_prompts]]), "pre_fluency": pre_flu,
        }
        if isinstance(m, MemoryMethod):
            out["false_gate_rate"] = m.false_gate_rate()
            out["misses"] = {"efficacy": miss_reasons(m, reqs, ids), "generalization": miss_reasons(m, reqs, ids, True)}
        if pre_ppl is not None:
            out["perplexity_delta"] = perplexity(m, perplexity_text) / pre_ppl - 1
        if any(r.subject_rephrases for r in reqs):
            out["subject_rephrase"] = subject_rephrase(m, reqs, metric=metric)
            if trained:
                k = trained["train_rephrases"]
                out["subject_rephrase_in_domain"] = subject_rephrase(m, reqs, slice(0, k), metric)
                out["subject_rephrase_out_of_domain"] = subject_rephrase(m, reqs, slice(k, None), metric)
        out["shuffled_subject"] = shuffled_subject(m, reqs, metric=metric)
        if long_context_text:
            out["long_context"] = long_context(m, reqs, long_context_text, metric=metric)
        if any(r.locality_prompts for r in reqs):
            locs = [(p, a, i) for i, r in enumerate(reqs) for p, a in zip(r.locality_prompts, r.locality_answers) if a]
            with m.disabled():
                base_top1 = answer_top1(m, [p for p, _, _ in locs], [a for _, a, _ in locs])
            after = answer_top1(m, [p for p, _, _ in locs], [a for _, a, _ in locs])
            same = [(x == y).float() for x, y in zip(base_top1, after)]
            owners = [i for (_, _, i), s in zip(locs, same) for _ in range(s.numel())]
            out["locality"] = _rate_per_edit(torch.cat(same) if same else torch.zeros(0), owners)
        if m.can_delete:
            out.update(withdrawal(m, reqs, ids, base_logits, metric))
        else:
            out["withdrawal_reverted"] = out["withdrawal_retained"] = None
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out
