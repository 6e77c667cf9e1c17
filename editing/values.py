"""The value of an edit: the residual r = v* - W k added to the FFN output when the key routes.

v* is optimised as in ROME's compute_v / MEMIT's compute_z: a vector delta is added to the
edit layer's FFN output at the subject's last token, and minimises
    NLL(target_new | context + prompt)  +  kl_factor * KL(essence prompt)  +  weight decay,
with a norm clamp and an early stop. With v* = W k + delta, the residual is delta itself.

When the edit layer already carries a memory (sequential editing), earlier rows stay live
everywhere except at the subject's last token, where the base FFN output is used
(`base_output_at`): once the edit is added its own row, which holds that token's key, normally
wins there and replaces whatever routed before (an older row with an identical key keeps the tie).

Two implementations compute the same thing:
- `optimise_residuals`: all edits of a batch share one forward/backward per step, each with
  its own delta rows and token positions; the layers up to the edit layer run once (their
  output is cached) and every step runs only the layers above it, with the LM head applied
  only at the positions the loss reads.
- `optimise_residuals_reference`: the naive per-edit loop over full forwards, kept for
  tests and the `value-opt` benchmark.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from editing.adapters import ArchAdapter
from editing.hooks import capture_calls, capture_input, edit_output
from editing.prompts import ESSENCE_TEMPLATE, encode, pad_batch
from editing.routed import RoutedDownProj


@dataclass
class ValueHparams:
    """Optimiser settings (ROME's v_* hyperparameters)."""

    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    # Early stop once the target's NLL (not the regularised total, whose weight-decay and KL
    # terms keep it above ROME's 5e-2 floor for most edits) is below this: p(target) > ~95%.
    stop_loss: float = 5e-2

    def __post_init__(self):
        check_setting("values.steps", self.steps, int, 1, 10_000)
        check_setting("values.lr", self.lr, float, 0.0, None, low_open=True)
        for name in ("weight_decay", "kl_factor", "stop_loss"):
            check_setting(f"values.{name}", getattr(self, name), float, 0.0, None)
        check_setting("values.clamp_norm_factor", self.clamp_norm_factor, float, 0.0, None, low_open=True)


def check_setting(name: str, value, kind: type, low, high, low_open: bool = False) -> None:
    """Raise ValueError naming edit setting `name` unless `value` is a finite `kind` (int, or any real number for
    float; never a bool) within [low, high] (`low_open`: above low). Bounds of None are open."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    ok = ok and math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or value <= high)
    if not ok:
        what = "an integer" if kind is int else "a number"
        bounds = [f"{'>' if low_open else '>='} {low}" if low is not None else "", f"<= {high}" if high is not None else ""]
        bounds = " and ".join(b for b in bounds if b)
        raise ValueError(f"edit setting {name} must be {what}{' ' + bounds if bounds else ''}, got {value!r}")


@dataclass
class ValueResult:
    """Residuals and per-edit diagnostics.

    residuals: [n, d_model] float32.
    loss, nll: [n] the last computed total loss and target NLL of each edit.
    steps: number of optimiser updates each edit took.
    """

    residuals: torch.Tensor
    loss: torch.Tensor
    nll: torch.Tensor
    steps: list[int] = field(default_factory=list)


@dataclass
class RewriteBatch:
    """Token layout shared by both optimisers, for B edits and S sequences.

    input_ids, attention_mask: [S, T] right-padded.
    seq_edit: [S] which edit each sequence belongs to; lookup: [S] subject-last positions.
    rewrite_first: [B] index of each edit's bare ("{}") rewrite sequence.
    label_seq, label_pos, label_tok: [M] target tokens to score (sequence, position, token id).
    kl_seq, kl_pos: [B] each edit's essence sequence and the position its KL reads.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    seq_edit: torch.Tensor
    lookup: torch.Tensor
    rewrite_first: torch.Tensor
    label_seq: torch.Tensor
    label_pos: torch.Tensor
    label_tok: torch.Tensor
    kl_seq: torch.Tensor
    kl_pos: torch.Tensor
    n_edits: int

    @property
    def read_seq(self) -> torch.Tensor:
        """[M + B] sequences whose logits the loss reads (labels first, then KL)."""
        return torch.cat([self.label_seq, self.kl_seq])

    @property
    def read_pos(self) -> torch.Tensor:
        return torch.cat([self.label_pos, self.kl_pos])


def build_rewrite_batch(tok, requests, templates: list[str], device) -> RewriteBatch:
    """Lay out the rewrite sequences (one per template) and one essence sequence per edit."""
    seqs, seq_edit, lookup, rewrite_first = [], [], [], []
    label_seq, label_pos, label_tok, kl_seq, kl_pos = [], [], [], [], []
    for b, r in enumerate(requests):
        rewrite_first.append(len(seqs))
        for t in templates:
            e = encode(tok, r.prompt, r.subject, target=r.target_new, context=t)
            for p, tid in zip(e.label_positions, e.target_ids):
                label_seq.append(len(seqs))
                label_pos.append(p)
                label_tok.append(tid)
            seqs.append(e.ids)
            seq_edit.append(b)
            lookup.append(e.subject_last)
    for b, r in enumerate(requests):
        e = encode(tok, ESSENCE_TEMPLATE.format(r.subject), r.subject)
        kl_seq.append(len(seqs))
        kl_pos.append(e.subject_last)
        seqs.append(e.ids)
        seq_edit.append(b)
        lookup.append(e.subject_last)
    ids, mask = pad_batch(seqs, tok.pad_token_id, device)

    def t(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    return RewriteBatch(ids, mask, t(seq_edit), t(lookup), t(rewrite_first), t(label_seq), t(label_pos),
                        t(label_tok), t(kl_seq), t(kl_pos), len(requests))


@contextlib.contextmanager
def base_output_at(adapter: ArchAdapter, layer: int, seq: torch.Tensor, pos: torch.Tensor):
    """Inside the block, the edit layer's FFN output at tokens (seq[i], pos[i]) is the base
    down-projection's, whatever an attached memory routes there; elsewhere the memory is live.

    seq, pos: [n] long, indices into the [S, T, d_model] down-projection output. A no-op when
    no memory is attached at `layer`.
    """
    down = adapter.down_proj(layer)
    if not isinstance(down, RoutedDownProj):
        yield
        return
    base: dict = {}

    def splice(out: torch.Tensor) -> torch.Tensor:
        s, p = seq.to(out.device), pos.to(out.device)
        return out.index_put((s, p), base["out"][s, p])

    with edit_output(down.base, lambda o: _keep(o, base)), edit_output(down, splice):
        yield


def _edit_losses(logits: torch.Tensor, batch: RewriteBatch, delta: torch.Tensor, v0_norm: torch.Tensor,
                 kl_init: torch.Tensor | None, hp: ValueHparams):
    """Per-edit losses from the logits the loss reads.

    Args:
        logits: [M + B, vocab] at `batch.read_seq/read_pos`.
        delta: [B, d_model]; v0_norm: [B] norm of the unedited FFN output at the subject.
        kl_init: [B, vocab] log-probs of the unedited essence prompts (None on the first call).
    Returns: total [B], nll [B], kl_logp [B, vocab].
    """
    m = batch.label_seq.numel()
    B = batch.n_edits
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok_lp = logp[:m].gather(1, batch.label_tok[:, None]).squeeze(1)  # [M]
    n_seq = batch.input_ids.shape[0]
    seq_sum = torch.zeros(n_seq, device=logits.device).index_add(0, batch.label_seq, tok_lp)
    seq_cnt = torch.zeros(n_seq, device=logits.device).index_add(0, batch.label_seq, torch.ones_like(tok_lp))
    is_rewrite = seq_cnt > 0
    seq_nll = -seq_sum[is_rewrite] / seq_cnt[is_rewrite]  # [S_rewrite]
    edits = batch.seq_edit[is_rewrite]
    nll = torch.zeros(B, device=logits.device).index_add(0, edits, seq_nll)
    nll = nll / torch.zeros(B, device=logits.device).index_add(0, edits, torch.ones_like(seq_nll))
    kl_logp = logp[m:]  # [B, vocab]
    if kl_init is None:
        kl = torch.zeros(B, device=logits.device)
    else:  # ROME's kl_div(init, current, log_target=True): KL(current || init)
        kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
    wd = hp.weight_decay * delta.norm(dim=-1) / v0_norm**2
    return nll + hp.kl_factor * kl + wd, nll, kl_logp


def _clamp(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Rescale rows of delta [B, d] in place to norm <= max_norm [B]."""
    with torch.no_grad():
        norms = delta.norm(dim=-1)
        scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
        delta.mul_(scale[:, None])


def _add_delta(out: torch.Tensor, batch: RewriteBatch, delta: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """out [S, T, d] + delta[edit of seq] at each sequence's subject-last position."""
    seq = torch.arange(out.shape[0], device=out.device)
    edits = batch.seq_edit if rows is None else rows
    return out.index_put((seq, batch.lookup), delta[edits].to(out.dtype), accumulate=True)


class _Group:
    """A subset of the batch's sequences, re-laid so each one's subject-last token sits in
    column `split`, and trimmed after the last column the loss reads.

    Columns before `split` (the prefix) never change while delta is optimised: they run once
    and their attention keys/values stay cached. Every step runs only the suffix columns of the
    layers above the edit layer. Grouping sequences of similar suffix length keeps padding low.
    """

    def __init__(self, batch: RewriteBatch, seqs: torch.Tensor, read_idx: torch.Tensor, pad_id: int):
        self.seqs, self.read_idx = seqs, read_idx  # [s] batch sequences, [r] entries of batch.read_* here
        lookup = batch.lookup[seqs]
        lengths = batch.attention_mask[seqs].sum(1)
        local = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long, device=seqs.device)
        local[seqs] = torch.arange(len(seqs), device=seqs.device)
        self.read_row = local[batch.read_seq[read_idx]]  # [r] row within the group
        self.split = int(lookup.max())
        offset = self.split - lookup  # [s] left shift of each sequence
        self.read_col = batch.read_pos[read_idx] + offset[self.read_row] - self.split  # [r] suffix column
        width = self.split + int(self.read_col.max()) + 1
        cols = torch.arange(width, device=seqs.device)[None, :] - offset[:, None]  # source position per column
        valid = (cols >= 0) & (cols < lengths[:, None])
        src = cols.clamp(0, batch.input_ids.shape[1] - 1)
        ids = batch.input_ids[seqs]
        self.input_ids = torch.where(valid, ids.gather(1, src), torch.full_like(src, pad_id))
        self.attention_mask = valid.long()
        self.position_ids = cols.clamp_min(0)
        self.seq_edit = batch.seq_edit[seqs]


def _partition(need: list[int], n_groups: int) -> list[int]:
    """Cut points of the sorted suffix lengths `need` into at most `n_groups` contiguous groups
    minimising the padded suffix area sum(len(group) * max(group)) (exact dynamic programme).

    Returns the end index of each group, e.g. [75, 150, 224].
    """
    n = len(need)
    k = max(1, min(n_groups, n))
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0
    for g in range(1, k + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):  # group g holds need[i:j]; its width is need[j - 1]
                c = cost[g - 1][i] + (j - i) * need[j - 1]
                if c < cost[g][j]:
                    cost[g][j], cut[g][j] = c, i
    g = min(range(1, k + 1), key=lambda g: (cost[g][n], g))  # fewest groups among the cheapest
    ends, j = [], n
    while g > 0:
        ends.append(j)
        j, g = cut[g][j], g - 1
    return ends[::-1]


def _groups(batch: RewriteBatch, pad_id: int, n_groups: int = 4) -> list[_Group]:
    """Split the sequences into up to `n_groups` groups of similar needed suffix length, choosing
    the cut points that minimise the padded suffix area (`_partition`).

    On the value-opt benchmark batch (32 edits, 224 sequences) the area is 1568 suffix positions
    with one group, 1043 with three equal-sized groups and 868 with four optimal ones.
    """
    S = batch.input_ids.shape[0]
    need = torch.zeros(S, dtype=torch.long, device=batch.input_ids.device)
    need.scatter_reduce_(0, batch.read_seq, batch.read_pos - batch.lookup[batch.read_seq] + 1, "amax")
    order = torch.argsort(need, stable=True)
    ends = _partition(need[order].tolist(), n_groups)
    chunks = [order[i:j] for i, j in zip([0] + ends[:-1], ends)]
    groups = []
    for seqs in chunks:
        seqs = torch.sort(seqs).values
        in_group = torch.isin(batch.read_seq, seqs)
        read_idx = torch.nonzero(in_group).squeeze(1)
        if len(read_idx):
            groups.append(_Group(batch, seqs, read_idx, pad_id))
    return groups


def _cache_kv(cache, layer: int):
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _set_cache_kv(cache, layer: int, kv) -> None:
    if hasattr(cache, "layers"):
        cache.layers[layer].keys, cache.layers[layer].values = kv
    else:
        cache.key_cache[layer], cache.value_cache[layer] = kv


def optimise_residuals(model, tok, adapter: ArchAdapter, layer: int, requests, templates: list[str],
                       hp: ValueHparams | None = None, n_groups: int = 4) -> ValueResult:
    """Batched, truncated optimisation of every request's residual (see module doc and `_Group`).

    Returns residuals [n, d_model] equal (up to float noise) to `optimise_residuals_reference`.
    """
    from transformers import DynamicCache

    hp = hp or ValueHparams()
    device = next(model.parameters()).device
    batch = build_rewrite_batch(tok, requests, templates, device)
    B, layers = batch.n_edits, adapter.layers
    upper = list(range(layer + 1, len(layers)))
    n_read = batch.read_seq.numel()
    groups = _groups(batch, tok.pad_token_id, n_groups)

    head_in = None
    v0 = torch.zeros(batch.input_ids.shape[0], adapter.d_model, device=device)
    for g in groups:
        g.cache = DynamicCache()
        store: dict = {}
        with torch.no_grad():
            P = g.split
            if P > 0:
                model(input_ids=g.input_ids[:, :P], attention_mask=g.attention_mask[:, :P],
                      position_ids=g.position_ids[:, :P], past_key_values=g.cache, use_cache=True)
            g.prefix_kv = {i: _cache_kv(g.cache, i) for i in upper} if P > 0 else {}
            # The unedited suffix pass: the edit layer's output, the calls of the layers above it,
            # the unedited FFN output at the subject (v0) and the inputs of the final norm.
            rows = torch.arange(g.input_ids.shape[0], device=device)
            with capture_calls([layers[layer]] + [layers[i] for i in upper]) as calls, \
                    capture_input(adapter.final_norm) as final_in, \
                    base_output_at(adapter, layer, rows, torch.zeros_like(rows)), \
                    edit_output(adapter.down_proj(layer), lambda o: _keep(o, store)):
                model(input_ids=g.input_ids[:, P:], attention_mask=g.attention_mask,
                      position_ids=g.position_ids[:, P:], past_key_values=g.cache, use_cache=True)
        g.calls = calls[1:]
        g.out_l = _first(calls[0]["output"]).detach()  # [s, W - P, d_model]
        v0[g.seqs] = store["out"][:, 0].float()  # the subject is suffix column 0
        sel = final_in[0][g.read_row, g.read_col]
        head_in = torch.zeros(n_read, sel.shape[-1], device=device, dtype=sel.dtype) if head_in is None else head_in
        head_in[g.read_idx] = sel
    v0_norm = v0[batch.rewrite_first].norm(dim=-1)
    kl_init = torch.log_softmax(adapter.lm_head(adapter.final_norm(head_in))[-B:].float(), -1).detach()

    def run_group(g: _Group, delta: torch.Tensor) -> torch.Tensor:
        for i in upper:  # forget the suffix keys/values of the previous step
            if g.split > 0:
                _set_cache_kv(g.cache, i, g.prefix_kv[i])
            elif hasattr(g.cache, "layers") and i < len(g.cache.layers):
                g.cache.layers[i].keys = g.cache.layers[i].keys[..., :0, :]
                g.cache.layers[i].values = g.cache.layers[i].values[..., :0, :]
        rows = torch.arange(g.out_l.shape[0], device=device)
        h = g.out_l.index_put((rows, torch.zeros_like(rows)), delta[g.seq_edit].to(g.out_l.dtype), accumulate=True)
        for i, rec in zip(upper, g.calls):
            h = _first(layers[i](h, *rec["args"][1:], **rec["kwargs"]))
        return h[g.read_row, g.read_col]  # [r, d_model]

    delta = torch.zeros(B, adapter.d_model, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    max_norm = hp.clamp_norm_factor * v0_norm
    active = torch.ones(B, dtype=torch.bool, device=device)
    steps = [0] * B
    loss = nll = torch.zeros(B, device=device)
    for it in range(hp.steps):
        sel = torch.zeros(n_read, adapter.d_model, device=device, dtype=head_in.dtype)
        for g in groups:
            sel = sel.index_put((g.read_idx,), run_group(g, delta))
        logits = adapter.lm_head(adapter.final_norm(sel))  # [M + B, vocab]
        loss_all, nll_all, _ = _edit_losses(logits, batch, delta, v0_norm, kl_init, hp)
        loss = torch.where(active, loss_all.detach(), loss)
        nll = torch.where(active, nll_all.detach(), nll)
        active = active & (nll_all.detach() >= hp.stop_loss)
        if it == hp.steps - 1 or not bool(active.any()):
            break
        frozen = delta.detach()[~active].clone()
        opt.zero_grad()
        (loss_all * active).sum().backward()
        opt.step()
        with torch.no_grad():
            delta[~active] = frozen
        _clamp(delta, torch.where(active, max_norm, torch.full_like(max_norm, float("inf"))))
        for b in range(B):
            steps[b] += int(active[b])
    return ValueResult(delta.detach().float(), loss, nll, steps)


def optimise_residuals_reference(model, tok, adapter: ArchAdapter, layer: int, requests, templates: list[str],
                                 hp: ValueHparams | None = None) -> ValueResult:
    """The naive loop: one edit at a time, a full forward per step, full-vocabulary logits."""
    hp = hp or ValueHparams()
    device = next(model.parameters()).device
    residuals, losses, nlls, steps = [], [], [], []
    for req in requests:
        batch = build_rewrite_batch(tok, [req], templates, device)
        delta = torch.zeros(1, adapter.d_model, device=device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.lr)
        v0_norm = kl_init = max_norm = None
        n_steps = 0
        for it in range(hp.steps):
            store: dict = {}
            with base_output_at(adapter, layer, torch.arange(len(batch.lookup), device=device), batch.lookup), \
                    edit_output(adapter.down_proj(layer), lambda o: _add_delta(_keep(o, store), batch, delta)):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            if v0_norm is None:
                f = batch.rewrite_first
                v0_norm = store["out"][f, batch.lookup[f]].float().norm(dim=-1)
                max_norm = hp.clamp_norm_factor * v0_norm
            sel = logits[batch.read_seq, batch.read_pos]
            loss, nll, kl_logp = _edit_losses(sel, batch, delta, v0_norm, kl_init, hp)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
                loss, nll, _ = _edit_losses(sel, batch, delta, v0_norm, kl_init, hp)
            if nll.item() < hp.stop_loss or it == hp.steps - 1:
                break
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            _clamp(delta, max_norm)
            n_steps += 1
        residuals.append(delta.detach().float())
        losses.append(loss.detach())
        nlls.append(nll.detach())
        steps.append(n_steps)
    return ValueResult(torch.cat(residuals), torch.cat(losses), torch.cat(nlls), steps)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _keep(out: torch.Tensor, store: dict) -> torch.Tensor:
    store["out"] = out.detach()
    return out
