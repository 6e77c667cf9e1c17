"""What every baseline shares: the registry, settings, and the weight swap of the in-place editors.

A baseline is used as a context manager around an `Editor` whose model stays the served base
model outside it:

    with make_baseline("rome", ed) as m:
        ids = m.edit(requests)          # sequential: later calls see the earlier edits
        ed.efficacy(requests)           # the Editor's model now carries the edits ...
    # ... and here it is bit-identical to before (the original weight tensors were never written)

In-place editors (`WeightEditor`) swap a cloned down-projection weight into each layer they edit
and write only the clone; leaving the block (or `disabled()`) puts the original `Parameter`
objects back. Statistics, context templates and the model fingerprint are taken on entry, from
the unedited model.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, fields, replace
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from editing.hooks import capture_input, run_until
from editing.prompts import encode, pad_batch
from editing.stats import SecondMoment
from editing.table import make_edit_id

BASELINES: dict[str, type["Baseline"]] = {}


def register_baseline(name: str):
    """Class decorator: make a baseline selectable by `name`."""

    def deco(cls):
        cls.name = name
        BASELINES[name] = cls
        return cls

    return deco


def baseline_names() -> list[str]:
    return sorted(BASELINES)


def make_baseline(name: str, ed, **overrides) -> "Baseline":
    """The baseline `name` for an Editor; `overrides` replace its per-model settings (None ignored)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(baseline_names())}")
    return BASELINES[name](ed, **overrides)


