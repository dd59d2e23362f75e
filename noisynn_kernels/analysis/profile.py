"""Where a training step's time goes: :func:`profile_training` runs a few training steps of a model
under ``torch.profiler`` and splits the step's operator time into :data:`CATEGORIES`.

The split reads the profiler's ``key_averages()``: every operator's *self* time (CPU time on CPU; on
CUDA the device time of the kernels each operator launched), so nothing is counted twice and the
shares add up to the whole profiled time.  Operators are classified by name (:func:`classify`): the
package's own ops (``noisynn::*`` and their kernels), LayerNorm and residual adds, attention
(scaled-dot-product attention, softmax), matmuls and convolutions, and the rest (activations, the
optimizer, copies, Python overhead inside profiled ranges, device time no operator claimed).

Time per step and images per second come from separate, un-profiled timed steps, run side by side when
several models are compared (the profiler's own overhead would inflate them; a busy machine slows
interleaved models alike).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._checks import check_model, positive_int

__all__ = ["CATEGORIES", "CATEGORY_NAMES", "classify", "ProfileResult", "profile_models", "profile_training",
           "input_size_of", "format_table"]

#: Categories of :func:`classify`, in table order.
CATEGORIES = ("noisynn", "layernorm_add", "attention", "matmul", "rest")

#: Column titles of the categories.
CATEGORY_NAMES = {"noisynn": "noisynn ops", "layernorm_add": "LayerNorm/add", "attention": "attention",
                  "matmul": "matmul/conv", "rest": "rest"}

# Substrings of operator and kernel names, by category (checked in this order; names are lower-cased).
_NOISYNN = ("noisynn", "mix_add_layernorm", "mixaddlayernorm", "mix_ln_rows_kernel", "noisy_attention",
            "noisyattention", "salt_and_pepper", "saltandpepper", "gaussian_noise", "gaussiannoise",
            "attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "sum_partials_kernel")
_ATTENTION = ("scaled_dot_product", "scaleddotproduct", "attention", "softmax", "flash", "fmha")
_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "mmbackward",
           "addmmbackward", "bmmbackward", "linearbackward", "conv", "gemm", "cublas", "cutlass", "xmma", "nvjet")
_LAYERNORM = ("layer_norm", "layernorm")
_ADD = ("aten::add", "aten::add_", "addbackward0")


def classify(name: str) -> str:
    """The category of an operator or kernel name (see :data:`CATEGORIES`)."""
    n = name.lower()
    if n.startswith("autograd::engine::evaluate_function: "):
        n = n.split(": ", 1)[1]
    if any(s in n for s in _NOISYNN):
        return "noisynn"
    if any(s in n for s in _ATTENTION):
        return "attention"
    if any(s in n for s in _LAYERNORM) or n in _ADD:
        return "layernorm_add"
    if any(s in n for s in _MATMUL):
        return "matmul"
    return "rest"


@dataclass
class ProfileResult:
    """What :func:`profile_training` measured for one model.

    Attributes:
        label: the name given (e.g. ``plain timm``, ``eager noisy``, ``fused``).
        batch_size, steps: the training steps timed and profiled.
        input_size: ``(C, H, W)`` of the inputs.
        device: where it ran; amp: the autocast dtype (``None``: off).
        step_seconds: median wall time of one un-profiled training step; step_seconds_spread: the
            min-max range of those steps.
        images_per_second: ``batch_size / step_seconds``.
        profiled_ms_per_step: operator time per profiled step (CPU self time, or device time on CUDA).
        shares: per category, its fraction of ``profiled_ms_per_step`` (they sum to 1).
        ms_per_step: per category, milliseconds per step.
        calls_per_step: per category, operator calls per step (the structure of the step, free of timing
            noise: a fused model makes fewer LayerNorm / add calls and some noisynn calls).
        top_ops: the operators with the most self time: ``name``, ``category``, ``ms_per_step``, ``calls``
            (per step).
        trace: path of the Chrome trace (``None`` when not written).
    """

    label: str
    batch_size: int
    steps: int
    input_size: tuple[int, int, int]
    device: str
    amp: str | None
    step_seconds: float
    step_seconds_spread: tuple[float, float]
    images_per_second: float
    profiled_ms_per_step: float
    shares: dict[str, float]
    ms_per_step: dict[str, float]
    calls_per_step: dict[str, float] = field(default_factory=dict)
    top_ops: list[dict] = field(default_factory=list)
    trace: str | None = None

    def to_dict(self) -> dict:
        """Plain-data form for JSON."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["step_seconds_spread"] = list(self.step_seconds_spread)
        return d


