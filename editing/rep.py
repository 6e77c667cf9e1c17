"""REP robust keys: a trained adapter on the routing query that makes rephrased, shuffled and
long-context subjects route to their stored edit.

The adapter only changes the query the router scores, never the FFN's own computation:
    q' = q + g(q) * (q A) B,   g(q) = sigmoid(w . q/|q| + b)
with A [d_key, rank], B [rank, d_key] (B starts at zero, so a new adapter is the identity) and a
scalar gate g per token that learns to fire only on tokens that need rerouting.

Training (after the REP paper) on the memory's own router scores:
- aggregation: keys of the subject's variants (rephrasings, shuffled tokens, a long unrelated
  prefix) must select their stored edit (cross-entropy over all stored rows) with a gate score
  above the threshold plus a margin;
- consistency: the stored keys themselves are left unchanged (q' = q);
- negatives: WikiText tokens and the non-subject tokens of the edit prompts keep the gate closed
  and score below the threshold minus a margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from editing.evaluate import shuffle_subject
from editing.keys import compute_keys, token_keys
from editing.prompts import pad_batch
from editing.records import EditRequest


class RobustKeys(nn.Module):
    """The query adapter. forward: keys [T, d_key] -> rerouted keys [T, d_key] (same dtype)."""

    def __init__(self, d_key: int, rank: int = 64):
        super().__init__()
        self.d_key, self.rank = d_key, rank
        self.down = nn.Parameter(torch.randn(d_key, rank) / d_key ** 0.5)  # A
        self.up = nn.Parameter(torch.zeros(rank, d_key))  # B
        self.gate_w = nn.Parameter(torch.zeros(d_key))
        self.gate_b = nn.Parameter(torch.tensor(-4.0))

    def gate(self, key: torch.Tensor) -> torch.Tensor:
        """Per-token gate in (0, 1): key [T, d_key] -> [T]."""
        return torch.sigmoid(F.normalize(key.float(), dim=-1) @ self.gate_w + self.gate_b)

    def forward(self, key: torch.Tensor) -> torch.Tensor:
        k = key.float()
        return (k + self.gate(k)[:, None] * ((k @ self.down) @ self.up)).to(key.dtype)

    def config(self) -> dict:
        return {"d_key": self.d_key, "rank": self.rank}

    def to_bytes(self) -> bytes:
        """The weights as a safetensors blob (what a memory version stores as its artifact)."""
        from safetensors.torch import save

        return save({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()})

    @classmethod
    def from_bytes(cls, data: bytes) -> "RobustKeys":
        """An adapter from `to_bytes` output (its sizes come from the weights), frozen for inference."""
        from safetensors.torch import load

        state = load(data)
        missing = {"down", "up", "gate_w", "gate_b"} - set(state)
        if missing:
            raise ValueError(f"robust-keys weights lack {sorted(missing)}")
        d_key, rank = state["down"].shape
        adapter = cls(d_key, rank)
        adapter.load_state_dict(state)
        return adapter.eval().requires_grad_(False)

    def digest(self) -> str:
        """Content hash of the weights: the artifact key, so equal adapters share one file."""
        import hashlib

        return hashlib.sha256(self.to_bytes()).hexdigest()[:24]


ARTIFACT_KIND = "robust_keys"  # store artifact kind of adapter weights; a memory's router config names one:
# {"name": ..., "threshold": ..., "robust_keys": {"artifact": digest, "rank": r, "d_key": d}}

RETRAIN_GROWTH = 0.25  # default: retrain after a job leaves the memory 25% more rows than the adapter saw
# Jobs retrain automatically up to this many rows (config "retrain_max_rows" overrides); larger memories are
# retrained by hand (`kvedit edit robust-keys`), where the wait is chosen, not imposed on a job. Training time
# grows with the rows (13 keys per row, a step scores up to `RobustKeyHparams.batch` of them against every row):
# see benchmarks/RESULTS.md (2026-12-07, "REP retraining time").
RETRAIN_MAX_ROWS = 1000


def retrain_rows(entry: dict | None) -> tuple[float, float] | None:
    """The memory sizes (fewest, most rows) at which jobs retrain the adapter of a router-config
    `"robust_keys"` entry, or None when they never do (retrained by hand only, or trained at the cap).

    The entry holds `"rows"` (trained on), `"retrain_growth"` and `"retrain_max_rows"` (default
    `RETRAIN_MAX_ROWS`; null: no cap). A retrain is due once the memory holds that share more rows than
    the adapter saw, or has reached the cap: an adapter trained on 900 rows retrains at 1,000, also when
    one job takes the memory from 990 to 1,010 (at most one growth step past the cap).
    """
    if not isinstance(entry, dict):
        return None
    growth, trained = entry.get("retrain_growth"), entry.get("rows")
    if not growth or not trained:
        return None
    cap = entry.get("retrain_max_rows", RETRAIN_MAX_ROWS)
    goal = trained * (1 + growth)
    if cap is None:
        return goal, math.inf
    if trained >= cap:
        return None
    return min(goal, cap), cap * (1 + growth)


@dataclass
class RobustKeyHparams:
    # Adapter rank; None sizes it to the memory (`rank_for`): the adapter has to map every edit's variants onto
    # its row, and at T = 400 rank 64 fit only 38% of the trained rephrasings where rank 256 fit 99%.
    rank: int | None = None
    steps: int = 300
    lr: float = 3e-3
    margin: float = 0.1
    temperature: float = 0.05
    long_context_tokens: int = 256
    negatives: int = 4096
    # Also train on each edit's own (bare) prompt, so the adapter cannot move it off its row: at T = 400 without
    # it 10% of own prompts fell under the gate (benchmarks/RESULTS.md, 2026-12-07); with it 1.5%, as unadapted.
    own_prompts: bool = True
    # Positives per step, drawn at random when there are more. Evaluation trains on 5 rephrasings
    # per edit (8 positives with the shuffle, long-context and own prompt), so up to 512 edits nothing is sampled
    # and the measured cells stand; a store memory trains on all 10 (13 per edit: whole up to 315 edits). Bounds
    # the step's [batch, rows] score matrices when a large memory is (re)trained.
    batch: int = 4096
    negative_batch: int = 16384  # negatives per step, drawn at random when there are more (4,096 + ~4 per edit)

    def rank_for(self, n_edits: int, d_key: int) -> int:
        """The adapter rank for `n_edits` edits: `rank` if set, else 64 per started 100 edits, at most d_key."""
        if self.rank is not None:
            return self.rank
        return min(d_key, 64 * max(1, math.ceil(n_edits / 100)))


def variant_requests(reqs: list[EditRequest], rephrases: slice, tok, seed: int = 0) -> tuple[list[EditRequest], list[int]]:
    """The subject variants REP trains on: each subject rephrasing in `rephrases`, and the
    subject's tokens shuffled. Returns (requests with the substituted subject, owning edit index)."""
    out, owner = [], []
    for i, r in enumerate(reqs):
        subs = list(r.subject_rephrases[rephrases]) + [shuffle_subject(tok, r.subject, seed + i)]
        for s in subs:
            if s and s != r.subject:
                out.append(EditRequest(prompt=r.prompt.replace(r.subject, s, 1), subject=s, target_new=r.target_new,
                                       target_true=r.target_true))
                owner.append(i)
    return out, owner


