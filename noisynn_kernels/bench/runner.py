"""``noisynn bench``: op microbenchmarks and model throughput, competitors side by side in one run.

Competitors:

- ops (residual add + noise + LayerNorm at a ViT noise site; :func:`op_competitors`): ``eager``
  (public NoisyViT code: split the class token, permute, dense ``k x k`` product, add, transpose,
  concatenate, LayerNorm), ``noisynn`` (this package), ``layernorm`` (``F.layer_norm(x + residual)``
  with no noise: the floor) and, with ``compile``, ``compiled`` (``torch.compile`` of the eager path)
  and ``compiled_ref`` (``torch.compile`` of the package's own O(k d) formulation,
  :func:`noisynn_kernels.reference.mix_add_layernorm`: the strongest competitor).  Kinds ``identity``
  (``mix=None``: every add + LayerNorm pair of a swapped model but the noise site; one row per mode),
  ``optimal``, ``shift`` and ``dense`` (a real ``k x k`` product);
- op sweep: the same op over growing batch sizes (time vs size);
- models: ``timm`` (the plain model, no noise), ``eager`` (the noisy model with the public-code
  noise), ``noisynn`` (the noisy model as this package builds it, fused ops swapped in for ViTs) and,
  with ``compile``, ``compiled`` (``torch.compile`` of the eager noisy model), ``compiled_ref``
  (``torch.compile`` of plain timm) and ``compiled_noisynn`` (``torch.compile`` of the swapped noisy
  model), all with the same weights.

Every row of the JSON result records the environment (device, versions, commit) and, per competitor,
median time, quartiles, spread (interquartile range over the median) and speed-up ratios taken round
by round against the baselines.  On CUDA, op rows
also carry the achieved bandwidth (GB/s, counting the bytes an ideal fused kernel must move) and its
fraction of the device's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import quality, reference
from .._ext import select_backend
from .._progress import Progress
from ..config import NoiseConfig
from ..functional import mix_add_layernorm
from .eager import eager_add_noise_layernorm, make_eager

# MALLOC_ENV, device_name and malloc_setting are imported for the callers that take them from here.
from .environment import MALLOC_ENV, device_name, environment, malloc_setting  # noqa: F401
from .timing import Timing, measure_interleaved

__all__ = ["BenchOptions", "run", "environment", "format_table", "op_competitors", "op_bytes",
           "copy_bandwidth_gbps"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class BenchOptions:
    """What ``noisynn bench`` runs (the CLI flags map one to one)."""

    models: list[str] = field(default_factory=lambda: ["noisy_vit_tiny_patch16_224", "noisy_resnet18"])
    batch_size: int = 8
    img_size: int = 224
    dtype: str = "float32"
    device: str = "auto"
    noise: NoiseConfig | None = None
    ops: bool = True
    op_shape: tuple = (64, 197, 768)
    op_kinds: tuple = ("identity", "optimal", "shift", "dense")
    op_axes: tuple = ("tokens", "rows")
    modes: tuple = ("forward", "forward+backward")
    op_sizes: tuple = (8, 16, 32, 64)
    attention: bool = True
    attn_shape: tuple = (8, 12, 197, 64)
    backend: str | None = None
    compile: bool = False
    channels_last: bool = False
    amp: str | None = None
    warmup: int = 2
    iters: int = 10
    out: str = "bench_out"
    quiet: bool = False


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _row(kind: str, name: str, config: dict, timings: dict[str, Timing], baselines: list[str], env: dict,
         items_per_call: int | None = None) -> dict:
    comps = {}
    for comp, t in timings.items():
        q1, q3 = t.quartiles
        entry = {"median_ms": t.median * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "spread": t.spread,
                 "repeats": len(t.times), "times_ms": [v * 1e3 for v in t.times]}
        if items_per_call:
            # throughput quartiles: the faster quartile of time is the higher one of throughput
            entry["throughput_per_s"] = items_per_call / t.median
            entry["throughput_q1_per_s"] = items_per_call / q3
            entry["throughput_q3_per_s"] = items_per_call / q1
        entry["speedup_vs"] = {b: t.ratio_to(timings[b]) for b in baselines if b != comp}
        comps[comp] = entry
    return {"benchmark": kind, "name": name, **config, "competitors": comps, **env}


def op_bytes(shape, dtype, mode: str) -> int:
    """Bytes an ideal fused add + mix + LayerNorm must move: forward reads ``x`` and ``residual`` and
    writes ``normed`` and ``residual_out`` (4 tensors); forward+backward adds reading ``d_normed`` and
    the saved ``residual_out`` and writing ``dx`` (7 tensors).  Parameters and statistics are negligible."""
    B, N, D = shape
    tensors = 4 if mode == "forward" else 7
    return tensors * B * N * D * torch.empty((), dtype=dtype).element_size()


def copy_bandwidth_gbps(device, nbytes: int = 1 << 29, iters: int = 20) -> float:
    """The device's achievable memory bandwidth, measured as a device-to-device copy of ``nbytes``
    (read + write counted): the roof that a memory-bound kernel's GB/s is compared with."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def _bench_matrix(kind: str, k: int) -> torch.Tensor:
    """``Q`` of a benchmarked kind over ``k`` rows, float64: the structured kinds' own matrix, and for
    ``dense`` a fixed pseudo-random one (entries in ``[0, 1/k)``, so ``I + Q`` is strictly diagonally
    dominant and invertible): a real ``k x k`` product with no structure to exploit."""
    if kind == "dense":
        g = torch.Generator(device="cpu").manual_seed(1)
        return torch.rand(k, k, generator=g, dtype=torch.float64) / k
    return quality.mixing_matrix(kind, k) - torch.eye(k, dtype=torch.float64)


