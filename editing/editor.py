"""The Python API: compute edits for a model, build its memory, attach it, check the answers.

    from editing import Editor
    ed = Editor.load("smollm2-135m")
    edits = ed.compute(load_records("counterfact_valid.json", limit=10))
    ed.attach(edits.table)            # the model now answers with the new targets
    ed.memory.delete(edits.edit_ids)  # ... and now exactly as before
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path

import pyarrow as pa
import torch

from editing.adapters import get_adapter
from editing.keys import compute_keys, context_weights
from editing.metrics import greedy_generate, new_beats_true
from editing.models import cache_dir, fingerprint, load_model
from editing.prompts import check_request, sample_context_templates
from editing.records import EditRecordError, EditRequest, check_batch_conflicts
from editing.routed import RoutedFFN, attach, attached, detach
from editing.routers import make_router
from editing.stats import SecondMoment, collect_second_moment, corpus_chunks, corpus_half, corpus_hash, default_corpus_path
from editing.table import MemorySpec, build_edit_table, make_edit_id, table_tensors
from editing.values import ValueHparams, check_setting, optimise_residuals

logger = logging.getLogger(__name__)


@dataclass
class EditConfig:
    """Per-model editing settings (one JSON file per model under `editing/hparams/`)."""

    layer: int | None = None
    router: str = "cosine"
    threshold: float | None = None
    n_contexts: int = 5
    context_length: int = 10
    # Weight of the unprefixed prompt "{}" in the key average (the prefixes share the rest); None:
    # a plain mean over the 1 + n_contexts templates, as ROME. See editing/keys.py.
    unprefixed_weight: float | None = 0.5
    seed: int = 0
    max_target_tokens: int = 16
    batch_size: int = 32
    values: ValueHparams = field(default_factory=ValueHparams)
    stats_tokens: int = 100_000

    @classmethod
    def for_model(cls, name: str, **overrides) -> "EditConfig":
        """Defaults from `hparams/<name>.json` when it exists, then `overrides` (None values ignored;
        a `values` dict overrides single value-optimiser settings and keeps the file's others)."""
        data: dict = {}
        f = resources.files("editing") / "hparams" / f"{Path(name).name}.json"
        if f.is_file():
            data = json.loads(f.read_text())
        over = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(over.get("values"), dict) and isinstance(data.get("values"), dict):
            over["values"] = {**data["values"], **over["values"]}
        data.update(over)
        values = data.pop("values", {})
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown edit settings: {sorted(unknown)}")
        vh = values if isinstance(values, ValueHparams) else ValueHparams(**values)
        return cls(**data, values=vh)

    def __post_init__(self):
        w = self.unprefixed_weight
        if w is not None and not (isinstance(w, (int, float)) and 0.0 <= w <= 1.0):
            raise ValueError(f"edit setting unprefixed_weight must be null or in [0, 1], got {w!r}")
        # Types and bounds, so a job with a bad setting is refused at submission, not failed (or hung) on an actor.
        if self.layer is not None:
            check_setting("layer", self.layer, int, 0, None)
        if self.threshold is not None:
            check_setting("threshold", self.threshold, float, None, None)
        if not isinstance(self.router, str):
            raise ValueError(f"edit setting router must be a router name, got {self.router!r}")
        for name, low, high in (("n_contexts", 0, 256), ("context_length", 1, 2048), ("seed", None, None),
                                ("max_target_tokens", 1, 1024), ("batch_size", 1, 4096), ("stats_tokens", 2, None)):
            check_setting(name, getattr(self, name), int, low, high)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ComputedEdits:
    """Result of `Editor.compute`: the Arrow table plus per-edit optimiser diagnostics."""

    table: pa.Table
    edit_ids: list[str]
    keys: torch.Tensor  # [n, d_key]
    residuals: torch.Tensor  # [n, d_model]
    loss: list[float]
    nll: list[float]
    steps: list[int]
    seconds: float


class Editor:
    """A frozen model, its adapter, and the settings to edit one of its FFN layers."""

    def __init__(self, model, tok, config: EditConfig | None = None, model_name: str | None = None):
        self.model, self.tok = model, tok
        self.adapter = get_adapter(model)
        self.model_name = model_name or getattr(model, "kvedit_name", None) or model.config.model_type
        self.config = config or EditConfig.for_model(self.model_name)
        if self.config.layer is None:
            self.config.layer = max(1, round(0.27 * self.adapter.n_layers))
        self.adapter.check_layer(self.config.layer)
        self._templates: list[str] | None = None
        self._stats: SecondMoment | None = None

    @classmethod
    def load(cls, model: str, device: str = "cpu", **overrides) -> "Editor":
        m, tok = load_model(model, device=device)
        return cls(m, tok, EditConfig.for_model(model, **overrides), model_name=model)

    # ------------------------------------------------------------------ identity
    @property
    def layer(self) -> int:
        return self.config.layer

    @property
    def spec(self) -> MemorySpec:
        return MemorySpec(fingerprint(self.model), self.layer, self.adapter.d_key, self.adapter.d_model)

    @property
    def templates(self) -> list[str]:
        if self._templates is None:
            c = self.config
            self._templates = sample_context_templates(self.model, self.tok, c.n_contexts, c.context_length, c.seed)
        return self._templates

    def keys(self, requests: list[EditRequest], layer: int | None = None) -> torch.Tensor:
        """The requests' keys at `layer` (default: the edit layer): context-averaged with the
        configured weights (`editing.keys`). Returns [n, d_key] float32 on the model's device."""
        weights = context_weights(self.templates, self.config.unprefixed_weight)
        return compute_keys(self.model, self.tok, self.adapter, self.layer if layer is None else layer, requests,
                            self.templates, weights=weights)

    # ------------------------------------------------------------------ computing edits
    def validate(self, requests: list[EditRequest]) -> None:
        """Raise `EditRecordError` for the first bad record of the batch (nothing is computed)."""
        for i, r in enumerate(requests):
            if not isinstance(r, EditRequest):
                raise EditRecordError(i, "<record>", f"expected an EditRequest, got {type(r).__name__}")
            check_request(self.tok, r, i, self.config.max_target_tokens)
        check_batch_conflicts(requests)

    def compute(self, requests: list[EditRequest], edit_ids: list[str] | None = None, job_id: str | None = None,
                progress=None) -> ComputedEdits:
        """Keys and residuals of every request, in batches of `config.batch_size`.

        The whole list is validated first, so a bad record means nothing is computed.
        `progress(n_done)` is called after each batch.
        """
        self.validate(requests)
        t0 = time.perf_counter()
        spec = self.spec
        if edit_ids is None:
            edit_ids = [make_edit_id(spec.model_fingerprint, spec.layer, r.subject, r.prompt, r.target_new) for r in requests]
        keys, res, loss, nll, steps = [], [], [], [], []
        bs = self.config.batch_size
        for i in range(0, len(requests), bs):
            chunk = requests[i: i + bs]
            keys.append(self.keys(chunk))
            r = optimise_residuals(self.model, self.tok, self.adapter, self.layer, chunk, self.templates, self.config.values)
            res.append(r.residuals)
            loss += r.loss.tolist()
            nll += r.nll.tolist()
            steps += r.steps
            if progress:
                progress(len(chunk))
        K = torch.cat(keys) if keys else torch.zeros(0, self.adapter.d_key)
        R = torch.cat(res) if res else torch.zeros(0, self.adapter.d_model)
        table = build_edit_table(spec, requests, K, R, edit_ids=edit_ids, job_id=job_id)
        return ComputedEdits(table, edit_ids, K.cpu(), R.cpu(), loss, nll, steps, time.perf_counter() - t0)

    # ------------------------------------------------------------------ statistics
    def stats(self, corpus: str | Path | None = None, max_tokens: int | None = None) -> SecondMoment:
        """C0 at the edit layer over the first half of the corpus (cached on disk by fingerprint, layer, corpus)."""
        if self._stats is not None:
            return self._stats
        chunks = self.stats_chunks(corpus, max_tokens)
        meta = {"model_fingerprint": fingerprint(self.model), "layer": self.layer, "corpus_hash": corpus_hash(chunks)}
        path = cache_dir() / "stats" / f"{meta['model_fingerprint']}-L{self.layer}-{meta['corpus_hash']}.pt"
        if path.is_file():
            self._stats = SecondMoment.load(path)
        else:
            self._stats = collect_second_moment(self.model, self.adapter, self.layer, chunks, meta=meta)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._stats.save(path)
        return self._stats

    def stats_chunks(self, corpus: str | Path | None = None, max_tokens: int | None = None) -> list[list[int]]:
        text = Path(corpus or default_corpus_path()).read_text()
        return corpus_chunks(self.tok, corpus_half(text, "first"), max_tokens=max_tokens or self.config.stats_tokens)

    # ------------------------------------------------------------------ memory
    def new_memory(self, router: str | None = None, threshold: float | None = None, stats: SecondMoment | None = None,
                   **kwargs) -> RoutedFFN:
        """An empty routed memory for this model's edit layer (not attached)."""
        name = router or self.config.router
        if name == "whitened" and stats is None:
            stats = self.stats()
        r = make_router(name, stats=stats)
        thr = threshold if threshold is not None else (self.config.threshold if name == self.config.router else None)
        return RoutedFFN(r, self.adapter.d_key, self.adapter.d_model, threshold=thr, **kwargs)

    def attach(self, table: pa.Table | None = None, memory: RoutedFFN | None = None, spec: MemorySpec | None = None,
               **kwargs) -> RoutedFFN:
        """Attach a memory (new when omitted) to the edit layer, loading `table`'s rows into it.

        `spec` (the table's memory spec, when known) must match this model and layer.
        """
        if spec is not None:
            self.spec.check(spec, "memory")
        memory = memory or self.new_memory(**kwargs)
        if table is not None:
            ids, k, v = table_tensors(table, self.spec)
            memory.add(ids, k, v)
        return attach(self.model, self.adapter, self.layer, memory)

    def detach(self) -> None:
        detach(self.model, self.adapter, self.layer)

    @property
    def memory(self) -> RoutedFFN | None:
        return attached(self.adapter, self.layer)

    # ------------------------------------------------------------------ checks
    def efficacy(self, requests: list[EditRequest]) -> list[bool]:
        """Per request: is " target_new" now more likely than " target_true" after the prompt?"""
        return new_beats_true(self.model, self.tok, [r.prompt for r in requests],
                              [r.target_new for r in requests], [r.target_true for r in requests]).tolist()

    def generate(self, prompts: list[str], max_new_tokens: int = 20) -> list[str]:
        return greedy_generate(self.model, self.tok, prompts, max_new_tokens)