@torch.no_grad()
def _bare_keys(ed, reqs: list[EditRequest], context: str = "{}") -> torch.Tensor:
    """Key at the subject's last token of each prompt (one context, no averaging): [n, d_key]."""
    return compute_keys(ed.model, ed.tok, ed.adapter, ed.layer, reqs, [context]).cpu()


@torch.no_grad()
def _negative_keys(ed, reqs: list[EditRequest], text: str, n: int) -> torch.Tensor:
    """FFN keys of WikiText tokens and of the edit prompts' tokens before the subject: [m, d_key]."""
    from editing.prompts import encode
    from editing.stats import corpus_chunks

    chunks = corpus_chunks(ed.tok, text, chunk_tokens=256, max_tokens=n + 256)
    device = next(ed.model.parameters()).device
    out = []
    for i in range(0, len(chunks), 8):
        ids, mask = pad_batch(chunks[i: i + 8], ed.tok.pad_token_id, device)
        out.append(token_keys(ed.model, ed.adapter, ed.layer, ids, mask)[mask.bool()].cpu())
    enc = [encode(ed.tok, r.prompt, r.subject) for r in reqs]
    step = len(enc) if len(enc) <= 512 else 256  # one pass up to 512 prompts (as measured), chunks beyond
    for c in range(0, len(enc), max(step, 1)):
        part = enc[c: c + step]
        ids, mask = pad_batch([e.ids for e in part], ed.tok.pad_token_id, device)
        k = token_keys(ed.model, ed.adapter, ed.layer, ids, mask).cpu()
        for j, e in enumerate(part):  # tokens before the subject's first token
            out.append(k[j, :e.subject_first][mask[j, :e.subject_first].bool().cpu()])
    return torch.cat(out)[: n + sum(len(e.ids) for e in enc)]


