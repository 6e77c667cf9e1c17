"""Evaluation campaigns: a YAML grid of `kvedit eval` runs, run on Ray actors, results kept in the store.

    name: smoke
    model: smollm2-135m
    datasets: [counterfact_valid.json]      # shared data names, paths, or "synthetic"
    grid:
      method: [cosine, margin]              # routers, or baseline methods of run_sequential
      threshold: [null, 0.8]                # null = the router default; or {method: [..]}
      layer: [null]                         # null = the model's default edit layer
      T: [10]                               # number of edits (synthetic: number of facts)
      batch: [10]                           # edits per batch (1 = strictly sequential)
    seed: 0
    options: {fluency_prompts: 2, perplexity_chars: 4000}

A cell is one point of the grid. Its id is a hash of everything that determines its numbers,
so a re-run finds the cells already finished. Each finished cell is one Parquet file
`<store>/campaigns/<name>/results/<cell_id>.parquet` (written to a temporary name, then
renamed), so `pandas.read_parquet(results_dir)` reads the table at any moment.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
TOP_FIELDS = {"name", "model", "dataset", "datasets", "grid", "seed", "options", "description"}
GRID_FIELDS = {"method", "threshold", "layer", "T", "batch"}

# Campaign options: name -> (type, default). Every cell gets all of them (they enter the cell id).
OPTIONS: dict[str, tuple[type | tuple, Any]] = {
    "offset": (int, 0),                 # first record of the dataset
    "fluency_prompts": (int, 20),       # prompts generated for the fluency score
    "eval_prompts": (int, 0),           # at most this many paraphrase/neighbourhood/subject prompts per record (0: all)
    "perplexity_chars": (int, 40_000),  # held-out WikiText characters for perplexity (0: skip); scored up to
                                        # `editing.evaluate.perplexity`'s 4,096 tokens (about 17K characters)
    "long_context": (bool, True),       # measure the long-context robustness
    "edit_config": (dict, {}),          # EditConfig overrides, e.g. {"values": {"steps": 10}}
    "value_sample": (int, 32),          # synthetic cells: facts computed with real residuals
    "wikitext_tokens": (int, 20_000),   # synthetic cells: held-out tokens for the false-gate rate
    "calibration": (dict, {}),          # "+cal" cells: CalibrationConfig overrides, e.g. {"target_rate": 1e-3}
}

# The numbers a cell can report (float columns of the results table; missing ones stay null).
METRICS = (
    "efficacy", "generalization", "specificity", "pre_specificity", "locality", "fluency", "pre_fluency",
    "perplexity_delta", "subject_rephrase", "subject_rephrase_in_domain", "subject_rephrase_out_of_domain",
    "shuffled_subject", "long_context", "withdrawal_reverted",
    "withdrawal_retained", "withdrawal_reverted_unshared", "withdrawal_shared_subject", "withdrawal_reverted_top1",
    "routing_capacity", "routing_top1", "false_gate_rate", "sample_efficacy", "seconds",
)

RESULT_SCHEMA = pa.schema(
    [pa.field("cell_id", pa.string(), nullable=False), pa.field("campaign", pa.string()),
     pa.field("model", pa.string()), pa.field("dataset", pa.string()), pa.field("method", pa.string()),
     pa.field("threshold", pa.float64()), pa.field("layer", pa.int64()), pa.field("T", pa.int64()),
     pa.field("batch", pa.int64()), pa.field("seed", pa.int64()), pa.field("options", pa.string()),
     pa.field("status", pa.string()), pa.field("error", pa.string()),
     pa.field("threshold_used", pa.float64()), pa.field("layer_used", pa.int64()), pa.field("n_edits", pa.int64())]
    + [pa.field(m, pa.float64()) for m in METRICS]
    + [pa.field("result", pa.string()), pa.field("worker", pa.string()),
       pa.field("finished_at", pa.timestamp("us", tz="UTC"))]
)


# How cells score prompts; bump it when a metric's definition changes (2: per-edit averages as in
# rome's summarize.py, the data set's metric for shuffled subject and long context; 2026-12-07).
SCORING = 2

ROBUST_SUFFIX = "+rep"
CALIBRATED_SUFFIX = "+cal"


def method_variant(method: str) -> tuple[str, bool, bool]:
    """A campaign method name -> (method, robust keys, calibrated gate).

    "cosine+rep" is the cosine memory with a REP robust-key adapter trained on its edits
    (`run_sequential(robust_keys=True)`); "cosine+cal" re-chooses its gate threshold after every
    batch (`run_sequential(calibration=...)`, as a store memory does: `calibration_config`); the
    suffixes combine ("cosine+rep+cal"). Only the memory's routers take them.
    """
    from editing.evaluate import known_methods
    from editing.routers import ROUTERS

    base, *suffixes = method.split("+")
    bad = [s for s in suffixes if "+" + s not in (ROBUST_SUFFIX, CALIBRATED_SUFFIX)]
    if base not in known_methods() or bad or len(set(suffixes)) != len(suffixes):
        raise ValueError(f"unknown method {method!r}; known: {', '.join(known_methods())}, and a router with "
                         f"{ROBUST_SUFFIX} and/or {CALIBRATED_SUFFIX}")
    if suffixes and base not in ROUTERS:
        raise ValueError(f"method {method!r}: the suffixes {ROBUST_SUFFIX} and {CALIBRATED_SUFFIX} are for the "
                         f"memory's routers ({', '.join(sorted(ROUTERS))}), not for {base!r}")
    return base, "rep" in suffixes, "cal" in suffixes


def calibration_config(options: dict | None = None) -> dict:
    """The calibrated gate of "+cal" cells and of `kvedit eval --calibrate`: what a new store memory gets
    (`cluster.commit.DEFAULT_CALIBRATION`: the false-gate-rate bound), with the campaign's
    `options.calibration` overrides (`editing.calibrate.CalibrationConfig` fields)."""
    from cluster.commit import DEFAULT_CALIBRATION

    return {**DEFAULT_CALIBRATION, **((options or {}).get("calibration") or {})}


# Defaults a cell's numbers depend on that its grid point does not name: the router's threshold when the grid
# leaves it None, and REP's training settings in "+rep" cells. As they were when cell ids began to include them
# (2026-12-07): a default enters the id only once it differs from this, so the results recorded before stay valid
# until a default changes, and then become stale instead of being reused.
_ID_THRESHOLDS = {"cosine": 0.65, "whitened": 0.6, "margin": 0.6}
_ID_REP = {"rank": None, "steps": 300, "lr": 0.003, "margin": 0.1, "temperature": 0.05, "long_context_tokens": 256,
           "negatives": 4096, "own_prompts": True, "batch": 4096, "negative_batch": 16384, "train_rephrases": 5}


def _changed_defaults(method: str, threshold: float | None) -> dict:
    """The id entries for defaults of `method` that differ from `_ID_THRESHOLDS` / `_ID_REP` (usually none)."""
    from editing.evaluate import TRAIN_REPHRASES
    from editing.rep import RobustKeyHparams
    from editing.routers import ROUTERS

    base, *suffixes = method.split("+")  # not validated here: an unknown method's cell records its error
    robust = ROBUST_SUFFIX[1:] in suffixes
    out = {}
    if base in ROUTERS and threshold is None:
        default = ROUTERS[base].default_threshold
        if default != _ID_THRESHOLDS.get(base):
            out["default_threshold"] = default
    if robust:
        rep = {**asdict(RobustKeyHparams()), "train_rephrases": TRAIN_REPHRASES}
        changed = {k: v for k, v in rep.items() if k not in _ID_REP or _ID_REP[k] != v}
        if changed:
            out["rep"] = changed
    return out


@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """A `yaml.SafeLoader` that reads "1e-3" (an exponent without a dot) as the float YAML 1.2 makes of it, not
    the string of YAML 1.1 (a rate written `target_rate: 1e-3` was refused as "expected a number")."""
    import re

    import yaml

    loader = type("CampaignLoader", (yaml.SafeLoader,), {})
    loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return loader


def _yaml_load(text: str):
    """`yaml.safe_load` with `_yaml_loader`'s exponent floats."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