def op_competitors(opts: BenchOptions, device, dtype, kind: str, axis: str | None, mode: str, shape=None):
    """The op benchmark's competitors as zero-argument callables, over one set of inputs of ``shape``
    (default ``opts.op_shape``), and the row's configuration fields.  Each callable's ``compute``
    attribute returns the competitor's output instead of timing it.

    - ``noisynn``: this package's public :func:`~noisynn_kernels.mix_add_layernorm`;
    - ``layernorm``: ``F.layer_norm(x + residual)``, no noise (the floor);
    - ``eager`` (noisy kinds): the public NoisyViT code path (dense ``k x k`` product, permutes);
    - with ``opts.compile``: ``compiled``, ``torch.compile`` of the eager path (noisy kinds), and
      ``compiled_ref``, ``torch.compile`` of the package's O(k d) formulation
      (:func:`noisynn_kernels.reference.mix_add_layernorm`: a roll or a column sum, the add,
      ``F.layer_norm``; for ``dense`` its matrix product), the strongest competitor.

    ``kind='identity'`` (``axis`` ``None``) is the op with ``mix=None``, what a swapped model runs at
    every add + LayerNorm pair that is not the noise site: it has no ``eager`` / ``compiled`` (both
    would be ``layernorm``)."""
    B, N, D = opts.op_shape if shape is None else shape
    prefix = 1
    gh = int((N - prefix) ** 0.5)
    grid = (gh, (N - prefix) // gh)
    identity = kind == "identity"
    axis = None if identity else axis
    k = N - prefix if axis == "tokens" else grid[0]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(device, dtype)
    res = torch.randn(B, N, D, generator=g).to(device, dtype)
    w = torch.randn(D, generator=g).to(device, dtype)
    b = torch.randn(D, generator=g).to(device, dtype)
    q64 = None if identity else _bench_matrix(kind, k)
    Q = None if identity else q64.to(device, dtype)
    M = None if kind != "dense" else (torch.eye(k, dtype=torch.float64) + q64).to(device, dtype)
    backward = mode == "forward+backward"
    if backward:
        for t in (x, res, w, b):
            t.requires_grad_(True)
    gy = torch.randn(B, N, D, generator=g).to(device, dtype)

    def eager():
        return eager_add_noise_layernorm(x, res, Q, w, b, 1e-6, axis, prefix, grid)[0]

    backend = select_backend(device.type, opts.backend)
    if identity:
        mix = None
    elif kind == "dense":
        mix = NoiseConfig(kind="dense", axis=axis, matrix=q64)
    else:
        mix = NoiseConfig(kind=kind, axis=axis)
    ref_kw = dict(kind=kind, axis=axis or "tokens", alpha=quality.DEFAULT_ALPHA, M=M, prefix_tokens=prefix,
                  grid=grid if axis == "rows" else None)

    def ours():
        return mix_add_layernorm(x, res, w, b, 1e-6, mix=mix, prefix_tokens=prefix, grid=grid, backend=backend)[0]

    def layernorm():
        return F.layer_norm(x + res, (D,), w, b, 1e-6)

    def call(fn: Callable) -> Callable:
        """The timed callable (returns nothing); ``.compute`` is ``fn`` itself, returning the output, so
        callers (tests) can check that every competitor computes the same thing."""
        if not backward:
            def run():
                with torch.no_grad():
                    fn()
            run.compute = fn
            return run

        def run_bwd():
            out = fn()
            out.backward(gy)
            for t in (x, res, w, b):
                t.grad = None
        run_bwd.compute = fn
        return run_bwd

    fns = {"noisynn": call(ours), "layernorm": call(layernorm)}
    if not identity:
        fns = {"eager": call(eager), **fns}
    if opts.compile:
        torch._dynamo.reset()  # fresh compiled graphs per benchmark; no recompile limit across benchmarks
        if not identity:
            eager_compiled = torch.compile(eager_add_noise_layernorm, dynamic=False)

            def compiled():
                return eager_compiled(x, res, Q, w, b, 1e-6, axis, prefix, grid)[0]

            fns["compiled"] = call(compiled)
        ref_compiled = torch.compile(reference.mix_add_layernorm, dynamic=False)

        def compiled_ref():
            return ref_compiled(x, res, w, b, 1e-6, **ref_kw)[0]

        fns["compiled_ref"] = call(compiled_ref)
        for name in ("compiled", "compiled_ref"):
            if name in fns:
                fns[name]()  # compile now, outside the timed rounds
    cfg = {"op": "add+noise+layernorm", "kind": kind, "axis": axis, "mode": mode, "shape": [B, N, D],
           "dtype": str(dtype).replace("torch.", ""), "backend": backend, "prefix_tokens": prefix}
    return fns, cfg


#: The baselines every competitor's speed-up is taken against, where present in a row.
OP_BASELINES = ("eager", "layernorm", "compiled", "compiled_ref")


def op_name(kind: str, axis: str | None) -> str:
    """The row name of an op benchmark: ``kind/axis``, or ``identity`` for the op without a mix."""
    return "identity" if kind == "identity" else f"{kind}/{axis}"


def _op_bench(opts: BenchOptions, device, dtype, kind, axis, mode, env, shape=None, bench="op") -> dict:
    fns, cfg = op_competitors(opts, device, dtype, kind, axis, mode, shape)
    timings = measure_interleaved(fns, warmup=opts.warmup, iters=opts.iters, device=device)
    baselines = [b for b in OP_BASELINES if b in fns]
    row = _row(bench, op_name(kind, axis), cfg, timings, baselines, env)
    if device.type == "cuda":
        nbytes = op_bytes(cfg["shape"], dtype, mode)
        row["bytes_moved_ideal"] = nbytes
        for comp, t in timings.items():
            gbps = nbytes / t.median / 1e9
            row["competitors"][comp]["gb_per_s"] = gbps
            if env.get("copy_bandwidth_gbps"):
                row["competitors"][comp]["pct_of_copy_bandwidth"] = 100 * gbps / env["copy_bandwidth_gbps"]
    return row


#: The compiled model competitors (``--compile``): ``torch.compile`` of the eager noisy model, of the
#: plain timm model (the reference for the swapped one) and of the swapped noisy model.
COMPILED_MODELS = ("compiled", "compiled_ref", "compiled_noisynn")


def _model_bench(opts: BenchOptions, device, dtype, name, mode, env) -> dict:
    import timm

    from ..models.registry import base_model_name

    torch.manual_seed(0)
    kw = dict(num_classes=1000)
    if "vit" in name:
        kw["img_size"] = opts.img_size
    noise = opts.noise if opts.noise is not None else NoiseConfig()
    plain = timm.create_model(base_model_name(name), **kw)
    ours = timm.create_model(name, noise=noise, **kw)
    backend = select_backend(device.type, opts.backend)
    if "vit" in name:
        from ..models.fused import swap_fused_ops

        swap_fused_ops(ours, backend=backend)
    eager = make_eager(timm.create_model(name, noise=noise, **kw))
    models = {"timm": plain, "eager": eager, "noisynn": ours}
    if opts.compile:
        # each compiled competitor on its own copy of the weights (its own optimizer steps them)
        models["compiled"] = make_eager(timm.create_model(name, noise=noise, **kw))
        models["compiled_ref"] = timm.create_model(base_model_name(name), **kw)
        swapped = timm.create_model(name, noise=noise, **kw)
        if "vit" in name:
            from ..models.fused import swap_fused_ops

            swap_fused_ops(swapped, backend=backend)
        models["compiled_noisynn"] = swapped
    for comp, m in models.items():
        if comp != "timm":
            m.load_state_dict(plain.state_dict(), strict=True)
    B = opts.batch_size
    g = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    x = torch.randn(B, 3, opts.img_size, opts.img_size, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (B,), generator=g).to(device)
    amp = _DTYPES[opts.amp] if opts.amp else None
    if opts.compile:
        torch._dynamo.reset()
    fns = {}
    for comp, m in models.items():
        m.to(device=device, dtype=dtype, memory_format=fmt)
        fwd = torch.compile(m) if comp in COMPILED_MODELS else m

        def forward(fwd=fwd):
            if amp is None:
                return fwd(x)
            with torch.autocast(device.type, dtype=amp):
                return fwd(x)

        if mode == "inference":
            m.eval()

            def fn(forward=forward):
                with torch.no_grad():
                    forward()
        else:
            m.train()
            opt = torch.optim.SGD(m.parameters(), lr=1e-4)

            def fn(forward=forward, opt=opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(forward().float(), y).backward()
                opt.step()
        if comp in COMPILED_MODELS:
            fn()  # compile now, outside the timed rounds
        fns[comp] = fn
    # A model step is many kernels reading their own recent outputs: no L2 flush between calls.
    timings = measure_interleaved(fns, warmup=max(1, opts.warmup // 2), iters=max(3, opts.iters // 2),
                                  device=device, flush_l2=False)
    cfg = {"model": name, "mode": mode, "batch_size": B, "img_size": opts.img_size,
           "dtype": str(dtype).replace("torch.", ""), "amp": opts.amp, "channels_last": opts.channels_last,
           "backend": backend if "vit" in name else "reference",
           "noise": {k: v for k, v in noise.to_dict().items() if v is not None}}
    baselines = ["eager", "timm"] + (["compiled", "compiled_ref"] if opts.compile else [])
    return _row("model", f"{name}/{mode}", cfg, timings, baselines, env, items_per_call=B)


def _attention_backend_arg(backend: str | None) -> str | None:
    # Attention has reference and Triton kernels only: a compiled cpu / cuda choice means the device default.
    return backend if backend in ("reference", "triton") else None


def run(opts: BenchOptions) -> dict:
    """Run the benchmarks ``opts`` asks for; write ``<out>/noisynn_bench.json`` and return the result."""
    device = _device(opts.device)
    dtype = _DTYPES[opts.dtype]
    env = environment(device)
    if device.type == "cuda":
        env["copy_bandwidth_gbps"] = copy_bandwidth_gbps(device)
    tasks: list[tuple] = []
    if opts.ops:
        tasks += [("op", k, a, m) for m in opts.modes for k in opts.op_kinds
                  for a in ((None,) if k == "identity" else opts.op_axes)]
        _, N, D = opts.op_shape
        tasks += [("op_sweep", (b, N, D)) for b in opts.op_sizes]
    if opts.attention:
        # (noisy attention: the structured kinds of the op rows)
        tasks += [("attention", k, m) for m in opts.modes for k in opts.op_kinds if k in ("optimal", "shift")]
    tasks += [("model", name, mode) for name in opts.models for mode in ("inference", "train")]
    progress = Progress(len(tasks), opts.quiet)
    if not opts.quiet:
        print(f"noisynn bench on {env['device']} ({opts.dtype}), torch {env['torch']}: {len(tasks)} benchmarks",
              file=sys.stderr, flush=True)
    rows = []
    for t in tasks:
        if t[0] == "op":
            rows.append(_op_bench(opts, device, dtype, t[1], t[2], t[3], env))
            progress.step(f"op {op_name(t[1], t[2])} {t[3]}")
        elif t[0] == "op_sweep":
            rows.append(_op_bench(opts, device, dtype, "optimal", "tokens", "forward", env, shape=t[1],
                                  bench="op_sweep"))
            progress.step(f"op sweep optimal/tokens forward, shape {t[1]}")
        elif t[0] == "attention":
            from .attention import bench_attention

            rows += bench_attention(device, dtype, [opts.attn_shape], opts.warmup, opts.iters, kinds=(t[1],),
                                    axes=("tokens",), modes=(t[2],), backend=_attention_backend_arg(opts.backend))
            progress.step(f"noisy attention {t[1]}/tokens {t[2]}, shape {opts.attn_shape}")
        else:
            rows.append(_model_bench(opts, device, dtype, t[1], t[2], env))
            progress.step(f"model {t[1]} {t[2]}")
    result = {"environment": env, "options": {k: (v.to_dict() if isinstance(v, NoiseConfig) else v)
                                              for k, v in vars(opts).items()}, "rows": rows}
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "noisynn_bench.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    result["path"] = path
    return result


def format_table(result: dict) -> str:
    """The result as a plain-text table: one line per benchmark and competitor."""
    lines = []
    hdr = (f"{'benchmark':<44} {'competitor':<16} {'median ms':>10} {'spread':>7} {'items/s':>9} "
           f"{'GB/s':>7} {'%copy':>6}  speed-up")
    lines += [hdr, "-" * len(hdr)]
    for row in result["rows"]:
        label = row["name"] + ("" if row["benchmark"] == "model" else f" {row['mode']}")
        if row.get("skipped"):
            lines.append(f"{label:<44} not timed: " + "; ".join(f"{k}: {v}" for k, v in row["skipped"].items()))
        if row["benchmark"] == "op_sweep":
            label += " " + "x".join(map(str, row["shape"]))
        for comp, c in row["competitors"].items():
            ips = f"{c['throughput_per_s']:9.1f}" if "throughput_per_s" in c else " " * 9
            bw = f"{c['gb_per_s']:7.0f}" if "gb_per_s" in c else " " * 7
            pct = f"{c['pct_of_copy_bandwidth']:5.0f}%" if "pct_of_copy_bandwidth" in c else " " * 6
            sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in c["speedup_vs"].items())
            lines.append(f"{label:<44} {comp:<16} {c['median_ms']:10.2f} {c['spread']:6.1%} {ips} {bw} {pct}  {sp}")
            label = ""
    return "\n".join(lines)
