"""`kvedit bench gate-scaling`: how a memory's routing holds up as it grows, fixed against calibrated gates.

Routing depends only on keys (the residuals never enter it), so this measures at T = 1 … 400 real
edits of a CounterFact set in minutes, where a full sequential evaluation takes hours. For each
memory size and each gate (the fixed threshold, and the threshold `editing.calibrate` chooses at
the false-gate-rate bound, as `kvedit eval --calibrate` does after its last batch):

- `false_gate_rate`: share of 16,384 held-out WikiText tokens gated on (`held_out_false_gate_rate`);
- for the edits' own prompts and for their paraphrases that contain the subject verbatim, read at
  the subject's last token: `hit` (own row fires), `misrouted` (another row fires), `gate_off`.

- `own_prompt.cross_gated`: share of own prompts where some token gates onto *another* edit's row
  (that residual is added too, whatever the subject token does).

A paraphrase without the subject verbatim cannot be routed by its subject; the share of those is
reported beside (`paraphrases_without_subject`).
"""

from __future__ import annotations

import time

import torch


def _route(mem, keys: torch.Tensor, owners: list[int]) -> dict:
    from editing.calibrate import route_scores

    if not owners:
        return {"n": 0, "hit": None, "misrouted": None, "gate_off": None}
    best, score = route_scores(mem, keys)
    on = score > float(mem.threshold)
    own = best == torch.tensor(owners)
    n = len(owners)
    return {"n": n, "hit": round(float((on & own).sum()) / n, 4), "misrouted": round(float((on & ~own).sum()) / n, 4),
            "gate_off": round(float((~on).sum()) / n, 4)}


@torch.no_grad()
def _prompt_token_keys(ed, prompts: list[str], batch_size: int = 64) -> list[torch.Tensor]:
    """Every token's FFN key at the edit layer, per prompt: a list of [len_i, d_key]."""
    from editing.keys import token_keys
    from editing.prompts import pad_batch

    out = []
    for i in range(0, len(prompts), batch_size):
        enc = [ed.tok(p)["input_ids"] for p in prompts[i: i + batch_size]]
        ids, mask = pad_batch(enc, ed.tok.pad_token_id or 0, "cpu")
        k = token_keys(ed.model, ed.adapter, ed.layer, ids, mask).float()
        out += [k[j, : len(e)] for j, e in enumerate(enc)]
    return out


def _cross_gated(mem, token_keys: list[torch.Tensor], owners: list[int]) -> float:
    from editing.calibrate import route_scores

    lengths = [k.shape[0] for k in token_keys]
    best, score = route_scores(mem, torch.cat(token_keys))
    other = (score > float(mem.threshold)) & (best != torch.repeat_interleave(torch.tensor(owners), torch.tensor(lengths)))
    hits = [bool(x.any()) for x in other.split(lengths)]
    return round(sum(hits) / max(len(hits), 1), 4)


def bench_gate_scaling(model: str = "smollm2-135m", data: str = "counterfact_test.json", sizes=(1, 10, 100, 400),
                       fixed: float = 0.5, router: str = "cosine") -> dict:
    from editing import Editor, load_records
    from editing.calibrate import CalibrationConfig, calibrate, held_out_false_gate_rate, prompt_keys
    from editing.data import data_file

    t0 = time.perf_counter()
    ed = Editor.load(model, router=router)
    reqs = load_records(data_file(data), limit=max(sizes))
    ids = [f"e{i}" for i in range(len(reqs))]
    keys = ed.keys(reqs)  # [N, d_key]
    own_facts = [(e, r.subject, r.prompt) for e, r in zip(ids, reqs)]
    para_facts = [(e, r.subject, p) for e, r in zip(ids, reqs) for p in r.rephrase_prompts if r.subject in p]
    n_para = sum(len(r.rephrase_prompts) for r in reqs)
    own_keys, _, _ = prompt_keys(ed, own_facts)
    own_tokens = _prompt_token_keys(ed, [r.prompt for r in reqs])
    para_keys, para_owner, _ = prompt_keys(ed, para_facts)
    index = {e: i for i, e in enumerate(ids)}
    para_idx = torch.tensor([index[e] for e in para_owner], dtype=torch.long)
    cal_config = CalibrationConfig(placement=0.0)
    rows = []
    for T in sizes:
        mem = ed.new_memory(router=router)
        mem.add(ids[:T], keys[:T], torch.zeros(T, ed.adapter.d_model))
        slot = [mem.slots[e] for e in ids[:T]]
        in_t = para_idx < T
        cal = calibrate(ed, mem, own_facts[:T], cal_config)
        for gate, thr in (("fixed", fixed), ("calibrated", cal.threshold)):
            mem.threshold.fill_(thr)
            rows.append({
                "T": T, "gate": gate, "threshold": round(float(thr), 4),
                "false_gate_rate": round(held_out_false_gate_rate(ed, mem), 6),
                "own_prompt": {**_route(mem, own_keys[:T], slot), "cross_gated": _cross_gated(mem, own_tokens[:T], slot)},
                "paraphrase": _route(mem, para_keys[in_t], [slot[i] for i in para_idx[in_t].tolist()]),
            })
    return {"benchmark": "gate-scaling", "model": model, "data": data, "router": router, "fixed_threshold": fixed,
            "calibration": {"placement": cal_config.placement, "target_rate": cal_config.target_rate},
            "paraphrases_without_subject": round(1 - len(para_facts) / max(n_para, 1), 4),
            "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
