"""Calibrated gates: choose a memory's gate threshold from score distributions (DEPTRAI appendix G.3).

Every query below is an FFN key at the edit layer, scored by `RoutedFFN.route` (the one
implementation of routing) against the memory's stored rows: best row and gate score per token.

- Positives: the key at the subject's last token of each prompt that should fire: the edit's
  own prompt without a context prefix, and its paraphrases that contain the subject verbatim.
  A positive is a hit when its best row is its own edit and its gate score passes the threshold.
- Negatives: every token of a WikiText sample taken from the FIRST half of the corpus, just past
  the tokens that C0 was built on (so the second half stays clean for perplexity checks), plus
  the tokens outside the subject of the same prompts.

Objective: the largest positive recall subject to a false-gate rate (share of negatives whose
best gate score passes the threshold) of at most `target_rate`; among the thresholds reaching it,
the point `placement` of the way from the highest allowed negative (0: the loosest threshold that
meets the rate, best for unseen prompts of a fact, which score below its own prompt) to the next
positive (1); 0.5, the default, is the widest margin.
When that recall is below `min_recall` the positives and negatives overlap too much for the
rate target, and the threshold maximising balanced accuracy (TPR + TNR) / 2 is used instead.

The WikiText key matrix depends only on the model, the layer and the sample, so it is cached
in memory and on disk (`cache_dir()/calibration`); recalibrating at a commit recomputes scores
and the prompt keys only.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from editing.keys import token_keys
from editing.models import cache_dir, fingerprint
from editing.prompts import encode, pad_batch
from editing.routed import RoutedFFN
from editing.stats import corpus_chunks, corpus_half, corpus_hash, default_corpus_path

CHUNK_TOKENS = 256
_NEGATIVES: dict[tuple, torch.Tensor] = {}  # in-process cache of WikiText key matrices


@dataclass
class CalibrationConfig:
    """How a threshold is chosen.

    target_rate: the largest acceptable false-gate rate on negatives (0 < rate < 1).
    min_recall: below this positive recall under the rate target, fall back to balanced accuracy.
    negative_tokens: WikiText tokens used as negatives.
    negative_offset: where they start in the first half, in tokens (None: just past the
        editor's C0 tokens, `EditConfig.stats_tokens`); rounded up to a chunk boundary.
    max_edits: edits whose prompts are used as positives (a seeded sample beyond that).
    seed: seed of that sample.
    placement: where the threshold sits between the highest allowed negative (0) and the next
        positive (1) when the rate target is met.
    """

    target_rate: float = 1e-3
    min_recall: float = 0.5
    negative_tokens: int = 8192
    negative_offset: int | None = None
    max_edits: int = 1024
    seed: int = 0
    placement: float = 0.5

    def __post_init__(self):
        if not 0.0 < self.target_rate < 1.0:
            raise ValueError(f"calibration target_rate must be in (0, 1), got {self.target_rate}")
        if not 0.0 <= self.min_recall <= 1.0:
            raise ValueError(f"calibration min_recall must be in [0, 1], got {self.min_recall}")
        if not 0.0 <= self.placement <= 1.0:
            raise ValueError(f"calibration placement must be in [0, 1], got {self.placement}")
        if self.negative_tokens < 1 or self.max_edits < 1:
            raise ValueError("calibration negative_tokens and max_edits must be >= 1")


@dataclass
class Calibration:
    """A chosen threshold and what it was measured to do on the calibration queries.

    false_gate_rate: share of all negatives (WikiText + prompt tokens) gated on, split into
    `wikitext_false_gate_rate` and `prompt_false_gate_rate`; recall: share of positives routed
    to their own edit and gated on; misrouted: share of positives whose best row is another edit.
    """

    threshold: float
    objective: str  # "recall_at_rate" or "balanced_accuracy"
    false_gate_rate: float
    recall: float
    wikitext_false_gate_rate: float
    prompt_false_gate_rate: float | None
    misrouted: float
    target_rate: float
    n_positive: int
    n_negative: int
    n_edits: int
    seconds: float

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


# ---------------------------------------------------------------------------------------------- queries


@torch.no_grad()
def negative_keys(ed, tokens: int = 8192, offset: int | None = None, corpus: str | Path | None = None) -> torch.Tensor:
    """FFN keys at `ed`'s edit layer of `tokens` WikiText tokens from the first half, from `offset` on.

    Cached per (model fingerprint, layer, sample) in memory and on disk.
    Returns [N, d_key] float32 on the CPU (N = tokens, fewer if the first half is shorter).
    """
    offset = ed.config.stats_tokens if offset is None else offset
    start = math.ceil(offset / CHUNK_TOKENS)
    path = Path(corpus or default_corpus_path())
    fp = fingerprint(ed.model)
    mem_key = (fp, ed.layer, str(path), start, tokens)
    if mem_key in _NEGATIVES:
        return _NEGATIVES[mem_key]
    chunks = corpus_chunks(ed.tok, corpus_half(path.read_text(), "first"), CHUNK_TOKENS,
                           max_tokens=start * CHUNK_TOKENS + tokens)[start:]
    if not chunks:
        raise ValueError(f"{path}: the first half has fewer than {start * CHUNK_TOKENS} tokens, "
                         f"nothing left for calibration negatives at offset {offset}")
    file = cache_dir() / "calibration" / f"{fp}-L{ed.layer}-{corpus_hash(chunks)}.pt"
    if file.is_file():
        keys = torch.load(file, weights_only=True)
    else:
        device = next(ed.model.parameters()).device
        parts = []
        for i in range(0, len(chunks), 8):
            ids, mask = pad_batch(chunks[i: i + 8], ed.tok.pad_token_id or 0, device)
            k = token_keys(ed.model, ed.adapter, ed.layer, ids, mask)  # [b, T, d_key]
            parts.append(k[mask.bool()].float().cpu())
        keys = torch.cat(parts)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save(keys, tmp)
        tmp.replace(file)
    _NEGATIVES[mem_key] = keys
    return keys


def fact_prompts(edit_ids: list[str], requests) -> list[tuple[str, str, str]]:
    """(edit_id, subject, prompt) for each request's prompt and each paraphrase containing its subject."""
    out = []
    for eid, r in zip(edit_ids, requests):
        out.append((eid, r.subject, r.prompt))
        out += [(eid, r.subject, p) for p in r.rephrase_prompts if r.subject in p and p != r.prompt]
    return out


def _subject_tokens(tok, prompt: str, subject: str) -> list[bool]:
    """Per token of `prompt`: does it overlap the subject's first occurrence?"""
    start = prompt.find(subject)
    end = start + len(subject)
    offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    return [e > s and s < end and e > start for s, e in offsets]


@torch.no_grad()
def prompt_keys(ed, facts: list[tuple[str, str, str]], batch_size: int = 64):
    """Keys of prompts at the edit layer, split into positives and negatives.

    facts: (edit_id, subject, prompt) with the subject in the prompt.
    Returns positive [P, d_key] (subject's last token, one per fact), owners (P edit ids) and
    negative [M, d_key] (every token outside the subject), float32 on the CPU.
    """
    device = next(ed.model.parameters()).device
    pos, owners, neg = [], [], []
    for i in range(0, len(facts), batch_size):
        chunk = facts[i: i + batch_size]
        enc = [encode(ed.tok, p, s) for _, s, p in chunk]
        ids, mask = pad_batch([e.ids for e in enc], ed.tok.pad_token_id or 0, device)
        k = token_keys(ed.model, ed.adapter, ed.layer, ids, mask).float().cpu()  # [b, T, d_key]
        for j, ((eid, subject, prompt), e) in enumerate(zip(chunk, enc)):
            pos.append(k[j, e.subject_last])
            owners.append(eid)
            outside = ~torch.tensor(_subject_tokens(ed.tok, prompt, subject))
            neg.append(k[j, : len(e.ids)][outside])
    d = ed.adapter.d_key
    return (torch.stack(pos) if pos else torch.zeros(0, d)), owners, (torch.cat(neg) if neg else torch.zeros(0, d))


# ---------------------------------------------------------------------------------------------- scores


@torch.no_grad()
def route_scores(routed: RoutedFFN, keys: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Best slot and gate score per query, through `RoutedFFN.route`.

    keys: [n, d_key]. Returns best [n] long and score [n] float32, on the CPU.
    """
    best, score = [], []
    for i in range(0, keys.shape[0], chunk):
        b, s, _ = routed.route(keys[i: i + chunk].to(routed.rows.device))
        best.append(b.cpu())
        score.append(s.float().cpu())
    if not best:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(best), torch.cat(score)


def _rate(scores: torch.Tensor, threshold: float) -> float:
    return float((scores > threshold).float().mean()) if scores.numel() else 0.0


HELD_OUT_OFFSET = 16_384  # tokens past the C0 tokens: clear of the calibration sample (8,192 by default)


def held_out_false_gate_rate(ed, routed: RoutedFFN, tokens: int = 16_384, offset: int | None = None) -> float:
    """Share of held-out WikiText tokens whose best gate score passes `routed`'s current threshold.

    The tokens come from the first half, `HELD_OUT_OFFSET` past the C0 tokens (`offset` overrides),
    so a calibrated threshold is not measured on its own calibration sample. A memory gates a
    token on at most one row, so this is the share of unrelated tokens that receive some residual.
    """
    offset = ed.config.stats_tokens + HELD_OUT_OFFSET if offset is None else offset
    _, score = route_scores(routed, negative_keys(ed, tokens, offset))
    return _rate(score, float(routed.threshold))


def choose_threshold(pos: torch.Tensor, neg: torch.Tensor, target_rate: float = 1e-3,
                     min_recall: float = 0.5, placement: float = 0.5) -> tuple[float, str]:
    """The threshold of the module's objective.

    pos: [P] gate scores of positives on their own row (-inf where another row was best).
    neg: [N] best gate scores of negatives (N >= 1). The gate is `score > threshold`.
    placement: 0 = the highest allowed negative, 1 = the next positive above it (the gate is
    `score > threshold`, so at 1 that positive itself is just left out).
    Returns (threshold, objective name).
    """
    if neg.numel() == 0:
        raise ValueError("calibration needs at least one negative query")
    neg_desc = neg.sort(descending=True).values
    k = math.floor(target_rate * neg.numel())  # at most k negatives may lie strictly above
    lo = float(neg_desc[k])
    hits = pos[torch.isfinite(pos)]
    above = hits[hits > lo]
    if pos.numel() == 0 or (above.numel() / pos.numel() >= min_recall and above.numel()):
        hi = float(above.min()) if above.numel() else lo
        return lo + placement * (hi - lo), "recall_at_rate"
    cand = torch.cat([hits, neg]).unique()  # ascending
    pos_sorted, neg_sorted = hits.sort().values, neg.sort().values
    tp = hits.numel() - torch.searchsorted(pos_sorted, cand, right=True)
    fp = neg.numel() - torch.searchsorted(neg_sorted, cand, right=True)
    balanced = 0.5 * (tp / pos.numel() + 1 - fp / neg.numel())
    i = int(balanced.argmax())
    thr = float(cand[i]) if i + 1 == cand.numel() else float(cand[i] + cand[i + 1]) / 2
    return thr, "balanced_accuracy"


def calibrate(ed, routed: RoutedFFN, facts: list[tuple[str, str, str]], config: CalibrationConfig | None = None,
              corpus: str | Path | None = None) -> Calibration | None:
    """Choose `routed`'s threshold for its current rows (the threshold buffer is not changed).

    ed: the `Editor` of the memory's model and layer. facts: (edit_id, subject, prompt) of the
    prompts that should fire (`fact_prompts`); those of edits not in `routed` are ignored, and
    beyond `config.max_edits` edits a seeded sample is used. Returns None for an empty memory.
    """
    cfg = config or CalibrationConfig()
    t0 = time.perf_counter()
    if routed.n_facts == 0:
        return None
    ids = sorted({eid for eid, _, _ in facts if eid in routed.slots})
    if len(ids) > cfg.max_edits:
        ids = sorted(random.Random(cfg.seed).sample(ids, cfg.max_edits))
    keep = set(ids)
    pos_keys, owners, prompt_neg = prompt_keys(ed, [f for f in facts if f[0] in keep])
    wiki_neg = negative_keys(ed, cfg.negative_tokens, cfg.negative_offset, corpus)
    best, pos_score = route_scores(routed, pos_keys)
    own = torch.tensor([routed.slots[e] for e in owners], dtype=torch.long)
    pos = torch.where(best == own, pos_score, torch.full_like(pos_score, float("-inf")))
    _, wiki_score = route_scores(routed, wiki_neg)
    _, prompt_score = route_scores(routed, prompt_neg)
    neg = torch.cat([wiki_score, prompt_score])
    thr, objective = choose_threshold(pos, neg, cfg.target_rate, cfg.min_recall, cfg.placement)
    return Calibration(
        threshold=thr, objective=objective, false_gate_rate=_rate(neg, thr), recall=_rate(pos, thr),
        wikitext_false_gate_rate=_rate(wiki_score, thr),
        prompt_false_gate_rate=_rate(prompt_score, thr) if prompt_score.numel() else None,
        misrouted=float((best != own).float().mean()) if own.numel() else 0.0, target_rate=cfg.target_rate,
        n_positive=int(pos.numel()), n_negative=int(neg.numel()), n_edits=len(ids), seconds=round(time.perf_counter() - t0, 3),
    )
