"""PNG plots of a ``noisynn bench`` result: model throughput per competitor, op time per competitor, op
time vs size, and on GPU the achieved fraction of the device's copy bandwidth."""

from __future__ import annotations

import os

__all__ = ["write_plots"]

_COLORS = {"timm": "#7f7f7f", "eager": "#d62728", "noisynn": "#1f77b4", "layernorm": "#2ca02c",
           "compiled": "#ff7f0e", "sdpa": "#9467bd"}


def _grouped_bars(ax, groups: list[str], series: dict, ylabel: str) -> None:
    names = list(series)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, series[name], width, label=name, color=_COLORS.get(name))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def write_plots(result: dict, out_dir: str) -> list[str]:
    """Write ``models.png`` (throughput, higher is better), ``ops.png`` (median time, lower is better),
    ``op_sizes.png`` (op time vs size) and, for GPU runs, ``bandwidth.png`` (% of copy bandwidth) for
    the rows present; returns the paths written."""
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
        comps = list(rows[0]["competitors"])
        series = {c: [r["competitors"][c][metric] for r in rows] for c in comps}
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
        _grouped_bars(ax, groups, series, ylabel)
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
            ax.plot(sizes, [r["competitors"][comp]["median_ms"] for r in sweep], "o-", label=comp,
                    color=_COLORS.get(comp))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements B*N*D (B = " + ", ".join(str(r["shape"][0]) for r in sweep) + ")")
        ax.set_ylabel("median ms (lower is better)")
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
