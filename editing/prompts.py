"""Every prompt kvedit builds is assembled here: context templates, subject positions, targets.

Tokens are located by character offsets (fast tokenizers), so the subject's last token is
found the same way for every tokenizer family, with or without a context prefix.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from editing.records import EditRecordError, EditRequest

# MEMIT's start words for sampling context prefixes from the model itself.
CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")
ESSENCE_TEMPLATE = "{} is a"


@dataclass
class Encoded:
    """One tokenized sequence.

    ids: token ids of context + prompt (+ target tokens except the last, when a target is given).
    subject_last: index in `ids` of the subject's last token.
    subject_first: index in `ids` of the subject's first token (its tokens in context, which can
        differ from the subject tokenized alone: a leading space merges into the first token).
    target_ids: the target's tokens (empty without a target); token i is predicted by the
        logits at position `label_positions[i]`.
    """

    ids: list[int]
    subject_last: int
    target_ids: list[int]
    subject_first: int = 0

    @property
    def label_positions(self) -> list[int]:
        n_prompt = len(self.ids) - max(len(self.target_ids) - 1, 0)
        return [n_prompt - 1 + i for i in range(len(self.target_ids))]


def _field_offset(context: str) -> int:
    """Where `context`'s "{}" lands in `context.format(...)`: the literal text before it, with escaped
    braces ("{{", "}}") counted once."""
    n = 0
    for literal, field, _spec, _conv in string.Formatter().parse(context):
        n += len(literal)
        if field is not None:
            return n
    raise ValueError(f"context template {context!r} has no '{{}}' for the prompt")


def _subject_tokens(text: str, char_start: int, char_end: int, ids_offsets) -> tuple[int, int]:
    """(first, last) token index overlapping the characters [char_start, char_end) of `text`."""
    hit = [i for i, (s, e) in enumerate(ids_offsets) if e > s and s < char_end and e > char_start]
    if not hit:
        raise ValueError(f"subject span {char_start}:{char_end} of {text!r} covers no token")
    return hit[0], hit[-1]


def encode(tok, prompt: str, subject: str, target: str | None = None, context: str = "{}") -> Encoded:
    """Tokenize `context.format(prompt)` (+ " " + target) and locate the subject's last token.

    The subject's first occurrence in `prompt` is used. Raises ValueError when the subject
    is not in the prompt.
    """
    start_in_prompt = prompt.find(subject)
    if start_in_prompt < 0:
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    text = context.format(prompt)
    offset = _field_offset(context)
    char_start = offset + start_in_prompt
    enc = tok(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    first, last = _subject_tokens(text, char_start, char_start + len(subject), enc["offset_mapping"])
    if not target:
        return Encoded(ids, last, [], first)
    tgt = target_token_ids(tok, text, target)
    return Encoded(ids + tgt[:-1], last, tgt, first)


def target_token_ids(tok, prompt: str, target: str) -> list[int]:
    """Token ids of " " + target as a continuation of `prompt` (a target that already starts with a
    space keeps it as is, as in rome: no lone " " token).

    Tokenizes prompt and continuation jointly and splits, which is right for byte-level BPE
    and sentencepiece alike; falls back to separate tokenization if the prompt's tokens are
    not a prefix of the joint ones.
    """
    if target.startswith(" "):
        target = target[1:]
    base = tok(prompt)["input_ids"]
    joint = tok(prompt + " " + target)["input_ids"]
    if joint[: len(base)] == base and len(joint) > len(base):
        return list(joint[len(base):])
    return list(tok(" " + target, add_special_tokens=False)["input_ids"])


def check_request(tok, req: EditRequest, index: int, max_target_tokens: int) -> None:
    """Validate one request against a tokenizer (raises `EditRecordError` naming the field)."""
    where = req.where(index)  # the record's position in its file when it was read from one
    for name in ("subject", "prompt", "target_new"):
        val = getattr(req, name)
        if not isinstance(val, str):
            raise EditRecordError(field=name, reason=f"expected a string, got {type(val).__name__}", **where)
        if not val.strip():
            raise EditRecordError(field=name, reason="empty", **where)
    if req.subject not in req.prompt:
        raise EditRecordError(field="subject", reason=f"{req.subject!r} not found in prompt {req.prompt!r}", **where)
    n = len(target_token_ids(tok, req.prompt, req.target_new))
    if n > max_target_tokens:
        raise EditRecordError(field="target_new", reason=f"{n} tokens, more than the limit of {max_target_tokens}", **where)


@torch.no_grad()
def sample_context_templates(model, tok, n: int = 5, length: int = 10, seed: int = 0) -> list[str]:
    """["{}"] + n short prefixes sampled from the model itself, each ending in ". {}".

    Deterministic under `seed` (top-5 sampling with a seeded generator, as in ROME/MEMIT).
    Starts cycle through `CONTEXT_STARTS`.
    """
    if n <= 0:
        return ["{}"]
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    templates = ["{}"]
    for i in range(n):
        ids = tok(CONTEXT_STARTS[i % len(CONTEXT_STARTS)], return_tensors="pt")["input_ids"].to(device)
        n_start = ids.shape[1]
        for _ in range(length):
            logits = model(input_ids=ids, use_cache=False).logits[0, -1].float().cpu()
            top = logits.topk(5)
            probs = torch.softmax(top.values, -1)
            nxt = top.indices[torch.multinomial(probs, 1, generator=gen)]
            ids = torch.cat([ids, nxt.view(1, 1).to(device)], dim=1)
        text = tok.decode(ids[0, : n_start + length], skip_special_tokens=True)
        text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
        templates.append(text + ". {}")
    return templates


def pad_batch(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists. Returns input_ids [n, T] and attention_mask [n, T]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
