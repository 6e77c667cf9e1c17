"""`CampaignEvaluator`: runs campaign cells (one `kvedit eval` run, or one scale measurement) on its own model."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def trim_eval_prompts(req, n: int):
    """The request with at most `n` paraphrase, neighbourhood (and answers) and subject-rephrase prompts."""
    from dataclasses import replace

    return replace(req, rephrase_prompts=req.rephrase_prompts[:n], locality_prompts=req.locality_prompts[:n],
                   locality_answers=req.locality_answers[:n], subject_rephrases=req.subject_rephrases[:n])


class CampaignEvaluator:
    """Loads each model once and keeps one `Editor` per (layer, seed, edit settings), reused across cells.

    A cell is the dict of `cluster.campaign.Cell.to_dict()`; `run_cell` returns the
    `run_sequential` fields (or the scale fields for synthetic cells) plus `worker`.
    Exceptions propagate: the driver records them as the cell's error.
    """

    def __init__(self, device: str | None = None):
        from workers.common import EditorCache

        self.cache = EditorCache(device)
        self._held_out: str | None = None
        # first-batch edits shared by cells that differ only in router or threshold (`MemoryMethod`)
        self.edit_cache: dict = {}

    def ready(self) -> int:
        return os.getpid()

    def setup(self, threads: int | None = None) -> int:
        """Set torch's intra-op threads (Ray gives an actor one by default); returns the pid."""
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        return os.getpid()

    def held_out(self) -> str:
        """The second half of WikiText-2 (the first half builds the statistics)."""
        if self._held_out is None:
            from editing.stats import corpus_half, default_corpus_path

            self._held_out = corpus_half(default_corpus_path().read_text(), "second")
        return self._held_out

    def editor(self, cell: dict):
        opts = cell["options"]
        overrides = {**opts.get("edit_config", {}), "layer": cell["layer"], "seed": cell["seed"]}
        ed = self.cache.editor(cell["model"], overrides)
        ed.config.batch_size = cell["batch"]  # as `kvedit eval`: a batch of b edits is optimised together
        return ed

    def run_cell(self, cell: dict, threads: int | None = None) -> dict:
        """Run one campaign cell (`cluster.campaign.Cell.to_dict()`); `threads` as `setup` (given with every
        cell, so an actor that replaced a dead one runs with as many threads as the first)."""
        self.setup(threads)
        ed = self.editor(cell)
        try:
            if cell["dataset"] == "synthetic":
                out = self._scale(ed, cell)
            else:
                out = self._sequential(ed, cell)
        finally:
            ed.detach()
        out["worker"] = f"{socket.gethostname()}:{os.getpid()}"
        log.info("cell %s done in %.1fs", cell["cell_id"], out.get("seconds", 0.0))
        return out

    def _sequential(self, ed, cell: dict) -> dict:
        from editing import load_records
        from editing.data import data_file
        from editing.evaluate import run_sequential, success_metric

        opts = cell["options"]
        records = load_records(data_file(cell["dataset"]), limit=cell["T"], offset=opts["offset"])
        if len(records) < cell["T"]:
            raise ValueError(f"T={cell['T']} edits asked, but {cell['dataset']} has only {len(records)} records "
                             f"from offset {opts['offset']}")
        if opts["eval_prompts"]:
            records = [trim_eval_prompts(r, opts["eval_prompts"]) for r in records]
        text = self.held_out()
        from cluster.campaign import calibration_config, method_variant
        from editing.calibrate import CalibrationConfig

        method, robust, calibrated = method_variant(cell["method"])
        return run_sequential(ed, records, cell["batch"], router=method, threshold=cell["threshold"], robust_keys=robust,
                              calibration=CalibrationConfig(**calibration_config(opts)) if calibrated else None,
                              perplexity_text=text[: opts["perplexity_chars"]] or None,
                              long_context_text=text[40_000:60_000] if opts["long_context"] else None,
                              fluency_prompts=opts["fluency_prompts"], edit_cache=self._edit_cache(),
                              metric=success_metric(cell["dataset"]))  # by data set, as `kvedit eval`

    def _edit_cache(self, keep: int = 4, keep_batches: int = 1000) -> dict:
        """The edit cache shared by this actor's cells (`editing.evaluate.run_sequential`), trimmed to the
        `keep` newest unedited-model measurements (next-token logits: tens of MB each) and the
        `keep_batches` newest edit batches (keys and residuals: about 8 KB per edit)."""
        for kind, n in (("unedited", keep), ("edits", keep_batches)):
            keys = [k for k in self.edit_cache if k[0] == kind]
            for key in keys[:-n] if len(keys) > n else []:
                del self.edit_cache[key]
        return self.edit_cache

    def _scale(self, ed, cell: dict) -> dict:
        import time

        from editing.synthetic import measure_scale, scale_memory, synthetic_requests

        t0 = time.perf_counter()
        opts = cell["options"]
        reqs = synthetic_requests(cell["T"], seed=cell["seed"])
        sm = scale_memory(ed, reqs, router=cell["method"], threshold=cell["threshold"], value_sample=opts["value_sample"])
        out = measure_scale(ed, sm, wikitext_tokens=opts["wikitext_tokens"])
        out["build_seconds"] = round(sm.seconds, 2)
        out["residuals"] = f"optimised for {sm.n_sample} of {len(reqs)} facts, zero for the rest"
        out["seconds"] = round(time.perf_counter() - t0, 2)
        return out
