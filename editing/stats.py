"""Second-moment statistics of FFN keys: C0 = E[k k^T] at one layer over a text corpus.

Statistics stream as mergeable partial sums (sum of k k^T in float64 and a token count), so
shards computed by different workers combine exactly. Each batch's k^T k runs in the key's
dtype (fast GEMM) and is accumulated in float64.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from editing.adapters import ArchAdapter
from editing.keys import token_keys


@dataclass
class SecondMoment:
    """Partial sums of k k^T. `total` [d_key, d_key] float64, `count` tokens.

    `meta` records what was measured: model fingerprint, layer, corpus hash.
    """

    total: torch.Tensor
    count: int
    meta: dict

    @classmethod
    def empty(cls, d_key: int, meta: dict | None = None) -> "SecondMoment":
        return cls(torch.zeros(d_key, d_key, dtype=torch.float64), 0, dict(meta or {}))

    def merge(self, other: "SecondMoment") -> "SecondMoment":
        """Sum of two shards of the same (model, layer)."""
        for k in ("model_fingerprint", "layer"):
            if k in self.meta and k in other.meta and self.meta[k] != other.meta[k]:
                raise ValueError(f"cannot merge statistics with different {k}: {self.meta[k]} != {other.meta[k]}")
        meta = {**other.meta, **self.meta}
        return SecondMoment(self.total + other.total, self.count + other.count, meta)

    @property
    def mean(self) -> torch.Tensor:
        """C0 = E[k k^T], [d_key, d_key] float64."""
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        return self.total / self.count

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"total": self.total, "count": self.count, "meta": self.meta}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SecondMoment":
        d = torch.load(io.BytesIO(data), weights_only=True)
        return cls(d["total"], int(d["count"]), dict(d["meta"]))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "SecondMoment":
        return cls.from_bytes(Path(path).read_bytes())


def default_corpus_path() -> Path:
    """`wikitext2_test.raw` in the shared data folder (`$KVEDIT_DATA` or ../shared/data)."""
    from editing.data import data_dir

    return data_dir() / "wikitext2_test.raw"


def corpus_half(text: str, half: str) -> str:
    """"first" half for statistics, "second" half for perplexity checks (split at a line break)."""
    mid = text.find("\n", len(text) // 2)
    mid = len(text) // 2 if mid < 0 else mid
    if half == "first":
        return text[:mid]
    if half == "second":
        return text[mid:]
    raise ValueError(f"half must be 'first' or 'second', not {half!r}")


def corpus_chunks(tok, text: str, chunk_tokens: int = 256, max_tokens: int | None = None) -> list[list[int]]:
    """Split a corpus into token chunks of `chunk_tokens` (the last may be shorter)."""
    ids = tok(text)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [ids[i: i + chunk_tokens] for i in range(0, len(ids), chunk_tokens) if len(ids[i: i + chunk_tokens]) > 1]


def corpus_hash(chunks: list[list[int]]) -> str:
    h = hashlib.sha256(json.dumps(chunks).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def collect_second_moment(model, adapter: ArchAdapter, layer: int, chunks: list[list[int]], batch_size: int = 8,
                          meta: dict | None = None, progress=None) -> SecondMoment:
    """Accumulate sum k k^T over every real token of the chunks at `layer`.

    Args: chunks: token-id lists (a shard of the corpus). Returns a `SecondMoment` whose
    `total` is [d_key, d_key] float64. `progress(n_tokens)` is called after each batch.
    """
    from editing.prompts import pad_batch

    device = next(model.parameters()).device
    stats = SecondMoment.empty(adapter.d_key, meta)
    total = torch.zeros(adapter.d_key, adapter.d_key, dtype=torch.float64, device=device)
    pad = getattr(model.config, "pad_token_id", None) or 0
    for i in range(0, len(chunks), batch_size):
        ids, mask = pad_batch(chunks[i: i + batch_size], pad, device)
        k = token_keys(model, adapter, layer, ids, mask)  # [b, T, d_key]
        k = k[mask.bool()]  # [tokens, d_key]
        k = k.float()  # fp16 k.T @ k overflows (and bf16 loses digits) over a few thousand tokens
        total += (k.T @ k).double()
        stats.count += k.shape[0]
        if progress:
            progress(k.shape[0])
    stats.total = total.cpu()
    return stats
