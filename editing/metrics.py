"""Scoring helpers shared by `edit run`, the evaluators and the tests.

`target_nll` is the CounterFact quantity (rome's eval_utils_counterfact): the mean per-token
NLL of " target" after a prompt, with teacher forcing.
"""

from __future__ import annotations

import torch

from editing.prompts import pad_batch, target_token_ids


@torch.no_grad()
def target_nll(model, tok, prompts: list[str], targets: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean per-token NLL of " target" after each prompt. Returns [n] float32 (CPU)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs, spans = [], []
        for p, t in zip(prompts[i: i + batch_size], targets[i: i + batch_size]):
            p_ids = tok(p)["input_ids"]
            if not p_ids:  # the target's first token would be scored at another position
                raise ValueError(f"prompt {p!r} has no tokens to score {t!r} after")
            t_ids = target_token_ids(tok, p, t)
            seqs.append(p_ids + t_ids)
            spans.append((len(p_ids), t_ids))
        ids, mask = pad_batch(seqs, tok.pad_token_id, device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        for j, (start, t_ids) in enumerate(spans):
            pos = torch.arange(start - 1, start - 1 + len(t_ids), device=device)
            tok_lp = logp[j, pos, torch.tensor(t_ids, device=device)]
            out.append(-tok_lp.mean())
    return torch.stack(out).cpu() if out else torch.zeros(0)


def new_beats_true(model, tok, prompts: list[str], targets_new: list[str], targets_true: list[str]) -> torch.Tensor:
    """[n] bool: the new target is more likely than the true one (lower mean NLL)."""
    nll_new = target_nll(model, tok, prompts, targets_new)
    nll_true = target_nll(model, tok, prompts, targets_true)
    return nll_new < nll_true


@torch.no_grad()
def next_token_logits(model, tok, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Logits of the token after each prompt. Returns [n, vocab] float32 (CPU)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        seqs = [tok(p)["input_ids"] for p in prompts[i: i + batch_size]]
        ids, mask = pad_batch(seqs, tok.pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        last = mask.sum(1) - 1
        out.append(logits[torch.arange(len(seqs), device=device), last].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def greedy_generate(model, tok, prompts: list[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuation of each prompt (one at a time, no padding effects)."""
    device = next(model.parameters()).device
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"].to(device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return outs
