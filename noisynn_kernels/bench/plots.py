"""PNG plots of a ``noisynn bench`` result: model throughput per competitor, op time per competitor, op
time vs size, and on GPU the achieved fraction of the device's copy bandwidth."""

from __future__ import annotations

import os

__all__ = ["write_plots"]

_COLORS = {"timm": "#7f7f7f", "eager": "#d62728", "noisynn": "#1f77b4", "layernorm": "#2ca02c",
           "compiled": "#ff7f0e", "compiled_ref": "#8c564b", "compiled_noisynn": "#17becf", "sdpa": "#9467bd"}

# (median, first quartile, third quartile) fields of a competitor entry, per plotted metric
_QUARTILES = {"median_ms": ("q1_ms", "q3_ms"), "throughput_per_s": ("throughput_q1_per_s", "throughput_q3_per_s")}


def _errors(entries: list, metric: str):
    """Asymmetric error bars ``[[below...], [above...]]`` spanning the interquartile range of ``metric``
    in each competitor entry (``None``: a row without this competitor, no bar), or ``None`` when an
    entry has no quartiles (results of older versions)."""
    lo_key, hi_key = _QUARTILES.get(metric, (None, None))
    present = [e for e in entries if e is not None]
    if lo_key is None or any(lo_key not in e or hi_key not in e for e in present):
        return None
    below = [0.0 if e is None else max(0.0, e[metric] - e[lo_key]) for e in entries]
    above = [0.0 if e is None else max(0.0, e[hi_key] - e[metric]) for e in entries]
    return [below, above]


def _grouped_bars(ax, groups: list[str], series: dict, ylabel: str, errors: dict | None = None) -> None:
    """Bars per group and series; ``errors[name]`` (optional) the series' error bars (see :func:`_errors`)."""
    names = list(series)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        yerr = (errors or {}).get(name)
        ax.bar(xs, series[name], width, label=name, color=_COLORS.get(name), yerr=yerr,
               error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "k"})
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def write_plots(result: dict, out_dir: str) -> list[str]:
    """Write ``models.png`` (throughput, higher is better), ``ops.png`` (median time, lower is better),
    ``op_sizes.png`` (op time vs size) and, for GPU runs, ``bandwidth.png`` (% of copy bandwidth) for
    the rows present; returns the paths written.  Time and throughput bars carry error bars spanning
    the interquartile range of the timed rounds, so a reader sees which differences are real."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = result["environment"]
    subtitle = f"{env['device']} | torch {env['torch']} | commit {env['commit']}"
    paths = []
    for kind, fname, metric, ylabel in (("model", "models.png", "throughput_per_s", "images / s (higher is better)"),
                                        ("op", "ops.png", "median_ms", "median ms (lower is better)"),
                                        ("attention", "attention.png", "median_ms", "median ms (lower is better)")):
        rows = [r for r in result["rows"] if r["benchmark"] == kind]
        if not rows:
            continue
        groups = [r["name"] + ("" if kind == "model" else f"\n{r['mode']}") for r in rows]
        # competitors in order of first appearance (an identity row has no eager / compiled); a row
        # without one of them shows no bar there
        comps = list(dict.fromkeys(c for r in rows for c in r["competitors"]))
        entries = {c: [r["competitors"].get(c) for r in rows] for c in comps}
        series = {c: [float("nan") if e is None else e[metric] for e in entries[c]] for c in comps}
        errors = {c: _errors(entries[c], metric) for c in comps}
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows) * len(comps) + 2), 4.5))
        _grouped_bars(ax, groups, series, ylabel + "; bars: interquartile range", errors)
        shape = rows[0].get("shape")
        title = {"model": "Model throughput", "op": f"add + noise + LayerNorm, shape {shape}",
                 "attention": f"noisy attention vs SDPA + eager noise, shape {shape}"}[kind]
        ax.set_title(f"{title} ({rows[0]['dtype']})\n{subtitle}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    sweep = sorted((r for r in result["rows"] if r["benchmark"] == "op_sweep"),
                   key=lambda r: r["shape"][0] * r["shape"][1] * r["shape"][2])
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        sizes = [r["shape"][0] * r["shape"][1] * r["shape"][2] for r in sweep]
        for comp in sweep[0]["competitors"]:
            entries = [r["competitors"][comp] for r in sweep]
            ax.errorbar(sizes, [e["median_ms"] for e in entries], yerr=_errors(entries, "median_ms"), fmt="o-",
                        label=comp, color=_COLORS.get(comp), capsize=2, elinewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements B*N*D (B = " + ", ".join(str(r["shape"][0]) for r in sweep) + ")")
        ax.set_ylabel("median ms (lower is better); bars: interquartile range")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax.set_title(f"{sweep[0]['name']} {sweep[0]['mode']} vs size ({sweep[0]['dtype']})\n{subtitle}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, "op_sizes.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    bw_rows = [r for r in result["rows"] if r["benchmark"] == "op"
               and "pct_of_copy_bandwidth" in r["competitors"].get("noisynn", {})]
    if bw_rows:
        comps = [c for c in bw_rows[0]["competitors"] if "pct_of_copy_bandwidth" in bw_rows[0]["competitors"][c]]
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bw_rows) + 2), 4.5))
        _grouped_bars(ax, [f"{r['name']}\n{r['mode']}" for r in bw_rows],
                      {c: [r["competitors"][c]["pct_of_copy_bandwidth"] for r in bw_rows] for c in comps},
                      "% of measured copy bandwidth")
        ax.axhline(80, color="k", lw=0.8, ls="--")
        ax.set_title(f"add + noise + LayerNorm bandwidth, copy roof {env.get('copy_bandwidth_gbps', 0):.0f} GB/s "
                     f"({bw_rows[0]['dtype']})\n{subtitle}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, "bandwidth.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