class CampaignSpecError(ValueError):
    """A bad campaign file. Names the file and the offending field."""

    def __init__(self, field: str, reason: str, source: str | None = None):
        self.field, self.reason, self.source = field, reason, source
        super().__init__(f"{source + ': ' if source else ''}field {field!r}: {reason}")


@dataclass(frozen=True)
class Cell:
    """One point of a campaign grid. `threshold`/`layer` None = the router's / model's default."""

    campaign: str
    model: str
    dataset: str
    method: str
    threshold: float | None
    layer: int | None
    T: int
    batch: int
    seed: int
    options: dict = field(default_factory=dict, hash=False)

    @property
    def cell_id(self) -> str:
        """Deterministic id from everything that determines the cell's numbers (not the campaign name),
        including the model's resolved edit settings, so a change of the shipped defaults
        (`editing/hparams/`, `EditConfig`) makes earlier results of the grid point stale, not reused."""
        from editing import EditConfig

        key = {k: v for k, v in asdict(self).items() if k != "campaign"}
        # The calibration enters the id resolved, and only for calibrated cells (others do not use it).
        key["options"] = {k: v for k, v in self.options.items() if k != "calibration"}
        from editing.baselines.base import BASELINES, baseline_identity

        if self.method in BASELINES:  # a baseline's code revision and resolved settings
            key["baseline"] = baseline_identity(self.method, self.model)
        if "cal" in self.method.split("+")[1:]:  # calibrated; float fields as floats: placement 0 and 0.0 are one cell
            ints = _calibration_ints()
            key["calibration"] = {k: v if v is None or k in ints else float(v)
                                  for k, v in calibration_config(self.options).items()}
        overrides = {**self.options.get("edit_config", {}), "layer": self.layer, "seed": self.seed}
        key["edit_settings"] = EditConfig.for_model(self.model, **overrides).to_dict()
        key.update(_changed_defaults(self.method, self.threshold))
        from editing.evaluate import NLL, success_metric

        metric = success_metric(self.dataset)  # zsRE scores by token accuracy since 2026-12-03
        if metric != NLL:
            key["metric"] = metric
        key["scoring"] = SCORING  # results scored another way are stale, not reused
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.method}-T{self.T}-{digest}"

    def to_dict(self) -> dict:
        return {**asdict(self), "cell_id": self.cell_id}


