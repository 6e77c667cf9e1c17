"""`kvedit campaign report`: a Markdown report with PNG plots, read back from a campaign's results table.

- a method comparison table per (dataset, T, batch), laid out like the papers' tables
  (rows = methods; columns Efficacy, Generalization, Specificity, ...);
- each metric against T (one line per method, grid threshold, layer and grid batch);
- each metric against the threshold (one line per method and T);
- the scale protocol (synthetic cells): routing capacity and false gates against N;
- the failed cells and their errors.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from cluster.campaign import SYNTHETIC, CampaignResults, CampaignSpec

# Columns of the comparison table: (metric, header, pre-edit metric shown in brackets).
TABLE_COLUMNS = (
    ("efficacy", "Efficacy", None), ("generalization", "Generalization", None),
    ("specificity", "Specificity (pre)", "pre_specificity"), ("locality", "Locality", None),
    ("fluency", "Fluency (pre)", "pre_fluency"), ("perplexity_delta", "PPL Δ", None),
    ("subject_rephrase", "Subject rephrase", None), ("subject_rephrase_out_of_domain", "Rephrase held out", None),
    ("shuffled_subject", "Shuffled", None),
    ("long_context", "Long ctx", None), ("withdrawal_reverted", "Withdrawal reverted", None),
    ("withdrawal_reverted_unshared", "Reverted (subject not kept)", None),
    ("withdrawal_reverted_top1", "Reverted (top-1)", None),
    ("withdrawal_retained", "Withdrawal retained", None), ("seconds", "Seconds", None),
)
SCALE_COLUMNS = (("routing_capacity", "Routing capacity"), ("routing_top1", "Own row top-1"),
                 ("false_gate_rate", "False-gate rate"), ("sample_efficacy", "Sample efficacy"),
                 ("seconds", "Seconds"))
PLOT_METRICS = ("efficacy", "generalization", "specificity", "locality", "fluency", "perplexity_delta",
                "subject_rephrase", "shuffled_subject", "long_context", "withdrawal_reverted", "withdrawal_retained")
SCALE_METRICS = ("routing_capacity", "false_gate_rate", "sample_efficacy")
NOT_RATES = {"fluency", "pre_fluency", "seconds", "perplexity_delta"}


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def format_value(metric: str, v) -> str:
    """How the report prints a metric: rates in percent with one decimal, fluency in bits, PPL change in %."""
    if _missing(v):
        return "–"
    if metric == "perplexity_delta":
        return f"{100 * v:+.1f}%"
    if metric in ("fluency", "pre_fluency"):
        return f"{v:.2f}"
    if metric == "seconds":
        return f"{v:.0f}"
    if metric == "false_gate_rate":
        return f"{100 * v:.2f}"
    return f"{100 * v:.1f}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _comparison(df, methods: list[str]) -> list[str]:
    """Per (dataset, T, batch): rows = method (and threshold, layer), columns = metrics present."""
    lines = []
    order = {m: i for i, m in enumerate(methods)}
    for (ds, t, b), g in df.groupby(["dataset", "T", "batch"], sort=True):
        g = g.assign(_o=g["method"].map(lambda m: order.get(m, len(order)))).sort_values(["_o", "threshold_used", "layer_used"])
        cols = [c for c in TABLE_COLUMNS if g[c[0]].notna().any()]
        several_layers = g["layer_used"].nunique(dropna=False) > 1  # scr has no layer (NaN)
        header = ["Method", "τ"] + (["Layer"] if several_layers else []) + [c[1] for c in cols]
        rows = []
        for _, r in g.iterrows():
            cells = [r["method"], "–" if _missing(r["threshold_used"]) else f"{r['threshold_used']:.2f}"]
            cells += [_layer(r["layer_used"])] if several_layers else []
            for metric, _, pre in cols:
                text = format_value(metric, r[metric])
                if pre and not _missing(r[pre]):
                    text += f" ({format_value(pre, r[pre])})"
                cells.append(text)
            rows.append(cells)
        lines += [f"### {ds}, T = {t} (batch {b})", ""] + _md_table(header, rows) + [""]
    return lines


def _layer(v) -> str:
    return "–" if _missing(v) else str(int(v))


def _series_label(row, keys: list[str]) -> str:
    parts = [row["method"]]
    for k in keys:
        if k in ("threshold_used", "threshold") and not _missing(row[k]):
            parts.append(f"τ={row[k]:.2f}")
        elif k == "T":
            parts.append(f"T={int(row[k])}")
        elif k == "layer_used":
            parts.append(f"L{_layer(row[k])}")
        elif k in ("batch", "grid_batch"):
            parts.append(f"b={int(row[k])}")
    return " ".join(parts)


def _by_grid_batch(df, batches: list[int] | None):
    """One row per (cell, grid batch it stands for): a cell's batch is capped at T (`Cell.batch = min(b, T)`),
    so the T = 1 cell of a `batch: [5]` grid belongs to the b = 5 line, and with `batch: [1, 32]` the T = 1
    cell (batch 1) to both lines."""
    if not batches:
        return df.assign(grid_batch=df["batch"])
    rows = df.assign(grid_batch=[[b for b in batches if min(b, t) == c] or [c] for t, c in zip(df["T"], df["batch"])])
    return rows.explode("grid_batch").astype({"grid_batch": int})


def _plot(df, x: str, metric: str, line_keys: list[str], path: Path, xlabel: str, logx: bool = False) -> bool:
    """One PNG: `metric` against `x`, a subplot per dataset, a line per distinct `line_keys`. False if no data."""
    import matplotlib.pyplot as plt

    df = df[df[metric].notna() & df[x].notna()]
    if df.empty:
        return False
    datasets = sorted(df["dataset"].unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    varying = [k for k in line_keys if df[k].nunique(dropna=False) > 1]
    for ax, ds in zip(axes[0], datasets):
        sub = df[df["dataset"] == ds]
        for _, g in sub.groupby(["method", *varying], dropna=False, sort=True):
            g = g.sort_values(x)
            scale = 1 if metric in NOT_RATES else 100
            ax.plot(g[x], g[metric] * scale, marker="o", label=_series_label(g.iloc[0], varying))
        ax.set_title(ds, fontsize=9)
        ax.set_xlabel(xlabel)
        if logx and sub[x].min() > 0:
            ax.set_xscale("log")
        ax.set_ylabel(metric + ("" if metric in NOT_RATES else " (%)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(name: str, out: str | Path, store: str | None = None) -> Path:
    """Write `<out>/report.md` and `<out>/plots/*.png` for campaign `name`; returns the report path.

    Raises ValueError when the campaign has no recorded cells.
    """
    import matplotlib

    matplotlib.use("Agg")
    results = CampaignResults(name, store)
    df = results.frame()
    if df.empty:
        raise ValueError(f"campaign {name!r}: no results in {results.results_dir} (run `kvedit campaign run` first)")
    spec = results.spec() or {}
    stale = 0
    if spec:  # cells of an earlier grid, or scored another way, are not this campaign's numbers
        current = {c.cell_id for c in CampaignSpec(**spec).cells()}
        keep = df["cell_id"].isin(current)
        stale, df = int((~keep).sum()), df[keep]
        if df.empty:
            raise ValueError(f"campaign {name!r}: none of the {stale} recorded cells belongs to the grid as last run "
                             "(rerun `kvedit campaign run`)")
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    ok, failed = df[df["status"] == "ok"], df[df["status"] != "ok"]
    seq, scale = ok[ok["dataset"] != SYNTHETIC], ok[ok["dataset"] == SYNTHETIC]
    methods = spec.get("methods") or sorted(df["method"].unique())
    lines = [f"# Campaign `{name}`", ""]
    if spec.get("description"):
        lines += [spec["description"], ""]
    lines += [f"- model: `{spec.get('model', df['model'].iloc[0])}`",
              f"- datasets: {', '.join(sorted(df['dataset'].unique()))}",
              f"- cells: {len(ok)} finished, {len(failed)} failed"
              + (f"; {stale} recorded cell(s) of an earlier grid or scoring left out" if stale else ""),
              f"- results table: `{results.results_dir}` (`pandas.read_parquet` reads it)",
              f"- generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
              "Rates are percentages; Specificity and Fluency show the unedited model's value in brackets; "
              "PPL Δ is the relative change of WikiText perplexity (held-out half); Fluency is ROME's n-gram entropy.", ""]
    if not seq.empty:
        lines += ["## Method comparison", ""] + _comparison(seq, methods)
        # Lines against T follow the grid's threshold (a calibrated cell's own threshold differs per T) and
        # the grid's batch (capped at T per cell).
        by_batch = _by_grid_batch(seq, spec.get("batches"))
        for x, data, keys, title, xlabel, logx in (
            ("T", by_batch, ["threshold", "layer_used", "grid_batch"], "Metrics against T", "T (edits)", True),
            ("threshold_used", seq, ["T", "layer_used", "batch"], "Metrics against the threshold", "threshold τ", False),
        ):
            lines += [f"## {title}", ""]
            for metric in PLOT_METRICS:
                png = plots / f"{'T' if x == 'T' else 'threshold'}_{metric}.png"
                if _plot(data, x, metric, keys, png, xlabel, logx):
                    lines += [f"![{metric} against {xlabel}](plots/{png.name})", ""]
    if not scale.empty:
        lines += ["## Scale: synthetic facts", "",
                  "Invented subjects in real CounterFact relation templates (`editing/synthetic.py`). Every fact's key "
                  "is real (context-averaged, as for a real edit); residuals are optimised only for a small sample "
                  "(`value_sample`) and are zero for the rest, since optimising 100K values is too slow on a CPU. "
                  "Routing capacity and false gates depend on the keys only; the sample's efficacy is measured with "
                  "all N rows in the memory.", ""]
        header = ["N", "Method", "τ"] + [h for _, h in SCALE_COLUMNS]
        rows = [[str(int(r["T"])), r["method"], "–" if _missing(r["threshold_used"])
                 else f"{r['threshold_used']:.2f}"] + [format_value(m, r[m]) for m, _ in SCALE_COLUMNS]
                for _, r in scale.sort_values(["method", "threshold_used", "T"]).iterrows()]
        lines += _md_table(header, rows) + [""]
        for metric in SCALE_METRICS:
            png = plots / f"scale_{metric}.png"
            if _plot(scale, "T", metric, ["threshold_used", "layer_used"], png, "N (facts)", logx=True):
                lines += [f"![{metric} against N](plots/{png.name})", ""]
    if not failed.empty:
        lines += ["## Failed cells", ""]
        rows = [[r["cell_id"], r["dataset"], r["method"], "–" if _missing(r["threshold"]) else f"{r['threshold']:.2f}",
                 str(int(r["T"])), str(r["error"]).replace("|", "\\|").replace("\n", " ")[:300]]
                for _, r in failed.iterrows()]
        lines += _md_table(["Cell", "Dataset", "Method", "τ", "T", "Error"], rows) + [""]
    report = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(report)
    return report
