"""`kvedit`: the command-line entry. Each command group lives in a small module; this file wires them.

An edit's path starts here: `kvedit edit run` (in-process) or `kvedit edit submit` (through
the job queue), then `kvedit serve` puts the memory in front of users.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(help="kvedit: edit the facts of a frozen LLM through an external key-value memory.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
edit_app = typer.Typer(help="Compute edits.", no_args_is_help=True)
model_app = typer.Typer(help="Prepare and inspect models.", no_args_is_help=True)
app.add_typer(edit_app, name="edit")
app.add_typer(model_app, name="model")


def _mount_optional() -> None:
    """Mount the command groups of the service packages."""
    from store.cli import memory_app

    from cluster.campaign_cli import campaign_app
    from cluster.jobs_cli import coordinator, demo, edit_submit, jobs_app
    from serving.cli import serve_command
    from serving.replica_cli import replica_app

    app.add_typer(memory_app, name="memory", help="Inspect, revert and export store memories.")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(campaign_app, name="campaign")
    edit_app.command("submit")(edit_submit)
    app.command("coordinator")(coordinator)
    app.command("demo")(demo)
    app.command("serve")(serve_command)
    app.add_typer(replica_app, name="replica")


_mount_optional()

err = Console(stderr=True)
out = Console()


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def emit(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, default=str))
    else:
        for k, v in obj.items():
            out.print(f"[bold]{k}[/]: {v}", highlight=False)


@model_app.command("prepare")
def model_prepare(model: str = typer.Argument("smollm2-135m", help="known name or local HF folder")):
    """Resolve a model (dequantizing a packaged GGUF once) and print its local folder and fingerprint."""
    _setup_logging(verbose=True)
    from editing.models import ModelNotFoundError, fingerprint_folder, resolve_model

    try:
        path = resolve_model(model)
    except ModelNotFoundError as exc:
        fail(str(exc))
    print(json.dumps({"model": model, "path": str(path), "fingerprint": fingerprint_folder(path)}))


@edit_app.command("run")
def edit_run(
    data: str = typer.Argument(..., help="records: ../shared/data/*.json, a file name in it, or JSONL"),
    model: str = typer.Option("smollm2-135m", help="known name or local HF causal-LM folder"),
    router: str = typer.Option("cosine", help="cosine | whitened | margin"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="write the edits here as edits.arrow"),
    memory: Optional[str] = typer.Option(None, help="commit the edits into this store memory"),
    store: Optional[str] = typer.Option(None, help="store URI (default $KVEDIT_STORE or ~/.cache/kvedit/store)"),
    redis_url: Optional[str] = typer.Option(None, envvar="KVEDIT_REDIS_URL"),
    limit: Optional[int] = typer.Option(None, min=1),
    offset: int = typer.Option(0, min=0),
    layer: Optional[int] = typer.Option(None),
    threshold: Optional[float] = typer.Option(None, help="a fixed gate threshold; omitted: a new memory is calibrated at every commit, an existing one keeps its gate"),
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Compute edits in-process, write them as an Arrow table (and/or commit them), and report efficacy."""
    _setup_logging()
    if out_dir is None and memory is None:
        fail("give --out DIR and/or --memory NAME")
    from editing import Editor, EditRecordError, load_records
    from editing.data import data_file
    from editing.models import ModelNotFoundError
    from editing.table import write_edit_table

    from cluster.commit import commit_edits, ensure_memory, open_store
    from editing.table import MemoryMismatchError
    from store import StoreError

    from cluster.commit import router_config

    try:
        router_config(router, threshold)  # an unknown router or a bad threshold fails before any work
        records = load_records(data_file(data), limit=limit, offset=offset)
        editor = Editor.load(model, device=device, layer=layer, router=router, threshold=threshold)
        if memory is not None:  # a memory that cannot take these edits fails now, not after computing them
            with open_store(store, redis_url) as st:
                ensure_memory(st, memory, editor.spec, router, threshold, create=False)
    except (EditRecordError, FileNotFoundError, ModelNotFoundError, MemoryMismatchError, StoreError, ValueError) as exc:
        fail(str(exc))
    from rich.progress import Progress

    try:
        with Progress(console=err, transient=True, disable=as_json) as prog:
            task = prog.add_task("optimising edits", total=len(records))
            edits = editor.compute(records, progress=lambda n: prog.advance(task, n))
    except EditRecordError as exc:
        fail(str(exc))
    result = {"n_edits": len(records), "edit_ids": edits.edit_ids, "layer": editor.layer, "router": router}
    if out_dir is not None:
        result["out"] = str(write_edit_table(edits.table, out_dir))
    if memory is not None:
        try:
            result.update(commit_edits(editor, edits.table, memory, store, redis_url, router, threshold, records=records))
        except (MemoryMismatchError, StoreError, ValueError) as exc:
            kept = f" (the edits are in {result['out']})" if "out" in result else ""
            fail(f"nothing committed to memory {memory!r}: {exc}{kept}")
    editor.attach(edits.table, router=router, threshold=result.get("threshold", threshold))
    flags = editor.efficacy(records)
    result["efficacy"] = sum(flags) / max(len(flags), 1)
    result["seconds"] = round(edits.seconds, 3)
    emit(result, as_json)


