"""The ratios a CPU benchmark run is judged by, from one or more ``noisynn_bench.json`` results, as a
Markdown table (``python -m noisynn_kernels.bench.summary RESULT_DIR_OR_JSON...``).

Per op row (shape, kind / axis, mode): fused time over ``F.layer_norm(x + residual)`` (the floor: 1.0
means the fused op costs what a plain add + LayerNorm costs), the speed-up over ``compiled_ref``
(``torch.compile`` of the package's O(k d) formulation), over ``compiled`` and over ``eager``.  Per model
row: swapped over plain timm, and ``torch.compile`` of the swapped model over ``torch.compile`` of
plain timm.  Every ratio is the median of round-by-round ratios, with the interquartile range of
those ratios in brackets where the result records its rounds (``times_ms``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

__all__ = ["load_results", "op_summary_rows", "model_summary_rows", "format_summary", "main"]


def load_results(paths: list[str]) -> list[dict]:
    """The results at ``paths``: ``noisynn_bench.json`` files, or folders searched for them (recursively)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                files += [os.path.join(root, n) for n in sorted(names) if n == "noisynn_bench.json"]
        else:
            files.append(p)
    out = []
    for f in files:
        with open(f) as fh:
            out.append(json.load(fh))
    return out


def _ratio(row: dict, comp: str, base: str) -> float | None:
    """Speed-up of ``comp`` over ``base`` in ``row`` (``base`` time / ``comp`` time), or ``None``."""
    c = row["competitors"].get(comp)
    if c is None or base not in row["competitors"]:
        return None
    return c["speedup_vs"].get(base)


def _ratio_iqr(row: dict, comp: str, base: str, invert: bool = False) -> tuple[float, float] | None:
    """Quartiles of the round-by-round ratios ``base / comp`` (``comp / base`` with ``invert``), where the
    row records its rounds (``times_ms``), else ``None``."""
    c, b = row["competitors"].get(comp), row["competitors"].get(base)
    if c is None or b is None or "times_ms" not in c or "times_ms" not in b:
        return None
    r = [(ct / bt) if invert else (bt / ct) for ct, bt in zip(c["times_ms"], b["times_ms"])]
    if len(r) < 4:
        return min(r), max(r)
    q = statistics.quantiles(r, n=4)
    return q[0], q[2]


def _fmt(v: float | None, iqr: tuple[float, float] | None = None, suffix: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}{suffix}" + ("" if iqr is None else f" [{iqr[0]:.2f}, {iqr[1]:.2f}]")


def op_summary_rows(results: list[dict]) -> list[dict]:
    """One dict per op row of ``results``: ``shape``, ``dtype``, ``name``, ``mode``, ``vs_layernorm`` (fused
    time / add + LayerNorm time), ``vs_compiled_ref``, ``vs_compiled``, ``vs_eager`` (speed-ups)."""
    rows = []
    for res in results:
        for r in res["rows"]:
            if r["benchmark"] not in ("op", "op_sweep") or "noisynn" not in r["competitors"]:
                continue
            ln = _ratio(r, "noisynn", "layernorm")
            rows.append({"shape": tuple(r["shape"]), "dtype": r["dtype"], "name": r["name"], "mode": r["mode"],
                         "vs_layernorm": None if ln is None else 1 / ln,
                         "vs_layernorm_iqr": _ratio_iqr(r, "noisynn", "layernorm", invert=True),
                         "vs_compiled_ref": _ratio(r, "noisynn", "compiled_ref"),
                         "vs_compiled_ref_iqr": _ratio_iqr(r, "noisynn", "compiled_ref"),
                         "vs_compiled": _ratio(r, "noisynn", "compiled"), "vs_eager": _ratio(r, "noisynn", "eager")})
    return rows


def model_summary_rows(results: list[dict]) -> list[dict]:
    """One dict per model row: ``model``, ``mode``, ``batch_size``, ``dtype``, ``rounds``, ``swapped_vs_timm``
    and ``compiled_swapped_vs_compiled_timm`` (speed-ups, ``None`` where not measured)."""
    rows = []
    for res in results:
        for r in res["rows"]:
            if r["benchmark"] != "model":
                continue
            rows.append({"model": r["model"], "mode": r["mode"], "batch_size": r["batch_size"], "dtype": r["dtype"],
                         "rounds": r["competitors"]["noisynn"]["repeats"],
                         "swapped_vs_timm": _ratio(r, "noisynn", "timm"),
                         "swapped_vs_timm_iqr": _ratio_iqr(r, "noisynn", "timm"),
                         "compiled_swapped_vs_compiled_timm": _ratio(r, "compiled_noisynn", "compiled_ref"),
                         "compiled_swapped_vs_compiled_timm_iqr": _ratio_iqr(r, "compiled_noisynn", "compiled_ref")})
    return rows


def format_summary(results: list[dict]) -> str:
    """The op and model ratio tables (Markdown)."""
    lines = []
    ops = op_summary_rows(results)
    if ops:
        lines += ["| shape | dtype | kind/axis | mode | fused / (add + LayerNorm) | vs compiled_ref | vs compiled "
                  "| vs eager |", "|---|---|---|---|---|---|---|---|"]
        for o in sorted(ops, key=lambda o: (o["shape"][0] * o["shape"][2], o["dtype"], o["mode"], o["name"])):
            lines.append(f"| ({', '.join(map(str, o['shape']))}) | {o['dtype']} | {o['name']} | {o['mode']} | "
                         f"{_fmt(o['vs_layernorm'], o['vs_layernorm_iqr'])} | "
                         f"{_fmt(o['vs_compiled_ref'], o['vs_compiled_ref_iqr'], 'x')} | "
                         f"{_fmt(o['vs_compiled'], suffix='x')} | {_fmt(o['vs_eager'], suffix='x')} |")
    models = model_summary_rows(results)
    if models:
        if lines:
            lines.append("")
        lines += ["| model | mode | batch | dtype | rounds | swapped vs timm | compiled swapped vs compiled timm |",
                  "|---|---|---|---|---|---|---|"]
        for m in models:
            compiled = _fmt(m["compiled_swapped_vs_compiled_timm"], m["compiled_swapped_vs_compiled_timm_iqr"], "x")
            lines.append(f"| {m['model']} | {m['mode']} | {m['batch_size']} | {m['dtype']} | {m['rounds']} | "
                         f"{_fmt(m['swapped_vs_timm'], m['swapped_vs_timm_iqr'], 'x')} | {compiled} |")
    if ops or models:
        worst = [o["vs_layernorm"] for o in ops if o["vs_layernorm"] is not None]
        if worst:
            lines += ["", f"fused / (add + LayerNorm): median {statistics.median(worst):.2f}, worst {max(worst):.2f} "
                          f"over {len(worst)} op rows"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m noisynn_kernels.bench.summary PATH...``: print the summary of the results at the paths."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m noisynn_kernels.bench.summary RESULT_DIR_OR_JSON...", file=sys.stderr)
        return 2
    try:
        results = load_results(argv)
    except OSError as e:
        print(f"cannot read results: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"no noisynn_bench.json under {argv}", file=sys.stderr)
        return 2
    print(format_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
