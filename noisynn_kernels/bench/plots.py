"""PNG plots of a ``noisynn bench`` result: model throughput per competitor, op time per competitor."""

from __future__ import annotations

import os
from typing import List

__all__ = ["write_plots"]

_COLORS = {"timm": "#7f7f7f", "eager": "#d62728", "noisynn": "#1f77b4", "layernorm": "#2ca02c"}


def _grouped_bars(ax, groups: List[str], series: dict, ylabel: str) -> None:
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


def write_plots(result: dict, out_dir: str) -> List[str]:
    """Write ``models.png`` (throughput, higher is better) and ``ops.png`` (median time, lower is better)
    for the rows present; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = result["environment"]
    subtitle = f"{env['device']} | torch {env['torch']} | commit {env['commit']}"
    paths = []
    for kind, fname, metric, ylabel in (("model", "models.png", "throughput_per_s", "images / s (higher is better)"),
                                        ("op", "ops.png", "median_ms", "median ms (lower is better)")):
        rows = [r for r in result["rows"] if r["benchmark"] == kind]
        if not rows:
            continue
        groups = [r["name"] + ("" if kind == "model" else f"\n{r['mode']}") for r in rows]
        comps = list(rows[0]["competitors"])
        series = {c: [r["competitors"][c][metric] for r in rows] for c in comps}
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
        _grouped_bars(ax, groups, series, ylabel)
        title = "Model throughput" if kind == "model" else f"add + noise + LayerNorm, shape {rows[0]['shape']}"
        ax.set_title(f"{title} ({rows[0]['dtype']})\n{subtitle}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