@edit_app.command("robust-keys")
def edit_robust_keys(
    memory: str = typer.Option(..., help="the store memory to train an adapter for"),
    data: Optional[str] = typer.Option(None, help="records of (some of) the memory's edits, with subject_rephrase "
                                                  "(shared data name or path); without it, retrain on the rephrasings "
                                                  "stored with the memory's adapter"),
    model: str = typer.Option("smollm2-135m"),
    store: Optional[str] = typer.Option(None, help="store URI (default $KVEDIT_STORE or ~/.cache/kvedit/store)"),
    redis_url: Optional[str] = typer.Option(None, envvar="KVEDIT_REDIS_URL"),
    limit: Optional[int] = typer.Option(None, min=1),
    offset: int = typer.Option(0, min=0),
    steps: Optional[int] = typer.Option(None, min=1, help="training steps (default: as the memory's adapter was "
                                                          "trained, else 300)"),
    rank: Optional[int] = typer.Option(None, min=1, help="adapter rank (default: 64 per started 100 edits, at most the key size)"),
    retrain_growth: Optional[float] = typer.Option(None, min=0.0, help="the job coordinator retrains the adapter after "
                                                   "a job that leaves the memory this share more rows than it was "
                                                   "trained on (0: never; default: the memory's setting, else 0.25)"),
    remove: bool = typer.Option(False, "--remove", help="commit a version without the adapter instead"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json"),
):
    """Train a REP robust-key adapter on a memory's edits and commit it as the memory's next version
    (replicas following the memory route through it from that version on)."""
    _setup_logging()
    from cluster.commit import open_store
    from cluster.robust import KEEP, drop_robust_keys, train_robust_keys
    from editing import Editor, EditRecordError, load_records
    from editing.data import data_file
    from editing.models import ModelNotFoundError
    from editing.rep import RobustKeyHparams
    from store import StoreError
    from store.artifacts import read_rephrases

    try:
        with open_store(store, redis_url) as st:
            if remove:
                emit(drop_robust_keys(st, memory), as_json)
                return
            records = load_records(data_file(data), limit=limit, offset=offset) if data else []
            info = st.info(memory)
            known = read_rephrases(st, info.router, f"memory {memory!r} v{info.version}")
            from_jobs = _job_records(st, memory, redis_url, set(known))
            if not data and not known and not from_jobs:
                fail(f"memory {memory!r} has no stored rephrasings to retrain on; give --data with the records of "
                     "its edits (or --remove)")
            editor = Editor.load(model, layer=info.spec.layer)
            trained = (info.router.get("robust_keys") or {}).get("steps", RobustKeyHparams.steps)
            hp = None if rank is None and steps is None else RobustKeyHparams(rank=rank, steps=steps or trained)
            result = train_robust_keys(editor, st, memory, records, hp, seed=seed, records_by_id=from_jobs,
                                       retrain_growth=KEEP if retrain_growth is None else retrain_growth or None)
    except (EditRecordError, FileNotFoundError, ModelNotFoundError, ValueError, StoreError) as exc:
        fail(str(exc))
    emit(result, as_json)


def _job_records(st, memory: str, redis_url: str | None, known: set[str]) -> dict:
    """The records of `memory`'s rows added by jobs whose rephrasings were never stored, from the job store
    (`cluster.robust.records_of_rows`, as the coordinator's retrain reads them); {} with a warning when the
    job store cannot be reached (then only stored rephrasings and --data train)."""
    from cluster.jobs import JobStore, QueueUnavailableError
    from cluster.robust import records_of_rows

    try:
        jobs = JobStore.connect(redis_url, store_root=st.root)
        try:
            return records_of_rows(jobs, st.load(memory)[1], known)
        finally:
            jobs.client.close()
    except QueueUnavailableError as exc:
        logging.getLogger(__name__).warning("job store unreachable (%s): rows added by jobs since the last retrain "
                                            "train without their rephrasings unless --data gives them", exc)
        return {}


@app.command("generate")
def generate(
    prompts: list[str] = typer.Argument(..., help="prompts to continue greedily"),
    model: str = typer.Option("smollm2-135m"),
    memory_ref: Optional[str] = typer.Option(None, "--memory", help="edits.arrow folder/file, or a store memory NAME\\[@VERSION]"),
    store: Optional[str] = typer.Option(None, help="store URI for a named memory"),
    redis_url: Optional[str] = typer.Option(None, envvar="KVEDIT_REDIS_URL"),
    router: str = typer.Option("cosine"),
    threshold: Optional[float] = typer.Option(None),
    max_new_tokens: int = typer.Option(20, min=1),
    device: str = typer.Option("cpu"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Print the greedy continuation of each prompt, without and with the memory."""
    _setup_logging()
    from editing import Editor
    from editing.models import ModelNotFoundError
    from editing.table import MemoryMismatchError, read_edit_table

    try:
        editor = Editor.load(model, device=device)
    except (ModelNotFoundError, ValueError) as exc:
        fail(str(exc))
    rows = []
    base = editor.generate(prompts, max_new_tokens)
    edited = None
    if memory_ref is not None:
        try:
            adapter = stats = None
            if Path(memory_ref).exists():
                spec, table = read_edit_table(memory_ref)
            else:
                from cluster.commit import memory_stats, open_store
                from store.artifacts import read_robust_keys

                name, _, ver = memory_ref.partition("@")
                if ver and not ver.isdigit():
                    raise ValueError(f"--memory {memory_ref!r}: the version after '@' must be a number")
                st = open_store(store, redis_url)
                info, table = st.load(name, int(ver) if ver else None)
                spec, router = info.spec, info.router.get("name", router)
                threshold = threshold if threshold is not None else info.router.get("threshold")
                adapter = read_robust_keys(st, info.router, spec.d_key, f"memory {name!r} v{info.version}")
                stats = memory_stats(st, spec, info.router)
            editor.config.layer = spec.layer
            routed = editor.attach(table, spec=spec, router=router, threshold=threshold, stats=stats)
            routed.query_adapter = None if adapter is None else adapter.to(routed.rows.device)  # as replicas serve it
        except Exception as exc:  # noqa: BLE001 - every failure here is reported to the user the same way
            fail(str(exc))
        edited = editor.generate(prompts, max_new_tokens)
    for i, p in enumerate(prompts):
        rows.append({"prompt": p, "base": base[i], **({"edited": edited[i]} if edited else {})})
    if as_json:
        print(json.dumps({"generations": rows}))
        return
    for r in rows:
        out.print(f"[bold]{r['prompt']}[/]", highlight=False)
        out.print(f"  base:   {r['base']!r}", highlight=False)
        if "edited" in r:
            out.print(f"  edited: {r['edited']!r}", highlight=False)


@app.command("eval")
def eval_cmd(
    data: str = typer.Option("counterfact_valid.json", help="records file (shared data name or path)"),
    method: str = typer.Option("cosine", help="a memory router (cosine | whitened | margin) or a baseline "
                                              "(rome | memit | alphaedit | scr)"),
    edits: int = typer.Option(10, "--edits", min=1, help="T: number of edits"),
    offset: int = typer.Option(0, min=0),
    layer: Optional[int] = typer.Option(None),
    threshold: Optional[float] = typer.Option(None, help="router gate threshold, or scr's minimum similarity"),
    batch: int = typer.Option(32, min=1, help="b: edits per batch (1 = strictly sequential)"),
    seed: int = typer.Option(0),
    robust_keys: bool = typer.Option(False, "--robust-keys", help="train a REP robust-key adapter on the edits "
                                     "(memory routers only); adds subject_rephrase_in_domain / _out_of_domain"),
    calibrate: bool = typer.Option(False, "--calibrate", help="re-choose the gate threshold after every batch "
                                   "(editing.calibrate, at the false-gate-rate bound; memory routers only); adds "
                                   "calibration and false_gate_rate"),
    metric: str = typer.Option("auto", help="how a prompt's success is scored: nll (CounterFact: new target's mean "
                               "NLL below the true one's) | token_accuracy (zsRE: top-1 token accuracy, teacher "
                               "forced) | auto (token_accuracy for zsRE files, else nll)"),
    model: str = typer.Option("smollm2-135m"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Edit T facts sequentially in batches of b, then report CounterFact/zsRE metrics, robustness and withdrawal."""
    _setup_logging()
    from editing import Editor, EditRecordError, load_records
    from editing.data import data_file
    from cluster.campaign import calibration_config
    from editing.calibrate import CalibrationConfig
    from editing.evaluate import known_methods, run_sequential, success_metric
    from editing.routers import ROUTERS
    from editing.stats import corpus_half, default_corpus_path

    if method not in known_methods():
        fail(f"unknown method {method!r}; known: {', '.join(known_methods())}")
    is_router = method in ROUTERS
    if threshold is not None and not is_router and method != "scr":
        fail(f"method {method!r} edits weights and has no --threshold")
    if robust_keys and not is_router:
        fail(f"--robust-keys adapts the memory's routing; method {method!r} has no memory")
    if calibrate and (not is_router or threshold is not None):
        fail(f"--calibrate chooses a memory router's threshold: it needs a router and no --threshold "
             f"(got method {method!r}, threshold {threshold})")
    try:
        if is_router and threshold is not None:
            ROUTERS[method].check_threshold(threshold)
        metric = success_metric(data, metric)
        records = load_records(data_file(data), limit=edits, offset=offset)
        if len(records) < edits:
            raise ValueError(f"--edits {edits}: {data} has only {len(records)} records from offset {offset}")
        editor = Editor.load(model, layer=layer, router=method if is_router else None,
                             threshold=threshold if is_router else None, seed=seed, batch_size=batch)
    except (EditRecordError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    held_out = corpus_half(default_corpus_path().read_text(), "second")
    from rich.progress import Progress

    try:
        with Progress(console=err, transient=True, disable=as_json) as prog:
            task = prog.add_task("editing", total=len(records))
            result = run_sequential(editor, records, batch, router=method, threshold=threshold,
                                    perplexity_text=held_out[:40_000], long_context_text=held_out[40_000:60_000],
                                    progress=lambda n: prog.advance(task, n), robust_keys=robust_keys,
                                    calibration=CalibrationConfig(**calibration_config()) if calibrate else None,
                                    metric=metric)
    except EditRecordError as exc:
        fail(str(exc))
    result = {"method": method, "data": data, **result}
    emit(result, as_json)


@app.command("bench")
def bench(
    name: str = typer.Argument(..., help="benchmark name (see `kvedit bench list`)"),
    as_json: bool = typer.Option(False, "--json"),
    model: str = typer.Option("smollm2-135m"),
):
    """Run a benchmark; with --json print one JSON object (ratios plus the raw figures)."""
    _setup_logging()
    from benchmarks import BENCHMARKS

    if name == "list":
        for k, (_, doc) in sorted(BENCHMARKS.items()):
            out.print(f"[bold]{k}[/]: {doc}")
        return
    if name not in BENCHMARKS:
        fail(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    fn, _ = BENCHMARKS[name]
    result = fn(model=model)
    emit(result, as_json)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":
    main()