def input_size_of(model: nn.Module) -> tuple[int, int, int] | None:
    """``(C, H, W)`` a timm model was built for: a ViT's ``patch_embed`` geometry, else its
    ``pretrained_cfg['input_size']``; ``None`` when neither says."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    proj = getattr(pe, "proj", None)
    if img is not None and isinstance(getattr(proj, "in_channels", None), int):
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return (proj.in_channels, int(h), int(w))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if size is not None and len(size) == 3:
        c = getattr(getattr(model, "conv1", None), "in_channels", None)
        return (int(c) if isinstance(c, int) else int(size[0]), int(size[1]), int(size[2]))
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trainer:
    """One model's training step on fixed random inputs (AdamW, optional autocast / gradient scaler)."""

    def __init__(self, model, *, batch_size, input_size, num_classes, device, amp, lr, seed):
        check_model(model)
        if input_size is None:
            input_size = input_size_of(model)
            if input_size is None:
                raise ConfigError(f"cannot tell the input size of {type(model).__name__}; pass input_size=(C, H, W)")
        input_size = tuple(int(v) for v in input_size)
        if len(input_size) != 3 or min(input_size) < 1:
            raise ConfigError(f"input_size must be (C, H, W) of positive ints, got {input_size!r}")
        if num_classes is None:
            num_classes = getattr(model, "num_classes", None)
        num_classes = positive_int("num_classes", num_classes)
        p = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (p.device if p is not None
                                                                       else torch.device("cpu"))
        self.model, self.amp, self.input_size = model.to(self.device).train(), amp, input_size
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch_size, *input_size, generator=g).to(self.device)
        self.y = torch.randint(0, num_classes, (batch_size,), generator=g).to(self.device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.scaler = (torch.amp.GradScaler(self.device.type) if (amp == torch.float16 and self.device.type == "cuda")
                       else None)

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()

    def timed_step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - t0


def _shares(prof, device: torch.device, steps: int, label: str, top: int):
    """``(totals in us per category, top operators)`` of a finished profile."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    calls = dict.fromkeys(CATEGORIES, 0.0)
    ops = []
    attributed_device = kernel_device = noisynn_kernels = 0.0
    for evt in prof.key_averages():
        is_kernel = str(getattr(evt, "device_type", "")).endswith("CUDA")
        if device.type == "cuda":
            us = float(getattr(evt, "self_device_time_total", 0.0))
            if is_kernel:
                # kernels themselves: only to find device time no operator claimed, and the package's own
                # kernels (named after their op) among it
                kernel_device += us
                if classify(evt.key) == "noisynn":
                    noisynn_kernels += us
                continue
            attributed_device += us
        else:
            us = float(evt.self_cpu_time_total)
        cat = classify(evt.key)
        calls[cat] += evt.count / steps
        if us <= 0:
            continue
        totals[cat] += us
        ops.append((us, evt.key, cat, evt.count))
    if device.type == "cuda" and kernel_device > attributed_device:
        unclaimed = kernel_device - attributed_device
        # a package kernel whose launch no operator claimed is still the package's
        moved = min(unclaimed, max(0.0, noisynn_kernels - totals["noisynn"]))
        totals["noisynn"] += moved
        totals["rest"] += unclaimed - moved
    if sum(totals.values()) <= 0:
        raise ConfigError(f"the profiler recorded no operator time for {label!r}; expected a model that runs "
                          "aten operators")
    ops.sort(reverse=True)
    return totals, calls, [{"name": name, "category": cat, "ms_per_step": us / 1e3 / steps, "calls": count / steps}
                    for us, name, cat, count in ops[:top]]


def profile_models(models: dict[str, nn.Module], *, batch_size: int = 8, steps: int = 5, warmup: int = 2,
                   input_size: tuple[int, int, int] | None = None, num_classes: int | None = None, device=None,
                   amp: torch.dtype | None = None, lr: float = 1e-3, trace_paths: dict[str, str] | None = None,
                   seed: int = 0, top: int = 12) -> list[ProfileResult]:
    """Profile the training step of every model of ``models`` (label -> model; trained in place on the same
    random inputs and labels); returns one :class:`ProfileResult` per model, in order.

    Every model first runs ``warmup`` steps; then ``steps`` timed rounds run one step of each model in turn
    (side by side, so that a busy machine slows them alike and their ratios hold), then each model runs
    ``steps`` more under ``torch.profiler`` (CPU activity, and CUDA on a GPU).  A step is forward,
    cross-entropy, backward and an AdamW update (``lr``), under ``torch.autocast`` with ``amp`` when given
    (float16 on CUDA uses a ``GradScaler``).  ``input_size`` defaults to :func:`input_size_of`,
    ``num_classes`` to the model's ``num_classes``.  ``trace_paths[label]``: write that model's profiled
    steps as a Chrome trace (``chrome://tracing``, Perfetto).
    """
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"models must be a non-empty dict of label -> model, got {type(models).__name__}")
    batch_size = positive_int("batch_size", batch_size)
    steps = positive_int("steps", steps)
    warmup = positive_int("warmup", warmup, minimum=0)
    top = positive_int("top", top)
    if amp is not None and amp not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"amp must be torch.float16, torch.bfloat16 or None, got {amp!r}")
    trainers = {label: _Trainer(m, batch_size=batch_size, input_size=input_size, num_classes=num_classes,
                                device=device, amp=amp, lr=lr, seed=seed) for label, m in models.items()}
    for t in trainers.values():
        for _ in range(warmup):
            t.step()
    times: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(steps):
        for label, t in trainers.items():
            times[label].append(t.timed_step())

    from torch.profiler import ProfilerActivity, profile, record_function

    results = []
    for label, t in trainers.items():
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(steps):
                with record_function(f"train_step_{i}"):
                    t.step()
            _sync(t.device)
        trace = (trace_paths or {}).get(label)
        if trace:
            prof.export_chrome_trace(trace)
        totals, calls, top_ops = _shares(prof, t.device, steps, label, top)
        total = sum(totals.values())
        median = statistics.median(times[label])
        results.append(ProfileResult(
            label=label, batch_size=batch_size, steps=steps, input_size=t.input_size, device=str(t.device),
            amp=None if amp is None else str(amp).replace("torch.", ""), step_seconds=median,
            step_seconds_spread=(min(times[label]), max(times[label])), images_per_second=batch_size / median,
            profiled_ms_per_step=total / 1e3 / steps, shares={c: totals[c] / total for c in CATEGORIES},
            ms_per_step={c: totals[c] / 1e3 / steps for c in CATEGORIES}, calls_per_step=calls, top_ops=top_ops,
            trace=trace))
    return results


def profile_training(model: nn.Module, *, label: str = "model", trace_path: str | None = None,
                     **kwargs) -> ProfileResult:
    """:func:`profile_models` of one model: ``warmup`` steps, ``steps`` timed, ``steps`` profiled (keyword
    arguments as there; ``trace_path`` for its Chrome trace)."""
    return profile_models({label: model}, trace_paths={label: trace_path} if trace_path else None, **kwargs)[0]


def format_table(results: list[ProfileResult]) -> str:
    """The results side by side: time per step, images/s and the category shares (one column each)."""
    head = ["", *[r.label for r in results]]
    rows = [["time per step (ms)", *[f"{1e3 * r.step_seconds:.2f}" for r in results]],
            ["images/s", *[f"{r.images_per_second:.1f}" for r in results]],
            ["profiled op time (ms/step)", *[f"{r.profiled_ms_per_step:.2f}" for r in results]]]
    for c in CATEGORIES:
        rows.append([f"  {CATEGORY_NAMES[c]}", *[f"{100 * r.shares[c]:5.1f}%" for r in results]])
    if len(results) > 1:
        base = results[0]
        rows.append([f"speed-up vs {base.label}", *[f"{base.step_seconds / r.step_seconds:.2f}x" for r in results]])
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

