"""Core-engine benchmarks: value optimisation, routing overhead and statistics collection.

Each returns a dict with the ratio the issue asks for and the raw figures behind it. Every
ratio compares two measurements taken in the same run, interleaved where it matters, so
machine noise affects both sides alike.
"""

from __future__ import annotations

import statistics
import time

import torch


def _editor(model: str):
    from editing import Editor

    return Editor.load(model)


def _records(n: int):
    from editing import load_records
    from editing.data import data_file

    return load_records(data_file("counterfact_valid.json"), limit=n)


def bench_value_opt(model: str = "smollm2-135m", batch: int = 32, steps: int = 10, reference_edits: int = 4) -> dict:
    """Edits/s of the batched, truncated optimiser vs the naive per-edit loop, same steps.

    Early stopping is off on both sides so both run exactly `steps` steps per edit. The naive
    loop's rate is measured on `reference_edits` of the batch (it is a per-edit loop, so its
    edits/s does not depend on how many edits it is given).
    """
    from editing.values import ValueHparams, optimise_residuals, optimise_residuals_reference

    ed = _editor(model)
    reqs = _records(batch)
    hp = ValueHparams(**{**ed.config.values.__dict__, "steps": steps, "stop_loss": 0.0})
    tpl = ed.templates
    half = reference_edits // 2

    def reference(reqs_part):
        t0 = time.perf_counter()
        res = optimise_residuals_reference(ed.model, ed.tok, ed.adapter, ed.layer, reqs_part, tpl, hp)
        return res, time.perf_counter() - t0

    # The naive loop runs half before and half after the batched run, so drift hits both sides.
    ref_a, t_a = reference(reqs[:half])
    t0 = time.perf_counter()
    fast = optimise_residuals(ed.model, ed.tok, ed.adapter, ed.layer, reqs, tpl, hp)
    t_fast = time.perf_counter() - t0
    ref_b, t_b = reference(reqs[half:reference_edits])
    t_ref = t_a + t_b
    ref_res = torch.cat([ref_a.residuals, ref_b.residuals])
    max_diff = float((fast.residuals[:reference_edits] - ref_res).abs().max())
    fast_rate, ref_rate = batch / t_fast, reference_edits / t_ref
    return {
        "benchmark": "value-opt", "speedup": round(fast_rate / ref_rate, 3),
        "batched_edits_per_s": round(fast_rate, 4), "naive_edits_per_s": round(ref_rate, 4),
        "batched_seconds": round(t_fast, 2), "naive_seconds": round(t_ref, 2),
        "batch": batch, "reference_edits": reference_edits, "steps": steps, "layer": ed.layer,
        "n_templates": len(tpl), "max_residual_diff": max_diff, "torch_threads": torch.get_num_threads(),
    }


def _wiki_token_keys(ed, n: int, chunk_tokens: int = 256) -> torch.Tensor:
    """n real FFN keys of WikiText tokens at the edit layer: [n, d_key]."""
    from editing.keys import token_keys
    from editing.prompts import pad_batch
    from editing.stats import corpus_chunks, corpus_half, default_corpus_path

    text = corpus_half(default_corpus_path().read_text(), "first")
    chunks = corpus_chunks(ed.tok, text, chunk_tokens=chunk_tokens, max_tokens=n + chunk_tokens)
    out, have = [], 0
    for i in range(0, len(chunks), 8):
        ids, mask = pad_batch(chunks[i: i + 8], ed.tok.pad_token_id, "cpu")
        k = token_keys(ed.model, ed.adapter, ed.layer, ids, mask)[mask.bool()]
        out.append(k)
        have += k.shape[0]
        if have >= n:
            break
    return torch.cat(out)[:n]