def load_settings(cls, model_name: str, method: str, overrides: dict):
    """A method's settings dataclass: its defaults, then the `baselines.<method>` section of
    `editing/hparams/<model>.json` when there is one, then `overrides` (None values ignored)."""
    data: dict = {}
    f = resources.files("editing") / "hparams" / f"{Path(model_name).name}.json"
    if f.is_file():
        data.update(json.loads(f.read_text()).get("baselines", {}).get(method, {}))
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = [x.name for x in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {method} settings: {unknown}; known: {known}")
    return cls(**data)


def baseline_identity(name: str, model_name: str) -> dict:
    """What determines a baseline's numbers besides the data: its code revision and resolved settings
    (defaults + the model's hparams section). Campaign cell ids include it, so results of an older
    revision or other defaults are stale, not reused."""
    cls = BASELINES[name]
    return {"revision": cls.revision, "settings": asdict(load_settings(cls.settings_class, model_name, name, {}))}


class EditMethod:
    """A way of editing an Editor's model: the memory (`editing.evaluate.MemoryMethod`) or a baseline.

    `model` and `tok` are the Editor's, so a method can stand in for the Editor in the
    evaluation metrics (`editing.evaluate`).
    """

    in_place = False  # True: edits weights; False: leaves the model's weights alone
    can_delete = False  # single edits can be withdrawn exactly

    def __init__(self, ed):
        self.ed = ed

    @property
    def model(self):
        return self.ed.model

    @property
    def tok(self):
        return self.ed.tok


class Baseline(EditMethod):
    """A method kvedit is compared with. Subclasses set `settings_class` and implement `_edit`.

    `in_context(prompts)` gives the prompts the model really sees.
    """

    name = "base"
    settings_class: type = object
    revision = 1  # raised when a change of the method's code changes its numbers (`baseline_identity`)

    def __init__(self, ed, **overrides):
        super().__init__(ed)
        self.hp = load_settings(self.settings_class, ed.model_name, self.name, overrides)
        self.edit_ids: list[str] = []
        self.active = False
        self._memory = None

    @property
    def layers(self) -> list[int]:
        """The layers whose weights the method edits (none for prompt-side methods)."""
        return []

    def describe(self) -> dict:
        """Name, layers and settings, for reports."""
        return {"method": self.name, "layers": self.layers, "settings": asdict(self.hp)}

    def in_context(self, prompts: list[str]) -> list[str]:
        return list(prompts)

    def __enter__(self) -> "Baseline":
        if self.active:
            raise RuntimeError(f"{self.name}: already active")
        self._memory = self.ed.memory  # a baseline edits the bare model; an attached memory comes back on exit
        self.ed.detach()
        self.ed.spec  # noqa: B018 - the fingerprint is cached on the model: take it from the unedited weights
        self.ed.templates  # noqa: B018 - context templates are sampled from the unedited model
        self._start()
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._stop()
        finally:
            self.active = False
            if self._memory is not None:
                self.ed.attach(memory=self._memory)
                self._memory = None

    def edit(self, requests) -> list[str]:
        """Write a batch of edits, computed on the model with the earlier batches applied.

        The whole batch is validated first (`EditRecordError` names the record and field);
        nothing is written for a bad batch. Returns the edit ids (as the memory would name them).
        """
        if not self.active:
            raise RuntimeError(f"{self.name}: use the baseline as a context manager before editing")
        self.ed.validate(requests)
        spec = self.ed.spec
        ids = [make_edit_id(spec.model_fingerprint, spec.layer, r.subject, r.prompt, r.target_new) for r in requests]
        with self._all_or_nothing():
            self._edit(requests, ids)
        self.edit_ids += ids
        return ids

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """A batch that fails part-way leaves the method as it was before the batch (see `WeightEditor`)."""
        yield

    def delete(self, edit_ids) -> int:
        """Withdraw single edits. Only methods with `can_delete` (scr) do; the in-place editors cannot
        (subtracting an update is not exact, and later updates were computed on top of it)."""
        raise NotImplementedError(f"{self.name} cannot withdraw single edits")

    @contextlib.contextmanager
    def disabled(self):
        """Inside: the unedited model's behaviour. Each method defines it (`WeightEditor` swaps the original
        weights in, `Scr` stops retrieving); a method without it is a programming error."""
        raise NotImplementedError(f"{type(self).__name__} does not define disabled()")

    def _start(self) -> None:
        """Hook run on entering the context (before any edit); no set-up is needed by default."""

    def _stop(self) -> None:
        """Hook run on leaving the context; nothing to release by default."""

    def _edit(self, requests, edit_ids: list[str]) -> None:
        """Write one validated batch: each method defines it (rome, memit, alphaedit, scr)."""
        raise NotImplementedError(f"{type(self).__name__} does not define _edit()")


class WeightEditor(Baseline):
    """An in-place editor: writes ΔW into cloned down-projection weights of `layers`.

    Settings classes of subclasses have `stats_tokens` (size of the C0 sample, None for the
    Editor's `stats_tokens`). `self.c0[layer]` is C0 = E[k k^T] [d_key, d_key] float64.
    """

    in_place = True

    def __init__(self, ed, **overrides):
        super().__init__(ed, **overrides)
        for layer in self.layers:
            ed.adapter.check_layer(layer)
        self.c0: dict[int, torch.Tensor] = {}
        self._base: dict[int, nn.Parameter] = {}
        self._edited: dict[int, nn.Parameter] = {}

    def _start(self) -> None:
        device = next(self.ed.model.parameters()).device
        self.c0 = {layer: layer_stats(self.ed, layer, self.hp.stats_tokens).mean.to(device) for layer in self.layers}
        self._prepare()
        for layer in self.layers:
            down = self._down(layer)
            self._base[layer] = down.weight
            self._edited[layer] = nn.Parameter(down.weight.detach().clone(), requires_grad=False)
        self._swap(self._edited)

    def _stop(self) -> None:
        self._swap(self._base)
        self._base, self._edited = {}, {}

    def _prepare(self) -> None:
        """Per-method set-up from `self.c0`, before any weight is swapped."""

    def _batch_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides the edited weights that a batch changes in place (AlphaEdit's accumulated keys)."""
        return {}

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """A batch that fails at its third layer (a non-finite update, out of memory) must not leave its
        first two written: the edited copies (and `_batch_state`) are put back as they were."""
        saved = {layer: p.detach().clone() for layer, p in self._edited.items()}
        state = {k: t.clone() for k, t in self._batch_state().items()}
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for layer, w in saved.items():
                    self._edited[layer].copy_(w)
                for k, t in self._batch_state().items():
                    t.copy_(state[k])
            raise

    def _down(self, layer: int) -> nn.Module:
        down = self.ed.adapter.down_proj(layer)
        return getattr(down, "base", down)

    def _swap(self, params: dict[int, nn.Parameter]) -> None:
        for layer, p in params.items():
            self._down(layer).weight = p

    @contextlib.contextmanager
    def disabled(self):
        self._swap(self._base)
        try:
            yield
        finally:
            self._swap(self._edited)

    def weight(self, layer: int) -> torch.Tensor:
        """The edited copy of `layer`'s down-projection as W [d_model, d_key] (a view: write in place)."""
        return self.ed.adapter.down_weight(layer)

    @torch.no_grad()
    def add_delta(self, layer: int, delta: torch.Tensor) -> None:
        """W += delta [d_model, d_key] (any float dtype) on the edited copy only."""
        if not self.active or self._down(layer).weight is not self._edited[layer]:
            raise RuntimeError(f"{self.name}: layer {layer} is not holding the edited copy")
        if not torch.isfinite(delta).all():
            raise FloatingPointError(f"{self.name}: the update of layer {layer} is not finite")
        w = self.weight(layer)
        w += delta.to(w.dtype)


def layer_stats(ed, layer: int, max_tokens: int | None = None) -> SecondMoment:
    """C0 statistics at any layer of the Editor's model, computed and cached on disk by `Editor.stats`.

    Read through a view of the same model (never `ed` itself, whose in-memory statistics feed the
    whitened router and must not be replaced by a sample of another size).
    """
    from editing.editor import Editor

    view = Editor(ed.model, ed.tok, replace(ed.config, layer=layer), model_name=ed.model_name)
    return view.stats(max_tokens=max_tokens)


@torch.no_grad()
def subject_outputs(model, tok, adapter, layer: int, requests) -> torch.Tensor:
    """The residual stream after `layer` at each request's subject-last token, bare prompt.

    Returns [n, d_model] float32 (MEMIT's z at the last edited layer).
    """
    device = next(model.parameters()).device
    encoded = [encode(tok, r.prompt, r.subject) for r in requests]
    ids, mask = pad_batch([e.ids for e in encoded], tok.pad_token_id, device)
    after = adapter.layers[layer + 1] if layer + 1 < adapter.n_layers else adapter.final_norm
    with capture_input(after, stop=True) as seen:
        run_until(model, input_ids=ids, attention_mask=mask)
    pos = torch.tensor([e.subject_last for e in encoded], device=device)
    return seen[0][torch.arange(len(encoded), device=device), pos].float()