@dataclass
class CampaignSpec:
    name: str
    model: str
    datasets: list[str]
    methods: list[str]
    thresholds: dict[str, list[float | None]]  # per method
    layers: list[int | None]
    T: list[int]
    batches: list[int]
    seed: int = 0
    options: dict = field(default_factory=dict)
    description: str = ""

    def cells(self) -> list[Cell]:
        """Every grid point, in a stable order; batch is capped at T and duplicates dropped."""
        out, seen = [], set()
        for ds, m, layer, t, b in itertools.product(self.datasets, self.methods, self.layers, self.T, self.batches):
            for thr in self.thresholds[m]:
                cell = Cell(self.name, self.model, ds, m, thr, layer, t, min(b, t), self.seed, dict(self.options))
                if cell.cell_id not in seen:
                    seen.add(cell.cell_id)
                    out.append(cell)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


# The cell fields `--only` may select on, as written in a campaign's grid.
SELECTABLE = ("dataset", "method", "threshold", "layer", "T", "batch")


def select_cells(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """The cells matching every `FIELD=VALUE` of `only` (`kvedit campaign run --only`), in grid order.

    VALUE is read as YAML, as in the campaign file (`T=400`, `threshold=0.5`, `threshold=null`,
    `method=cosine+rep`); a field given twice matches either value. A selected cell keeps its id, so
    its result lands in the same table as a run of the whole grid. An unknown field, a malformed
    term or a selection that matches no cell is a `CampaignSpecError` naming the `--only` term.
    """
    if not only:
        return list(cells)
    wanted: dict[str, list] = {}
    for term in only:
        name, sep, raw = term.partition("=")
        name = name.strip()
        if not sep or not raw.strip():
            raise CampaignSpecError(f"--only {term}", "expected FIELD=VALUE")
        if name not in SELECTABLE:
            raise CampaignSpecError(f"--only {term}", f"unknown field {name!r}; known: {', '.join(SELECTABLE)}")
        import yaml

        try:
            value = _yaml_load(raw)
        except yaml.YAMLError as exc:
            raise CampaignSpecError(f"--only {term}", f"not a YAML value: {exc}") from exc
        wanted.setdefault(name, []).append(value)
    out = [c for c in cells if all(_cell_matches(c, k, vs) for k, vs in wanted.items())]
    if not out:
        raise CampaignSpecError("--only " + " ".join(only), f"matches none of the {len(cells)} cells of the grid")
    return out


def _cell_matches(cell: Cell, name: str, wanted: list) -> bool:
    if name == "batch":  # as written in the grid: a cell's batch is capped at its T
        return any(_is_int(w) and cell.batch == min(w, cell.T) for w in wanted)
    return _matches(getattr(cell, name), wanted)


def _matches(value, wanted: list) -> bool:
    return any(value is None and w is None or value is not None and w is not None and value == w for w in wanted)


# ------------------------------------------------------------------------------------------ parsing


def _list(value, field: str, source, item_ok: Callable[[Any], bool], what: str, allow_empty=False) -> list:
    items = value if isinstance(value, list) else [value]
    if not items and not allow_empty:
        raise CampaignSpecError(field, "must not be empty", source)
    for i, v in enumerate(items):
        if not item_ok(v):
            raise CampaignSpecError(f"{field}[{i}]" if isinstance(value, list) else field,
                                    f"expected {what}, got {v!r}", source)
    if len(set(map(json.dumps, items))) != len(items):
        raise CampaignSpecError(field, f"duplicate values in {items!r}", source)
    return items


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_threshold(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _str_ok(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _options(raw, source) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise CampaignSpecError("options", f"expected a mapping, got {type(raw).__name__}", source)
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise CampaignSpecError(f"options.{unknown[0]}", f"unknown option; known: {', '.join(sorted(OPTIONS))}", source)
    out = {}
    for name, (typ, default) in OPTIONS.items():
        v = raw.get(name, default)
        ok = isinstance(v, typ) and (typ is bool or not isinstance(v, bool))
        if not ok:
            raise CampaignSpecError(f"options.{name}", f"expected {typ.__name__}, got {v!r}", source)
        if typ is int and v < 0:
            raise CampaignSpecError(f"options.{name}", f"must be >= 0, got {v}", source)
        out[name] = v
    return out


def parse_campaign(data: Any, source: str | None = None) -> CampaignSpec:
    """Validate a parsed YAML document into a `CampaignSpec` (raises `CampaignSpecError` naming the field)."""
    from store.lancefs import NAME_RE

    if not isinstance(data, dict):
        raise CampaignSpecError("<document>", f"expected a mapping at the top level, got {type(data).__name__}", source)
    unknown = sorted(set(data) - TOP_FIELDS)
    if unknown:
        raise CampaignSpecError(unknown[0], f"unknown field; known: {', '.join(sorted(TOP_FIELDS))}", source)
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CampaignSpecError("name", f"expected a name of letters, digits, '.', '_' or '-', got {name!r}", source)
    model = data.get("model", "smollm2-135m")
    if not _str_ok(model):
        raise CampaignSpecError("model", f"expected a model name or folder, got {model!r}", source)
    if "dataset" in data and "datasets" in data:
        raise CampaignSpecError("dataset", "give either 'dataset' or 'datasets', not both", source)
    key = "datasets" if "datasets" in data else "dataset"
    if key not in data:
        raise CampaignSpecError("datasets", "missing", source)
    datasets = _list(data[key], key, source, _str_ok, "a data file name or 'synthetic'")
    grid = data.get("grid")
    if not isinstance(grid, dict):
        raise CampaignSpecError("grid", "missing or not a mapping", source)
    unknown = sorted(set(grid) - GRID_FIELDS)
    if unknown:
        raise CampaignSpecError(f"grid.{unknown[0]}", f"unknown grid axis; known: {', '.join(sorted(GRID_FIELDS))}", source)
    for required in ("method", "T"):
        if required not in grid:
            raise CampaignSpecError(f"grid.{required}", "missing", source)
    methods = _list(grid["method"], "grid.method", source, _str_ok, "a method name")
    thr_raw = grid.get("threshold", [None])
    if isinstance(thr_raw, dict):
        unknown = sorted(set(thr_raw) - set(methods))
        if unknown:
            raise CampaignSpecError(f"grid.threshold.{unknown[0]}", "not a method of grid.method", source)
        thresholds = {m: _list(thr_raw.get(m, [None]), f"grid.threshold.{m}", source, _is_threshold, "a number or null")
                      for m in methods}
    else:
        common = _list(thr_raw, "grid.threshold", source, _is_threshold, "a number or null")
        thresholds = {m: common for m in methods}
    thresholds = {m: [None if v is None else float(v) for v in vs] for m, vs in thresholds.items()}
    for i, m in enumerate(methods):
        try:
            calibrated = method_variant(m)[2]
        except ValueError as exc:
            raise CampaignSpecError(f"grid.method[{i}]", str(exc), source) from exc
        if calibrated and any(v is not None for v in thresholds[m]):
            raise CampaignSpecError(f"grid.threshold.{m}", "a calibrated method chooses its own threshold: give null",
                                    source)
        from editing.routers import ROUTERS

        base = method_variant(m)[0]
        if base not in ROUTERS and base != "scr" and any(v is not None for v in thresholds[m]):
            raise CampaignSpecError(f"grid.threshold.{m}", f"{m} edits weights and has no threshold: give null "
                                    "(a mapping `threshold: {method: [...]}` gives routers theirs)", source)
        for v in thresholds[m]:
            if v is not None and base in ROUTERS:
                try:
                    ROUTERS[base].check_threshold(v)
                except ValueError as exc:
                    raise CampaignSpecError(f"grid.threshold.{m}", str(exc), source) from exc
    if SYNTHETIC in datasets:  # the scale protocol measures a router's memory: no baselines, no +rep / +cal
        from editing.routers import ROUTERS

        for i, m in enumerate(methods):
            if m not in ROUTERS:
                raise CampaignSpecError(f"grid.method[{i}]", f"{m!r} cannot run on the {SYNTHETIC!r} dataset: its scale "
                                        f"cells take a plain router ({', '.join(sorted(ROUTERS))})", source)
    layers = _list(grid.get("layer", [None]), "grid.layer", source, lambda v: v is None or (_is_int(v) and v >= 0),
                   "a layer index >= 0 or null")
    ts = _list(grid["T"], "grid.T", source, lambda v: _is_int(v) and v >= 1, "a number of edits >= 1")
    batches = _list(grid.get("batch", [32]), "grid.batch", source, lambda v: _is_int(v) and v >= 1, "a batch size >= 1")
    seed = data.get("seed", 0)
    if not _is_int(seed):
        raise CampaignSpecError("seed", f"expected an integer, got {seed!r}", source)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise CampaignSpecError("description", "expected a string", source)
    options = _options(data.get("options"), source)
    _check_edit_config(model, options["edit_config"], source)
    _check_calibration(options, source)
    return CampaignSpec(name, model, datasets, methods, thresholds, layers, ts, batches, seed, options, description)


def _check_edit_config(model: str, overrides: dict, source) -> None:
    from editing import EditConfig

    for key, by in (("layer", "the grid's layer axis"), ("seed", "the campaign's seed")):
        if key in overrides:
            raise CampaignSpecError(f"options.edit_config.{key}", f"set by {by}, not here", source)
    try:
        EditConfig.for_model(model, **overrides)
    except (TypeError, ValueError) as exc:
        raise CampaignSpecError("options.edit_config", str(exc), source) from exc


def _calibration_ints() -> set[str]:
    """The integer fields of `CalibrationConfig` (the others are floats)."""
    import typing

    from editing.calibrate import CalibrationConfig

    return {k for k, t in typing.get_type_hints(CalibrationConfig).items() if int in (t, *typing.get_args(t))}


def _check_calibration(options: dict, source) -> None:
    from editing.calibrate import CalibrationConfig

    cfg, ints = calibration_config(options), _calibration_ints()
    for k, v in cfg.items():
        ok = v is None or (not isinstance(v, bool) and isinstance(v, int if k in ints else (int, float)))
        if not ok:
            raise CampaignSpecError(f"options.calibration.{k}", f"expected {'an integer' if k in ints else 'a number'}"
                                    f", got {v!r}", source)
    try:
        CalibrationConfig(**cfg)
    except (TypeError, ValueError) as exc:
        raise CampaignSpecError("options.calibration", str(exc), source) from exc


def load_campaign(path: str | os.PathLike) -> CampaignSpec:
    """Read and validate a campaign YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CampaignSpecError("<file>", "no such file", str(path))
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CampaignSpecError("<file>", f"not UTF-8 text (a binary file?): {exc}", str(path)) from exc
    except yaml.YAMLError as exc:
        raise CampaignSpecError("<file>", f"invalid YAML: {exc}", str(path)) from exc
    return parse_campaign(data, str(path))


def check_datasets(spec: CampaignSpec) -> None:
    """Every dataset exists (shared data name or path), before anything runs."""
    from editing.data import data_file

    for i, ds in enumerate(spec.datasets):
        if ds == SYNTHETIC:
            continue
        try:
            path = data_file(ds)
        except FileNotFoundError as exc:
            raise CampaignSpecError(f"datasets[{i}]", str(exc), spec.name) from exc
        if not Path(path).is_file():
            raise CampaignSpecError(f"datasets[{i}]", f"{path} is not a file", spec.name)


def check_model(spec: CampaignSpec) -> None:
    """The model is a known name or a local Hugging Face folder, checked on the driver (as the datasets are)
    before any cell loads it."""
    from editing.models import KNOWN_MODELS

    if spec.model not in KNOWN_MODELS and not (Path(spec.model).expanduser() / "config.json").is_file():
        raise CampaignSpecError("model", f"{spec.model!r} is neither a known model name ({', '.join(KNOWN_MODELS)}) "
                                "nor a local Hugging Face model folder with a config.json", spec.name)


# ------------------------------------------------------------------------------------------ results


class CampaignResults:
    """The results table of one campaign: one Parquet file per finished cell under `<store>/campaigns/<name>/`."""

    def __init__(self, name: str, store: str | None = None):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        from store.lancefs import normalize_root

        root, _local = normalize_root(store)
        self.name = name
        self.dir = f"{root}/campaigns/{name}"
        self.results_dir = f"{self.dir}/results"
        self.fs, self._fs_dir = fsspec.core.url_to_fs(self.results_dir)
        self.local = isinstance(self.fs, LocalFileSystem)

    def cell_path(self, cell_id: str) -> str:
        return f"{self.results_dir}/{cell_id}.parquet"

    def write_spec(self, spec: CampaignSpec) -> None:
        """Keep the spec as last run next to the results (`campaign.json`), written atomically."""
        path = self.fs._strip_protocol(f"{self.dir}/campaign.json")
        data = json.dumps(spec.to_dict(), indent=1).encode()
        self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        if self.local:
            tmp = Path(path).with_name(f".campaign.json.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        else:  # object stores make a single PUT visible atomically
            self.fs.pipe_file(path, data)

    def spec(self) -> dict | None:
        """The campaign spec as last run (a dict), or None."""
        path = self.fs._strip_protocol(f"{self.dir}/campaign.json")
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def write_cell(self, cell: Cell, result: dict | None = None, error: str | None = None, worker: str = "") -> dict:
        """Record a finished cell (its metrics, or its error) as one atomically written Parquet file."""
        from store.files import write_table_file

        if error and self.finished().get(cell.cell_id) == "ok":  # another run of the campaign finished it
            log.warning("campaign %s: cell %s failed here but another run recorded it ok; keeping that: %s",
                        self.name, cell.cell_id, error)
            return {**cell.to_dict(), "status": "ok", "error": None}
        result = dict(result or {})
        row = {**cell.to_dict(), "options": json.dumps(cell.options, sort_keys=True),
               "status": "error" if error else "ok", "error": error,
               "threshold_used": result.get("threshold"), "layer_used": result.get("layer"),
               "n_edits": result.get("n_edits", result.get("n_facts")),
               **{m: _float(result.get(m)) for m in METRICS},
               "result": json.dumps(result, default=str), "worker": worker,
               "finished_at": datetime.now(timezone.utc)}
        table = pa.Table.from_pylist([{f.name: row.get(f.name) for f in RESULT_SCHEMA}], schema=RESULT_SCHEMA)
        write_table_file(table, self.cell_path(cell.cell_id))
        return row

    def finished(self) -> dict[str, str]:
        """{cell_id: status} of every recorded cell."""
        table = self.table(columns=["cell_id", "status"])
        return dict(zip(table.column("cell_id").to_pylist(), table.column("status").to_pylist()))

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """All recorded cells as one Arrow table (empty, with the schema, when none)."""
        p = self._fs_dir
        if not self.fs.exists(p):
            return RESULT_SCHEMA.empty_table().select(columns or RESULT_SCHEMA.names)
        files = sorted(f for f in self.fs.ls(p, detail=False) if f.endswith(".parquet") and not Path(f).name.startswith("."))
        tables = []
        for f in files:
            with self.fs.open(f, "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns, schema=RESULT_SCHEMA))
        if not tables:
            return RESULT_SCHEMA.empty_table().select(columns or RESULT_SCHEMA.names)
        return pa.concat_tables(tables)

    def frame(self):
        """The results as a pandas DataFrame."""
        return self.table().to_pandas()


def _float(v) -> float | None:
    return None if v is None else float(v)


# ------------------------------------------------------------------------------------------ running


@dataclass
class CampaignRun:
    """What `run_campaign` did."""

    name: str
    results_dir: str
    cells: int
    skipped: int
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_campaign(spec: CampaignSpec, store: str | None = None, ray_address: str | None = None, workers: int = 1,
                 threads: int | None = None, retry_failed: bool = True, only: list[str] | None = None,
                 on_start: Callable[[int, int], None] | None = None,
                 on_cell: Callable[[Cell, dict], None] | None = None) -> CampaignRun:
    """Run every cell not yet finished on `workers` Ray actors, recording each as soon as it finishes.

    Cells already recorded as ok are skipped (and failed ones too unless `retry_failed`).
    A failing cell is recorded with its error; the others go on. `on_start(n_todo, n_skipped)`
    is called once, `on_cell(cell, row)` after each recorded cell. `threads`: torch threads per
    actor (default: the local CPUs shared among the actors, for a local Ray). `only`: run just the
    cells `select_cells` picks (the report still sees the whole grid).
    """
    from cluster.runtime import ActorPool, connect_ray, local_cpu_slots
    from workers.campaign import CampaignEvaluator

    t0 = time.perf_counter()
    check_datasets(spec)
    cells = select_cells(spec.cells(), only)
    results = CampaignResults(spec.name, store)
    done = results.finished()
    skip = {"ok"} if retry_failed else {"ok", "error"}
    todo = [c for c in cells if done.get(c.cell_id) not in skip]
    run = CampaignRun(spec.name, results.results_dir, len(cells), len(cells) - len(todo))
    results.write_spec(spec)  # the grid as last run, which the report keeps to (also when nothing is left to run)
    if on_start:
        on_start(len(todo), run.skipped)
    if not todo:
        run.seconds = round(time.perf_counter() - t0, 2)
        return run
    if threads is None and not ray_address:
        threads = max(1, (os.cpu_count() or 1) // workers)
    import ray

    owns_ray = connect_ray(ray_address, local_cpu_slots(workers), log_to_driver=False)
    pool = ActorPool(CampaignEvaluator, workers, "campaign")
    try:
        pool.broadcast("setup", threads)  # fails (PoolError) when actors cannot be placed or do not start
        by_id = {c.cell_id: c for c in todo}
        outcomes = pool.run([c.cell_id for c in todo],
                            lambda actor, cid: actor.run_cell.remote(by_id[cid].to_dict(), threads))
        for oc in outcomes:
            cell = by_id[oc.item]
            if oc.error is None:
                row = results.write_cell(cell, oc.value, worker=str(oc.value.get("worker", "")))
                run.ok += 1
            else:
                msg = f"{type(oc.error).__name__}: {oc.error}"
                log.warning("campaign %s: cell %s failed: %s", spec.name, cell.cell_id, msg)
                log.debug("".join(traceback.format_exception(oc.error)))
                row = results.write_cell(cell, error=msg)
                if row["status"] == "ok":  # another run of the campaign finished it meanwhile: its result stands
                    run.ok += 1
                else:
                    run.failed += 1
                    run.errors[cell.cell_id] = msg
            if on_cell:
                on_cell(cell, row)
    finally:
        pool.shutdown()
        if owns_ray:
            ray.shutdown()
    run.seconds = round(time.perf_counter() - t0, 2)
    return run