def _synthetic_memory_keys(real: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n stored keys: real token keys, recycled with 10% relative noise so none repeats exactly."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, real.shape[0], (n,), generator=g)
    base = real[idx]
    noise = torch.randn(base.shape, generator=g) * base.norm(dim=-1, keepdim=True) / base.shape[1] ** 0.5
    return base + 0.1 * noise


def bench_routing_overhead(model: str = "smollm2-135m", facts: tuple[int, ...] = (1_000, 10_000, 100_000),
                           batch: int = 4, seq: int = 256, repeats: int = 5) -> dict:
    """Prefill tokens/s of the routed model vs the base model at several memory sizes.

    Stored keys are synthetic (real WikiText token keys with noise); the queries are WikiText
    text from the held-out half. Routing decisions of the prefiltered memory are checked
    against brute-force scoring of the same memory on every query token.
    """
    from editing.prompts import pad_batch
    from editing.routed import RoutedFFN, attach, detach
    from editing.stats import corpus_chunks, corpus_half, default_corpus_path

    ed = _editor(model)
    text = corpus_half(default_corpus_path().read_text(), "second")
    chunks = corpus_chunks(ed.tok, text, chunk_tokens=seq)[:batch]
    ids, mask = pad_batch(chunks, ed.tok.pad_token_id, "cpu")
    real = _wiki_token_keys(ed, min(max(facts), 20_000))
    query_keys = None

    def prefill_seconds() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            ed.model(input_ids=ids, attention_mask=mask, use_cache=False)
        return time.perf_counter() - t0

    prefill_seconds()  # warm-up
    results, raw = {}, {}
    for n in facts:
        keys = _synthetic_memory_keys(real, n, seed=n)
        residuals = torch.randn(n, ed.adapter.d_model) * 0.01
        mem = ed.new_memory(capacity=n)
        mem.add([str(i) for i in range(n)], keys, residuals)
        mem.fit_basis(real[:8192])
        brute = ed.new_memory(capacity=n, prefilter_dim=0)
        brute.add([str(i) for i in range(n)], keys, residuals)
        base_t, routed_t = [], []
        for _ in range(repeats):  # interleaved so drift hits both sides
            detach(ed.model, ed.adapter, ed.layer)
            base_t.append(prefill_seconds())
            attach(ed.model, ed.adapter, ed.layer, mem)
            routed_t.append(prefill_seconds())
        detach(ed.model, ed.adapter, ed.layer)
        brute_t = []
        for _ in range(max(2, repeats // 2)):
            attach(ed.model, ed.adapter, ed.layer, brute)
            brute_t.append(prefill_seconds())
        detach(ed.model, ed.adapter, ed.layer)
        if query_keys is None:
            from editing.keys import token_keys

            query_keys = token_keys(ed.model, ed.adapter, ed.layer, ids, mask)[mask.bool()]
        b1, _, w1 = mem.route(query_keys)
        b2, _, w2 = brute.route(query_keys)
        gate_agree = bool(torch.equal(w1 > 0, w2 > 0))
        on = w2 > 0
        top1_agree = bool(torch.equal(b1[on], b2[on]))
        base_med, routed_med, brute_med = map(statistics.median, (base_t, routed_t, brute_t))
        tokens = int(mask.sum())
        results[str(n)] = round(routed_med / base_med - 1, 4)
        raw[str(n)] = {
            "base_tokens_per_s": round(tokens / base_med, 1), "routed_tokens_per_s": round(tokens / routed_med, 1),
            "brute_force_overhead": round(brute_med / base_med - 1, 4), "prefilter": mem.use_prefilter,
            "gate_decisions_equal": gate_agree, "top1_equal_where_gated": top1_agree,
            "tokens_gated_on": int(on.sum()), "query_tokens": int(on.numel()),
        }
    return {"benchmark": "routing-overhead", "overhead": results, "raw": raw, "layer": ed.layer,
            "prefill_tokens": int(mask.sum()), "repeats": repeats}


def bench_covariance(model: str = "smollm2-135m", tokens: int = 16_384, batch_size: int = 8, repeats: int = 3) -> dict:
    """Tokens/s of second-moment collection vs a plain forward to the edit layer (same batches)."""
    from editing.keys import token_keys
    from editing.prompts import pad_batch
    from editing.stats import collect_second_moment, corpus_chunks, corpus_half, default_corpus_path

    ed = _editor(model)
    text = corpus_half(default_corpus_path().read_text(), "first")
    chunks = corpus_chunks(ed.tok, text, chunk_tokens=256, max_tokens=tokens)
    pad = ed.tok.pad_token_id

    def forward_only() -> float:
        t0 = time.perf_counter()
        for i in range(0, len(chunks), batch_size):
            ids, mask = pad_batch(chunks[i: i + batch_size], pad, "cpu")
            token_keys(ed.model, ed.adapter, ed.layer, ids, mask)
        return time.perf_counter() - t0

    def collect() -> float:
        t0 = time.perf_counter()
        collect_second_moment(ed.model, ed.adapter, ed.layer, chunks, batch_size=batch_size)
        return time.perf_counter() - t0

    forward_only()
    fwd, col = [], []
    for _ in range(repeats):
        fwd.append(forward_only())
        col.append(collect())
    n = sum(len(c) for c in chunks)
    f, c = statistics.median(fwd), statistics.median(col)
    return {"benchmark": "covariance", "ratio": round(f / c, 4), "stats_tokens_per_s": round(n / c, 1),
            "forward_tokens_per_s": round(n / f, 1), "tokens": n, "layer": ed.layer, "repeats": repeats}