def fit_robust_keys(ed, memory, reqs: list[EditRequest], stored_keys: torch.Tensor, negative_text: str,
                    rephrases: slice = slice(0, 5), hp: RobustKeyHparams | None = None, seed: int = 0) -> RobustKeys:
    """Train a `RobustKeys` adapter for the edits `reqs` held in `memory` (a `RoutedFFN`).

    stored_keys: [n, d_key] the edits' stored (context-averaged) keys, row i for reqs[i].
    negative_text: text whose tokens must not fire (use C0's half of WikiText, never the perplexity half).
    rephrases: which `subject_rephrases` are seen in training (the rest stay out-of-domain).
    Returns the adapter (not yet installed; `memory.query_adapter = adapter` installs it).
    """
    hp = hp or RobustKeyHparams()
    torch.manual_seed(seed)
    # shuffles seeded apart from evaluation's (`evaluate.shuffled_subject` uses small seeds)
    var, owner = variant_requests(reqs, rephrases, ed.tok, seed + 100_000)
    pos = [_bare_keys(ed, var)] if var else []
    pos_owner = list(owner)
    # long context: the unrelated prefix a REP "long context" query carries
    ids = ed.tok(negative_text)["input_ids"][-hp.long_context_tokens:]
    prefix = ed.tok.decode(ids).strip() + "\n\n"
    pos.append(_bare_keys(ed, reqs, context=prefix.replace("{", "{{").replace("}", "}}") + "{}"))
    pos_owner += list(range(len(reqs)))
    if hp.own_prompts:
        pos.append(_bare_keys(ed, reqs))
        pos_owner += list(range(len(reqs)))
    pos_k = torch.cat(pos).float()
    pos_owner_t = torch.tensor(pos_owner)
    neg_k = _negative_keys(ed, reqs, negative_text, hp.negatives).float()
    mu = stored_keys.float().cpu()

    router = memory.router
    rows, gains = router.derive_rows(mu)
    rows, gains = rows.float().cpu(), gains.float().cpu()
    thr = float(memory.threshold)
    adapter = RobustKeys(mu.shape[1], hp.rank_for(len(reqs), mu.shape[1]))
    opt = torch.optim.Adam(adapter.parameters(), lr=hp.lr)

    def scores(q):  # [m, n] the router's selection scores, as RoutedFFN.route computes them
        return router.query_scale((q * q).sum(-1))[:, None] * (q @ rows.T)

    draw = torch.Generator().manual_seed(seed)

    def sample(n: int, size: int) -> torch.Tensor | None:  # a step's random subset of n items; None: all of them
        return torch.randperm(n, generator=draw)[:size] if n > size else None

    for _ in range(hp.steps):
        opt.zero_grad()
        pi, ni = sample(len(pos_k), hp.batch), sample(len(neg_k), hp.negative_batch)
        pk, po = (pos_k, pos_owner_t) if pi is None else (pos_k[pi], pos_owner_t[pi])
        nk = neg_k if ni is None else neg_k[ni]
        sp = scores(adapter(pk))
        own = sp.gather(1, po[:, None]).squeeze(1) * gains[po]
        agg = F.cross_entropy(sp / hp.temperature, po) + F.relu(thr + hp.margin - own).mean()
        cons = ((adapter(mu) - mu).pow(2).sum(-1) / mu.pow(2).sum(-1)).mean()
        sn = scores(adapter(nk))
        neg_best, j = sn.max(-1)
        neg = F.relu(neg_best * gains[j] - (thr - hp.margin)).mean()
        gate = F.binary_cross_entropy(adapter.gate(pk), torch.ones(len(pk))) + \
            F.binary_cross_entropy(adapter.gate(nk), torch.zeros(len(nk)))
        loss = agg + 10 * cons + neg + 0.1 * gate
        loss.backward()
        opt.step()
    return adapter.eval().requires_grad_(False)
