"""``noisynn kernels``: what every kernel variant the launchers pick costs on a GPU, found without one.

Each Triton kernel variant the launchers can pick at ViT shapes is compiled ahead of time with the real
Triton compiler for named targets (``sm_80``, ``sm_86``, ``sm_89``, ``sm_90``); the report gives, per
variant and target, the registers per thread, spill stores / loads and stack frame (from ``ptxas -v``,
the ptxas Triton itself runs), the shared memory per block, ``num_warps``, ``num_stages``, whether the
dots use tensor cores (``mma.sync`` / ``wgmma`` in the PTX), and whether the variant can launch:

- shared memory per block at most the target's opt-in limit (:data:`TARGETS`);
- at most 255 registers per thread and 65,536 per block (registers, allocated in units of 8 per thread,
  x 32 x ``num_warps``), at most 1,024 threads per block;
- grid axis 0 at most 2^31 - 1, axes 1 and 2 at most 65,535 (checked on every recorded launch);
- and, as a performance limit, at most :data:`MAX_SPILL_BYTES` bytes of spill stores + spill loads.

The variants are not re-derived by hand: the Triton ops' own bodies (``torch.library.triton_op``) run
on ``meta`` tensors with their module's ``wrap_triton`` replaced by a recorder, so the launch logic
(block sizes, ``num_warps``, tiles, constexprs, the integer and pointer specialization Triton applies
to the arguments) decides every variant.  Recorded launches are deduplicated by kernel, signature,
specialization, constexprs and options, and each unique one is compiled once per target.  Pointer
arguments are :class:`triton.runtime.jit.MockTensor` with the tensor's dtype and its byte offset in
its storage as the address (a real launch of tensors from the CUDA caching allocator, whose blocks
are aligned, gets the same alignment specialization).

The CUDA C++ kernels (``csrc/cuda/mix_add_layernorm.cu``) are compiled with ``nvcc -Xptxas -v`` and
the flags ``torch.utils.cpp_extension`` builds the extension with (``include_cuda``); their
dynamic shared memory is decided and checked on the host at launch, so ptxas reports only static
shared memory for them.

This is a tool (the top layer): nothing in the package imports it.  It needs compiled Triton kernels,
so it must run in a process where ``TRITON_INTERPRET`` was not ``1`` when the kernels were defined.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["TARGETS", "DEFAULT_TARGETS", "MAX_SPILL_BYTES", "LIMITS", "run", "format_table", "write", "dumps",
           "exit_code", "check_variant", "check_grid", "parse_ptxas_log", "kernel_names", "record_launches",
           "cuda_report", "ReportError"]

#: target name -> (compute capability, opt-in shared memory per block in bytes).
TARGETS = {
    "sm_80": (80, 166_912),
    "sm_86": (86, 101_376),
    "sm_89": (89, 101_376),
    "sm_90": (90, 232_448),
}
DEFAULT_TARGETS = ("sm_80", "sm_90")
#: Spill stores + spill loads above this many bytes fail the report.
MAX_SPILL_BYTES = 64
LIMITS = {
    "registers_per_thread": 255,
    "registers_per_block": 65_536,
    "threads_per_block": 1_024,
    "grid": (2 ** 31 - 1, 65_535, 65_535),
    "spill_bytes": MAX_SPILL_BYTES,
    "shared_per_block": {name: smem for name, (_, smem) in TARGETS.items()},
}

#: The kernel modules (``noisynn_kernels.triton.<name>``) and the op modules that launch them.
KERNEL_MODULES = ("mix_layernorm", "attention", "random_noise")

#: The ViT shapes of the enumeration.
TOKENS = 197            # 14 x 14 patches + the class token
PREFIX = 1
PATCH_GRID = (14, 14)
BATCH = 64              # the batch of the compiled launches
GRID_BATCH = 4096       # the largest batch whose launch grids are checked (recorded, not compiled again)
#: (8192 and 16384: rows the backward does in chunks; 16384: the forward too)
LN_DIMS = (192, 384, 768, 1024, 1280, 1536, 2048, 4096, 8192, 16384)
#: head dim -> heads (ViT-B/16: 12 x 64; ViT-H/14: 16 x 80; 8 x 128 as in 1024-wide models with 8 heads)
ATTN_HEADS = {64: 12, 80: 16, 128: 8}
KINDS = ("identity", "shift", "optimal", "dense")
AXES = ("tokens", "rows", "batch")
DTYPES = ("float16", "bfloat16", "float32")
#: Philox seeds of the random noises, one divisible by 16: the kernels do not specialize ``seed``
#: (``do_not_specialize``), so both give the same variant (else a drawn seed would pick one of two).
SEEDS = (12345, 12345 * 16)

_NVCC_SOURCE = os.path.join("csrc", "cuda", "mix_add_layernorm.cu")


class ReportError(RuntimeError):
    """The report cannot be made in this process (interpreted kernels, no Triton NVIDIA backend, ...)."""


# --------------------------------------------------------------------------------------------------
# limits


def check_variant(v: dict[str, Any], target: str) -> list[str]:
    """The limits a compiled variant ``v`` (a record of :func:`run`) breaks on ``target``; ``[]`` when it
    can launch and spills at most :data:`MAX_SPILL_BYTES` bytes.  Reads ``registers``, ``spill_stores``,
    ``spill_loads``, ``shared``, ``num_warps`` and optionally ``threads``; a variant that failed to compile
    (``error``) cannot launch."""
    problems = []
    if v.get("error"):
        return [f"does not compile: {v['error']}"]
    threads = int(v.get("threads") or 32 * int(v.get("num_warps") or 0))
    regs = v.get("registers")
    smem = v.get("shared")
    if regs is None:
        problems.append("no register count (ptxas log not found)")
    else:
        if regs > LIMITS["registers_per_thread"]:
            problems.append(f"{regs} registers per thread > {LIMITS['registers_per_thread']}")
        alloc = -(-regs // 8) * 8  # registers are allocated 256 per warp: 8 per thread
        if alloc * threads > LIMITS["registers_per_block"]:
            problems.append(f"{regs} registers (allocated {alloc}) x {threads} threads = {alloc * threads} registers "
                            f"per block > {LIMITS['registers_per_block']}")
    if threads > LIMITS["threads_per_block"]:
        problems.append(f"{threads} threads per block > {LIMITS['threads_per_block']}")
    limit = TARGETS[target][1] if target in TARGETS else None
    if smem is not None and limit is not None and smem > limit:
        problems.append(f"{smem} bytes of shared memory per block > {limit} on {target}")
    spill = int(v.get("spill_stores") or 0) + int(v.get("spill_loads") or 0)
    if spill > MAX_SPILL_BYTES:
        problems.append(f"spills {v.get('spill_stores', 0)} bytes stored + {v.get('spill_loads', 0)} bytes loaded "
                        f"= {spill} > {MAX_SPILL_BYTES}")
    return problems


def check_grid(grid: Iterable[int]) -> list[str]:
    """The grid limits a launch grid breaks (``[]`` when it can launch)."""
    g = list(grid) + [1] * (3 - len(list(grid)))
    out = []
    for axis, (n, top) in enumerate(zip(g, LIMITS["grid"])):
        if n > top:
            out.append(f"grid axis {axis} = {n} > {top}")
        if n < 1:
            out.append(f"grid axis {axis} = {n} (empty launch)")
    return out


# --------------------------------------------------------------------------------------------------
# ptxas logs


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> list[dict[str, Any]]:
    """The entry functions of a ``ptxas -v`` log: ``[{name, arch, registers, spill_stores, spill_loads,
    stack_frame, static_shared}]`` (the spill and stack numbers of ``Function properties`` lines go to
    the entry function of that name; those of non-inlined device functions are not counted)."""
    entries: list[dict[str, Any]] = []
    props: dict[str, tuple[int, int, int]] = {}
    current_props = None
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                       "spill_loads": 0, "stack_frame": 0, "static_shared": 0}
            entries.append(current)
            current_props = None
            continue
        m = _PROPS.search(line)
        if m:
            current_props = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and current_props is not None:
            props[(current["arch"] if current else "", current_props)] = tuple(int(x) for x in m.groups())
            continue
        m = _USED.search(line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            current["static_shared"] = int(s.group(1)) if s else 0
    for e in entries:
        frame = props.get((e["arch"], e["name"]))
        if frame is not None:
            e["stack_frame"], e["spill_stores"], e["spill_loads"] = frame
    return entries


def _tensor_cores(ptx: str) -> str:
    """What the PTX's dots run on: ``wgmma``, ``mma`` (``mma.sync``), or ``none``."""
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


# --------------------------------------------------------------------------------------------------
# the kernels


def _import_kernels():
    """The kernel modules, checked to hold compiled (not interpreted) Triton kernels."""
    import importlib

    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton comes with torch's CUDA wheels
        raise ReportError(f"noisynn kernels needs Triton ({e})") from e
    standard = importlib.import_module("triton.language.standard")
    if type(getattr(standard, "cdiv", None)).__name__ == "InterpretedFunction":
        raise ReportError(
            "Triton was imported under its interpreter (TRITON_INTERPRET=1 when triton.language was first "
            "imported); the report compiles real kernels: run it in a process with TRITON_INTERPRET unset or 0, "
            "e.g. `TRITON_INTERPRET=0 noisynn kernels`")
    mods = {name: importlib.import_module(f"noisynn_kernels.triton.{name}") for name in KERNEL_MODULES}
    interpreted = [f"{name}.{k}" for name, mod in mods.items() for k, fn in _jit_functions(mod).items()
                   if type(fn).__name__ == "InterpretedFunction"]
    if interpreted:
        raise ReportError(
            "the Triton kernels were defined under Triton's interpreter (TRITON_INTERPRET=1 was set when "
            f"noisynn_kernels.triton was imported: {', '.join(interpreted[:3])}, ...); the report compiles real "
            "kernels: run it in a process with TRITON_INTERPRET unset or 0, e.g. `TRITON_INTERPRET=0 noisynn "
            "kernels`")
    return mods


def _jit_functions(mod) -> dict[str, Any]:
    """The public ``@triton.jit`` functions of a kernel module (the helpers start with ``_``)."""
    out = {}
    for name, obj in vars(mod).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
            out[name] = obj
    return out


def kernel_names() -> list[str]:
    """``module.kernel`` of every public ``@triton.jit`` kernel of ``noisynn_kernels/triton/*.py``."""
    return sorted(f"{name}.{k}" for name, mod in _import_kernels().items() for k in _jit_functions(mod))


def _kernel_name(fn) -> str:
    mod = getattr(fn, "__module__", None) or getattr(getattr(fn, "fn", None), "__module__", "")
    short = mod.rsplit(".", 1)[-1]
    name = getattr(fn, "__name__", None) or getattr(fn.fn, "__name__", repr(fn))
    return f"{short}.{name}"


# --------------------------------------------------------------------------------------------------
# recording the launches


@dataclass
class Launch:
    """One ``wrap_triton(kernel)[grid](*args, **kwargs)`` of an op body, with the case that made it."""

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict
    case: dict


@dataclass
class _Recorder:
    """Stands in for ``torch.library.wrap_triton`` in an op module: records instead of launching."""

    launches: list = field(default_factory=list)
    case: dict = field(default_factory=dict)

    def __call__(self, kernel):
        recorder = self

        class _Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append(Launch(kernel, grid, args, dict(kwargs), dict(recorder.case)))

                return launch

            def run(self, *args, grid, **kwargs):  # wrap_triton(kernel).run(..., grid=...) spelling
                recorder.launches.append(Launch(kernel, grid, args, dict(kwargs), dict(recorder.case)))

        return _Launcher()


def _op_body(op) -> Callable:
    """The Python function behind a ``torch.library.triton_op`` (the op object itself dispatches, on
    meta tensors to its fake, which launches nothing)."""
    fn = getattr(op, "_init_fn", None)
    if fn is None:
        if callable(op) and not hasattr(op, "_opoverload"):
            return op
        raise ReportError(f"cannot find the Python body of the op {op!r} (torch's CustomOpDef has no _init_fn)")
    return fn


def _dtype(name: str):
    import torch

    return getattr(torch, name)


@contextlib.contextmanager
def _recording(recorder: _Recorder, *modules):
    from unittest import mock

    with contextlib.ExitStack() as stack:
        for mod in modules:
            if not hasattr(mod, "wrap_triton"):
                raise ReportError(f"{mod.__name__} launches no kernel through a module-level wrap_triton")
            stack.enter_context(mock.patch.object(mod, "wrap_triton", recorder))
        yield recorder


@functools.cache
def _cfg(kind: str, axis: str, k: int):
    """The config of a case, one per ``(kind, axis, k)`` (a dense ``k x k`` matrix is checked once, and the
    op's device copy of ``M`` is cached per matrix)."""
    import torch

    from .config import NoiseConfig

    matrix = torch.zeros((k, k)) if kind == "dense" else None
    # eval=False: a batch-axis config in eval mode needs an explicit opt-in; the kernels do not see it
    return NoiseConfig(kind=kind, axis=axis, matrix=matrix, eval=axis != "batch")


def _layernorm_cases(quick: bool, batch: int) -> list[dict]:
    cases = []
    if quick:
        # every kernel and dtype: optimal runs group_sum_kernel too; both D extremes of the block sizes, and
        # a row both passes do in chunks (ln_fwd_stats_kernel, ln_grad_stats_kernel; with mix_after_norm the
        # column sums read the forward's statistics)
        for dtype in DTYPES:
            for D, kind, axis, after in ((768, "optimal", "tokens", False), (4096, "optimal", "rows", True),
                                         (16384, "optimal", "tokens", True)):
                cases.append(dict(D=D, dtype=dtype, kind=kind, axis=axis, mix_after_norm=after, residual=True,
                                  weight_dtype=dtype, d_residual_out=True))
        return [dict(c, batch=batch) for c in cases]
    for dtype in DTYPES:
        for D in LN_DIMS:
            for kind in KINDS:
                for axis in AXES:
                    for after in (False, True):
                        for residual in (False, True):
                            cases.append(dict(D=D, dtype=dtype, kind=kind, axis=axis, mix_after_norm=after,
                                              residual=residual, weight_dtype=dtype, d_residual_out=residual))
    # fp32 LayerNorm parameters with fp16 / bf16 activations (the op takes any weight dtype): a pointer
    # type of its own, so variants of their own
    for dtype in ("float16", "bfloat16"):
        for D in LN_DIMS:
            for kind in ("identity", "optimal"):
                cases.append(dict(D=D, dtype=dtype, kind=kind, axis="tokens", mix_after_norm=False, residual=True,
                                  weight_dtype="float32", d_residual_out=True))
    return [dict(c, batch=batch) for c in cases]


def _record_layernorm(recorder: _Recorder, case: dict) -> None:
    import torch

    from ._validate import check_mix_add_layernorm, mixed_size
    from .ops.common import mix_args
    from .ops.mix_add_layernorm import triton as ops

    B, N, D = case["batch"], TOKENS, case["D"]
    dt, wdt = _dtype(case["dtype"]), _dtype(case["weight_dtype"])
    meta = torch.device("meta")
    x = torch.empty((B, N, D), dtype=dt, device=meta)
    res = torch.empty_like(x) if case["residual"] else None
    w = torch.empty((D,), dtype=wdt, device=meta)
    b = torch.empty((D,), dtype=wdt, device=meta)
    grid = PATCH_GRID if case["axis"] == "rows" else None
    k = mixed_size(x, case["axis"], PREFIX, grid)
    spec = check_mix_add_layernorm(x, res, w, b, 1e-6, _cfg(case["kind"], case["axis"], k), PREFIX, grid,
                                   case["mix_after_norm"])
    margs = mix_args(spec, meta)
    recorder.case = dict(case, op="mix_add_layernorm_fwd")
    _, residual_out, mean, rstd = _op_body(ops.mix_add_layernorm_fwd)(
        x, res, w, b, 1e-6, *margs, case["mix_after_norm"], False)
    recorder.case = dict(case, op="mix_add_layernorm_bwd")
    dy = torch.empty_like(x)
    dres = torch.empty_like(x) if case["d_residual_out"] else None
    _op_body(ops.mix_add_layernorm_bwd)(dy, dres, residual_out, w, mean, rstd, margs.kind, margs.axis, margs.alpha,
                                        margs.shift, margs.mix_matrix, margs.prefix_tokens, margs.grid_w,
                                        case["mix_after_norm"])


def _attention_cases(quick: bool, batch: int) -> list[dict]:
    """fp32 cases come twice, with PyTorch's fp32 matmul precision ``ieee`` (the default: FMA dots) and
    ``tf32`` (tensor cores), the two tile sets of the fp32 kernels."""
    cases = []
    if quick:
        # every kernel and dtype; both tile configurations of fp16/bf16 (Dh 64 and 128); all partial modes
        for dtype in DTYPES:
            for Dh, kind, axis in ((64, "optimal", "tokens"), (128, "optimal", "rows"), (128, "optimal", "batch")):
                cases.append(dict(Dh=Dh, dtype=dtype, kind=kind, axis=axis))
        for Dh in (64, 128):
            cases.append(dict(Dh=Dh, dtype="float32", kind="identity", axis="tokens", precision="tf32"))
    else:
        for dtype in DTYPES:
            for Dh in ATTN_HEADS:
                for kind in KINDS:
                    for axis in AXES:
                        cases.append(dict(Dh=Dh, dtype=dtype, kind=kind, axis=axis))
                        if dtype == "float32":
                            cases.append(dict(Dh=Dh, dtype=dtype, kind=kind, axis=axis, precision="tf32"))
    return [dict(c, batch=batch, heads=ATTN_HEADS[c["Dh"]]) for c in cases]


@contextlib.contextmanager
def _fp32_precision(precision: str | None):
    """PyTorch's fp32 matmul precision set to ``precision`` (``None``: as it is) for the block."""
    import torch

    matmul = torch.backends.cuda.matmul
    if precision is None or not hasattr(torch.backends, "fp32_precision"):
        if precision == "tf32":  # a torch before the fp32_precision API
            saved = matmul.allow_tf32
            matmul.allow_tf32 = True
            try:
                yield
            finally:
                matmul.allow_tf32 = saved
        else:
            yield
        return
    saved = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def _record_attention(recorder: _Recorder, case: dict) -> None:
    import torch

    from ._validate import check_noisy_attention
    from .ops.common import mix_args
    from .ops.noisy_attention import triton as ops

    B, H, N, Dh = case["batch"], case["heads"], TOKENS, case["Dh"]
    dt = _dtype(case["dtype"])
    meta = torch.device("meta")
    # the model's layout: q, k, v are views of the (B, N, 3, H, Dh) qkv projection (models/fused.py)
    qkv = torch.empty((B, N, 3, H, Dh), dtype=dt, device=meta).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    grid = PATCH_GRID if case["axis"] == "rows" else None
    kmix = {"tokens": N - PREFIX, "rows": PATCH_GRID[0], "batch": B}[case["axis"]]
    spec, scale = check_noisy_attention(q, k, v, _cfg(case["kind"], case["axis"], kmix), None, PREFIX, grid)
    margs = mix_args(spec, meta)
    with _fp32_precision(case.get("precision")):
        recorder.case = dict(case, op="noisy_attention_fwd")
        y, o, lse = _op_body(ops.noisy_attention_fwd)(q, k, v, float(scale), *margs, False)
        saved_o = y if case["kind"] == "identity" else o
        # the gradient of y.transpose(1, 2).reshape(B, N, H * Dh): a (B, H, N, Dh) view of a (B, N, H, Dh) buffer
        dy = torch.empty((B, N, H, Dh), dtype=dt, device=meta).transpose(1, 2)
        recorder.case = dict(case, op="noisy_attention_bwd")
        _op_body(ops.noisy_attention_bwd)(dy, q, k, v, saved_o, lse, float(scale), margs.kind, margs.axis,
                                          margs.alpha, margs.shift, margs.mix_matrix, margs.prefix_tokens, margs.grid_w)


def _random_cases(quick: bool, batch: int) -> list[dict]:
    """``keyed``: the launch under CUDA-graph capture, reading ``[seed, offset]`` from a device tensor."""
    seeds = SEEDS  # both in quick too: unspecialized, they are one variant (the quick test checks it)
    prefixes = (PREFIX,) if quick else (0, PREFIX)
    return [dict(dtype=dtype, prefix_tokens=prefix, seed=seed, value_range=rule, keyed=keyed, batch=batch)
            for dtype in DTYPES for prefix in prefixes for seed in seeds for rule in _value_ranges()
            for keyed in (False, True)]


def _value_ranges() -> tuple[str, ...]:
    """The salt-and-pepper ``value_range`` rules the launcher knows (``low``/``high`` one value for the
    batch, or one per sample), or ``("batch",)`` for a launcher with the batch-wide range only."""
    from . import reference

    return ("sample", "batch") if hasattr(reference, "salt_and_pepper_range") else ("batch",)


def _record_random(recorder: _Recorder, case: dict) -> None:
    import torch

    from . import reference
    from .ops.random_noise import triton as ops

    meta = torch.device("meta")
    x = torch.empty((case["batch"], TOKENS, 768), dtype=_dtype(case["dtype"]), device=meta)
    seed, prefix = case["seed"], case["prefix_tokens"]
    key = torch.empty((2,), dtype=torch.int64, device=meta) if case.get("keyed") else None
    recorder.case = dict(case, op="gaussian_noise")
    _op_body(ops._gaussian_op)(x, seed, 0.0, 1.0, 0.1, prefix, key)
    recorder.case = dict(case, op="salt_and_pepper_noise")
    # low / high as launch_salt_and_pepper computes them when not given
    body = x[:, prefix:] if prefix else x
    if hasattr(reference, "salt_and_pepper_range"):
        lo, hi = reference.salt_and_pepper_range(body, case["value_range"])
    else:
        lo, hi = body.amin(), body.amax()
    _op_body(ops._salt_and_pepper_op)(x, lo, hi, seed, 0.1, prefix, key)
    recorder.case = dict(case, op="salt_and_pepper_noise_backward")
    _op_body(ops._salt_and_pepper_backward_op)(x, seed, 0.1, prefix, key)


def record_launches(quick: bool, batch: int = BATCH) -> tuple[list[Launch], list[dict]]:
    """Run every op body of the enumeration on meta tensors: ``(launches, refused)``, ``refused`` the cases
    whose body raised (the launcher refuses the shape)."""
    from .ops.mix_add_layernorm import triton as ln_ops
    from .ops.noisy_attention import triton as attn_ops
    from .ops.random_noise import triton as rand_ops

    recorder = _Recorder()
    refused = []
    families = (("mix_add_layernorm", _layernorm_cases, _record_layernorm),
                ("noisy_attention", _attention_cases, _record_attention),
                ("random_noise", _random_cases, _record_random))
    with _recording(recorder, ln_ops, attn_ops, rand_ops):
        for family, cases, record in families:
            for case in cases(quick, batch):
                case = dict(case, family=family)
                try:
                    record(recorder, case)
                except Exception as e:  # a launcher refusing a shape is a result, not a crash
                    refused.append(dict(case, error=f"{type(e).__name__}: {e}"))
    return recorder.launches, refused


# --------------------------------------------------------------------------------------------------
# binding a launch as Triton's JITFunction.run would


def _mock_args(args: tuple, kwargs: dict):
    import torch
    from triton.runtime.jit import MockTensor

    class _Pointer(MockTensor):
        """A tensor argument: its dtype, and its byte offset in its storage as the address (allocator
        blocks are aligned, so the offset decides the alignment specialization)."""

        def __init__(self, t):
            super().__init__(t.dtype, list(t.shape))
            self._ptr = int(t.storage_offset()) * t.element_size()

        def data_ptr(self):
            return self._ptr

    def conv(a):
        return _Pointer(a) if isinstance(a, torch.Tensor) else a

    return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}


def _run_kwargs(fn, kwargs: dict) -> dict:
    """The keyword arguments ``JITFunction.run`` adds before binding (``debug``, ``instrumentation_mode``)."""
    from triton import knobs

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", getattr(fn, "debug", None)) or bool(getattr(knobs.runtime, "debug", False))
    mode = getattr(getattr(knobs, "compilation", None), "instrumentation_mode", None)
    if mode is not None:
        kwargs["instrumentation_mode"] = mode
    return kwargs


def _bind(fn, backend, launch: Launch):
    """``(key, (signature, constexprs, attrs, options), bound_args)`` of a recorded launch on ``backend``."""
    from triton.runtime.jit import create_function_from_signature

    args, kwargs = _mock_args(launch.args, launch.kwargs)
    kwargs = _run_kwargs(fn, kwargs)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (_kernel_name(fn), _freeze(signature), _freeze(constexprs), _freeze(attrs), _freeze(options.__dict__))
    return key, (signature, constexprs, attrs, options), bound_args


def _freeze(x):
    if isinstance(x, dict):
        return tuple(sorted((repr(k), _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return repr(x)


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if hasattr(v, "value") and isinstance(v.value, (bool, int, float, str)):
        return v.value
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return repr(v)


# --------------------------------------------------------------------------------------------------
# compiling


@contextlib.contextmanager
def _compile_knobs():
    """Triton's own ptxas log on stdout for every compile (``dump_ptxas_log``; ``always_compile`` so a
    cached kernel is compiled again and logs)."""
    from triton import knobs

    saved = []
    for group, name, value in (("nvidia", "dump_ptxas_log", True), ("compilation", "always_compile", True)):
        obj = getattr(knobs, group, None)
        if obj is not None and hasattr(obj, name):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _ptxas(arch: int):
    """Triton's ptxas (the one it compiles with) and its version."""
    from triton import knobs

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(arch)
    except (ImportError, TypeError):
        tool = knobs.nvidia.ptxas
    return tool.path, getattr(tool, "version", None)


def _rerun_ptxas(ptx: str, arch_name: str, options) -> str:
    """``ptxas -v`` on ``ptx`` with the options Triton compiles with: the log, for when Triton's own log
    could not be captured."""
    path, _ = _ptxas(int(re.sub(r"\D", "", arch_name)[:3] or 80))
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [path, "-lineinfo", "-v"]
        if not getattr(options, "enable_fp_fusion", True):
            cmd.append("--fmad=false")
        cmd += [f"--gpu-name={arch_name}", src, "-o", os.path.join(d, "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r.stdout + r.stderr


def _compile(fn, target_name: str, spec) -> dict[str, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature, constexprs, attrs, options = spec
    cap = TARGETS[target_name][0]
    target = GPUTarget("cuda", cap, 32)
    out: dict[str, Any] = {}
    buf = io.StringIO()
    t0 = time.perf_counter()
    try:
        with _compile_knobs(), contextlib.redirect_stdout(buf):
            k = compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as e:
        log = buf.getvalue()
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        out["compile_s"] = round(time.perf_counter() - t0, 3)
        if log:
            out["log_tail"] = log[-2000:]
        return out
    out["compile_s"] = round(time.perf_counter() - t0, 3)
    md = k.metadata
    ptx = k.asm.get("ptx", "") if hasattr(k.asm, "get") else k.asm["ptx"]
    entries = parse_ptxas_log(buf.getvalue())
    source = "triton"
    if not entries:
        entries = parse_ptxas_log(_rerun_ptxas(ptx, _arch_of(ptx, cap), options))
        source = "ptxas rerun"
    name = getattr(md, "name", None)
    entry = next((e for e in entries if e["name"] == name), entries[0] if entries else None)
    num_warps = int(getattr(md, "num_warps", options.num_warps))
    num_ctas = int(getattr(md, "num_ctas", 1) or 1)
    out.update(
        arch=entry["arch"] if entry else _arch_of(ptx, cap),
        num_warps=num_warps,
        num_stages=int(getattr(md, "num_stages", options.num_stages)),
        threads=32 * num_warps * num_ctas,
        shared=int(getattr(md, "shared", 0) or 0),
        registers=entry["registers"] if entry else None,
        spill_stores=entry["spill_stores"] if entry else None,
        spill_loads=entry["spill_loads"] if entry else None,
        stack_frame=entry["stack_frame"] if entry else None,
        tensor_cores=_tensor_cores(ptx),
    )
    if source != "triton":  # the numbers come from our own ptxas run of Triton's PTX
        out["ptxas_log"] = source
    if num_ctas != 1:
        out["num_ctas"] = num_ctas
    if out["registers"] is not None:
        out["registers_per_block"] = out["registers"] * out["threads"]
    return out


def _arch_of(ptx: str, cap: int) -> str:
    m = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.M)
    return m.group(1) if m else f"sm_{cap}{'a' if cap >= 90 else ''}"


# --------------------------------------------------------------------------------------------------
# the CUDA C++ kernels


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def _repo_root() -> str | None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return here if os.path.exists(os.path.join(here, _NVCC_SOURCE)) else None


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {}
    r = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if r.returncode == 0 and len(out) == len(names) else {}


def _max_threads(obj: str, cuobjdump: str | None) -> dict[tuple[str, str], int]:
    """``(function, sm_XX) -> __launch_bounds__`` max threads, from the object's ``.nv.info`` sections."""
    if not cuobjdump:
        return {}
    r = subprocess.run([cuobjdump, "-elf", obj], capture_output=True, text=True)
    if r.returncode != 0:
        return {}
    out = {}
    arch = None
    func = None
    lines = r.stdout.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch, func = m.group(1), None
            continue
        m = re.match(r"\s*\.nv\.info\.(\S+)\s*$", line)
        if m:
            func = m.group(1)
            continue
        if line.strip().startswith(".") and not line.strip().startswith(".nv.info."):
            func = None
        if "EIATTR_MAX_THREADS" in line and func is not None:
            value = next((x for x in lines[i + 1:i + 4] if "Value:" in x), "")
            nums = [int(x, 16) for x in re.findall(r"0x[0-9a-fA-F]+", value)]
            if nums:
                total = 1
                for n in nums:
                    total *= n
                out[(func, arch)] = total
    return out


def _cuobjdump(cuda_home: str) -> str | None:
    """The toolkit's cuobjdump, else the one Triton ships."""
    path = os.path.join(cuda_home, "bin", "cuobjdump")
    if os.path.exists(path):
        return path
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - any failure: no launch bounds in the report
        return shutil.which("cuobjdump")


def cuda_report(targets: list[str], log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """``nvcc -Xptxas -v`` of the CUDA C++ kernels for ``targets``: ``{status, ..., functions}``."""
    nvcc = _find_nvcc()
    root = _repo_root()
    if nvcc is None:
        return {"status": "skipped", "note": "nvcc not found (set CUDA_HOME or put the toolkit's bin/ on PATH)"}
    if root is None:
        return {"status": "skipped", "note": f"{_NVCC_SOURCE} not found (an installed package without sources)"}
    import logging

    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "No CUDA runtime is found": nothing here needs one
    try:
        import torch.utils.cpp_extension as ce
    finally:
        quiet.setLevel(level)

    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", version)
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            includes = list(ce.include_paths(device_type="cuda"))
        except TypeError:  # older torch: include_paths(cuda=True)
            includes = list(ce.include_paths(cuda=True))
    includes = [p for p in includes if os.path.isdir(p)] + [os.path.join(cuda_home, "include"),
                                                             os.path.join(root, "csrc")]
    gencode = [f"-gencode=arch=compute_{TARGETS[t][0]},code=sm_{TARGETS[t][0]}" for t in targets]
    flags = (["-O3", "-lineinfo", "-std=c++20", "-DWITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H",
              "-DTORCH_EXTENSION_NAME=_C", "--compiler-options", "-fPIC"] + list(ce.COMMON_NVCC_FLAGS))
    with tempfile.TemporaryDirectory() as d:
        obj = os.path.join(d, "mix_add_layernorm.o")
        cmd = ([nvcc] + flags + [f"-I{p}" for p in includes] + gencode
               + ["-Xptxas", "-v", "-c", os.path.join(root, _NVCC_SOURCE), "-o", obj])
        log(f"nvcc: {' '.join(gencode)} {_NVCC_SOURCE}")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        elapsed = round(time.perf_counter() - t0, 1)
        if r.returncode != 0:
            return {"status": "failed", "nvcc": m.group(1) if m else None, "elapsed_s": elapsed,
                    "note": "nvcc failed", "log_tail": (r.stdout + r.stderr)[-4000:], "functions": []}
        bounds = _max_threads(obj, _cuobjdump(cuda_home))
    entries = parse_ptxas_log(r.stdout + r.stderr)
    names = _demangle(sorted({e["name"] for e in entries}))
    functions = []
    for e in entries:
        target = next((t for t in targets if f"sm_{TARGETS[t][0]}" == e["arch"]), e["arch"])
        rec = dict(kernel=_short(names.get(e["name"], e["name"]), width=400), target=target, arch=e["arch"],
                   registers=e["registers"], spill_stores=e["spill_stores"], spill_loads=e["spill_loads"],
                   stack_frame=e["stack_frame"], static_shared=e["static_shared"],
                   max_threads=bounds.get((e["name"], e["arch"])))
        v = dict(rec, shared=e["static_shared"], threads=rec["max_threads"] or 0)
        rec["problems"] = check_variant(v, target) if target in TARGETS else []
        functions.append(rec)
    return {"status": "ok", "nvcc": m.group(1) if m else None, "elapsed_s": elapsed, "source": _NVCC_SOURCE,
            "flags": flags + gencode + ["-Xptxas", "-v"], "functions": functions,
            "note": "dynamic shared memory is sized on the host per launch and checked there against the GPU's "
                    "opt-in limit; ptxas reports static shared memory only. max_threads: __launch_bounds__."}


# --------------------------------------------------------------------------------------------------
# the report


def run(targets: Iterable[str] = DEFAULT_TARGETS, quick: bool = False, include_cuda: bool | None = None,
        progress: Callable[[str], None] | None = None, grid_batch: int | None = None) -> dict[str, Any]:
    """Enumerate, compile and check every Triton kernel variant for ``targets``; ``include_cuda`` (default:
    ``not quick``) adds the CUDA C++ kernels.  Returns the report (JSON-serializable); ``report["ok"]``
    is false when any variant or launch breaks a limit or spills more than :data:`MAX_SPILL_BYTES`."""
    targets = list(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown target(s) {unknown}; expected some of {sorted(TARGETS)}")
    include_cuda = (not quick) if include_cuda is None else include_cuda
    say = progress or (lambda s: None)
    t_start = time.perf_counter()
    mods = _import_kernels()
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from ._version import __version__

    all_kernels = sorted(f"{name}.{k}" for name, mod in mods.items() for k in _jit_functions(mod))

    t0 = time.perf_counter()
    launches, refused = record_launches(quick, BATCH)
    grid_batch = grid_batch or (BATCH * 4 if quick else GRID_BATCH)
    big_launches, big_refused = record_launches(quick, grid_batch)
    say(f"recorded {len(launches)} launches at batch {BATCH} and {len(big_launches)} at batch {grid_batch} "
        f"({time.perf_counter() - t0:.1f} s)")

    # grids: every recorded launch, at both batches
    grids: dict[tuple, dict] = {}
    for lst, b in ((launches, BATCH), (big_launches, grid_batch)):
        for la in lst:
            g = la.grid
            if callable(g):
                g = g(dict(zip(la.kernel.arg_names, la.args)))
            g = tuple(int(x) for x in g)
            name = _kernel_name(la.kernel)
            rec = grids.setdefault((name, b), {"kernel": name, "batch": b, "max_grid": [0, 0, 0], "launches": 0,
                                               "problems": []})
            rec["launches"] += 1
            gg = list(g) + [1] * (3 - len(g))
            rec["max_grid"] = [max(a, c) for a, c in zip(rec["max_grid"], gg)]
            for p in check_grid(g):
                msg = f"{p} ({la.case.get('op')}: {_case_text(la.case)})"
                if msg not in rec["problems"] and len(rec["problems"]) < 10:
                    rec["problems"].append(msg)

    # unique variants per target
    variants: list[dict] = []
    params: dict[str, list[str]] = {}
    ptxas_versions = {}
    for target_name in targets:
        cap = TARGETS[target_name][0]
        backend = make_backend(GPUTarget("cuda", cap, 32))
        ptxas_versions[target_name] = str(_ptxas(cap)[1])
        unique: dict[tuple, dict] = {}
        for la in launches:
            key, spec, _ = _bind(la.kernel, backend, la)
            if key not in unique:
                unique[key] = {"fn": la.kernel, "spec": spec, "cases": []}
            unique[key]["cases"].append(la.case)
        big_keys = set()
        for la in big_launches:
            key, spec, _ = _bind(la.kernel, backend, la)
            big_keys.add(key)
        say(f"{target_name}: {len(unique)} unique variants of {len(launches)} launches")
        n = len(unique)
        for i, (key, u) in enumerate(sorted(unique.items(), key=lambda kv: kv[0][0])):
            signature, constexprs, attrs, options = u["spec"]
            fn = u["fn"]
            names = fn.arg_names
            rec: dict[str, Any] = {
                "kernel": key[0],
                "target": target_name,
                "constexprs": {names[p[0]] if isinstance(p, tuple) else str(p): _jsonable(v)
                               for p, v in constexprs.items()},
                # the runtime arguments' types in order (names: report["params"]), and those Triton
                # specialized as divisible by 16 (pointers: 16-byte aligned)
                "signature": ",".join(str(v) for v in signature.values() if v != "constexpr"),
                "divisible_by_16": ",".join(names[p[0]] for p, a in attrs.items()
                                            if any("divisibility" in str(x) for x in a)),
                "launches": len(u["cases"]),
                "dtypes": sorted({c["dtype"] for c in u["cases"] if "dtype" in c}),
                "weight_dtypes": sorted({c["weight_dtype"] for c in u["cases"] if "weight_dtype" in c}),
                "dims": sorted({c[d] for c in u["cases"] for d in ("D", "Dh") if d in c}),
                "ops": sorted({c["op"] for c in u["cases"]}),
                "example": _case_text(u["cases"][0]),
            }
            params.setdefault(key[0], [n for n, t in signature.items() if t != "constexpr"])
            rec.update(_compile(fn, target_name, u["spec"]))
            rec["problems"] = check_variant(rec, target_name)
            rec["fits"] = not rec["problems"]
            variants.append(rec)
            if (i + 1) % 25 == 0 or i + 1 == n:
                say(f"{target_name}: compiled {i + 1}/{n} ({time.perf_counter() - t_start:.0f} s)")
        if not quick:
            new = len(big_keys - set(unique))
            if new:
                say(f"{target_name}: {new} variants at batch {grid_batch} differ only in the integer "
                    "specialization of shapes (not compiled)")

    covered = sorted({v["kernel"] for v in variants})
    cuda = cuda_report(targets, say) if include_cuda else {"status": "skipped",
                                                           "note": "not requested (--cuda to include)"}
    by_kernel: dict[str, dict[str, int]] = {}
    for v in variants:
        by_kernel.setdefault(v["kernel"], {}).setdefault(v["target"], 0)
        by_kernel[v["kernel"]][v["target"]] += 1
    over = [v for v in variants if v["problems"]]
    grid_problems = [g for g in grids.values() if g["problems"]]
    cuda_over = [f for f in cuda.get("functions", []) if f["problems"]]
    uncovered = sorted(set(all_kernels) - set(covered))
    nvcc_version = cuda.get("nvcc")
    report = {
        "tool": "noisynn kernels",
        "mode": "quick" if quick else "full",
        "targets": targets,
        "versions": {"noisynn_kernels": __version__, "triton": triton.__version__, "torch": torch.__version__,
                     "ptxas": ptxas_versions, "nvcc": nvcc_version, "python": sys.version.split()[0]},
        "limits": LIMITS,
        "shapes": {"tokens": TOKENS, "prefix_tokens": PREFIX, "patch_grid": list(PATCH_GRID), "batch": BATCH,
                   "grid_batch": grid_batch, "layernorm_dims": list(LN_DIMS) if not quick else [768, 4096, 16384],
                   "attention_heads": {str(k): v for k, v in ATTN_HEADS.items()}, "dtypes": list(DTYPES)},
        "kernels": all_kernels,
        "uncovered": uncovered,
        "params": params,
        "refused": [dict(c) for c in refused + big_refused],
        "variants": variants,
        "grids": sorted(grids.values(), key=lambda g: (g["kernel"], g["batch"])),
        "cuda": cuda,
        "summary": {
            "launches": len(launches),
            "variants": len(variants),
            "compiled": sum(1 for v in variants if not v.get("error")),
            "failed": sum(1 for v in variants if v.get("error")),
            "over_limit": len(over),
            "grid_problems": len(grid_problems),
            "cuda_over_limit": len(cuda_over),
            "by_kernel": by_kernel,
            "tensor_cores": _tensor_core_summary(variants),
        },
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    report["ok"] = not over and not grid_problems and not cuda_over and not uncovered
    return report


def _tensor_core_summary(variants: list[dict]) -> dict[str, dict[str, list[str]]]:
    """``kernel -> target -> sorted "dtype: instruction"`` of the flash-attention kernels (``attn_*``), whose
    dots carry the FLOPs (the per-kernel table has the instruction of every kernel)."""
    out: dict[str, dict[str, set]] = {}
    for v in variants:
        if v.get("error") or not v["kernel"].startswith("attention.attn"):
            continue
        for dt in v["dtypes"]:
            out.setdefault(v["kernel"], {}).setdefault(v["target"], set()).add(f"{dt}: {v.get('tensor_cores')}")
    return {k: {t: sorted(s) for t, s in d.items()} for k, d in out.items()}


def _case_text(case: dict) -> str:
    skip = {"family", "op", "batch", "heads"}
    parts = [f"{k}={v}" for k, v in case.items() if k not in skip
             and not (k == "weight_dtype" and v == case.get("dtype"))]
    if "batch" in case:
        parts.insert(0, f"B={case['batch']}")
    return " ".join(parts)


def exit_code(report: dict[str, Any]) -> int:
    """0 when everything fits, 1 when any variant, launch grid or CUDA kernel breaks a limit (or a kernel
    is not covered)."""
    return 0 if report.get("ok") else 1


def _cx(c: dict) -> str:
    short = {"HAS_RESIDUAL": "RES", "HAS_WEIGHT": "W", "HAS_BIAS": "B", "MIX_AFTER_NORM": "AFTER",
             "HAS_DRES": "DRES", "HAS_RES": "RES", "DOT_PRECISION": "PREC", "STORE_OUT": "OUT",
             "WITH_DELTA": "DELTA"}
    return ",".join(f"{short.get(k, k)}={int(v) if isinstance(v, bool) else v}" for k, v in c.items())


def format_table(report: dict[str, Any], all_variants: bool = False) -> str:
    """The report as text: a per-kernel summary, then every variant over a limit (with ``all_variants``, every
    variant), the grids, and the CUDA C++ kernels."""
    lines = []
    v = report["versions"]
    lines.append(f"noisynn kernels ({report['mode']}): targets {' '.join(report['targets'])}; triton {v['triton']}, "
                 f"ptxas {', '.join(f'{t} {p}' for t, p in v['ptxas'].items())}, nvcc {v['nvcc'] or '-'}, "
                 f"torch {v['torch']}")
    s = report["summary"]
    lines.append(f"{s['launches']} launches recorded, {s['variants']} variant compiles ({s['failed']} failed), "
                 f"{s['over_limit']} over a limit, {s['grid_problems']} grid problems, "
                 f"{s['cuda_over_limit']} CUDA C++ kernels over a limit; {report['elapsed_s']} s")
    limits = ", ".join(f"{t} {TARGETS[t][1]} B" for t in report["targets"])
    lines.append(f"limits: shared memory per block {limits}; 255 registers per thread, 65536 per block; "
                 f"spill stores + loads <= {MAX_SPILL_BYTES} B; grid axes 1, 2 <= 65535")
    if report["uncovered"]:
        lines.append(f"NOT COVERED (no launch in the enumeration): {', '.join(report['uncovered'])}")
    lines.append("")

    # per kernel and target
    head = (f"{'kernel':44} {'target':6} {'variants':>8} {'regs':>9} {'max spill':>9} {'max smem':>9} "
            f"{'warps':>5} {'stages':>6} {'tc':>10} {'over':>4}")
    lines.append(head)
    lines.append("-" * len(head))
    groups: dict[tuple, list] = {}
    for r in report["variants"]:
        groups.setdefault((r["kernel"], r["target"]), []).append(r)
    for (kernel, target), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.get("error")]
        regs = [r["registers"] for r in ok if r.get("registers") is not None]
        spill = [r["spill_stores"] + r["spill_loads"] for r in ok if r.get("spill_stores") is not None]
        smem = [r["shared"] for r in ok]
        warps = sorted({r["num_warps"] for r in ok})
        stages = sorted({r["num_stages"] for r in ok})
        tc = sorted({r["tensor_cores"] for r in ok})
        lines.append(f"{kernel:44} {target:6} {len(rs):>8} "
                     f"{(f'{min(regs)}-{max(regs)}' if regs else '-'):>9} {(max(spill) if spill else '-'):>9} "
                     f"{(max(smem) if smem else '-'):>9} {'/'.join(map(str, warps)):>5} "
                     f"{'/'.join(map(str, stages)):>6} {'/'.join(tc):>10} "
                     f"{sum(1 for r in rs if r['problems']):>4}")
    lines.append("")

    rows = report["variants"] if all_variants else [r for r in report["variants"] if r["problems"]]
    title = "every variant" if all_variants else "variants over a limit or spilling > 64 B"
    lines.append(f"{title}: {len(rows)}")
    if rows:
        lines.append(f"  {'kernel':44} {'target':6} {'dtype':22} {'D/Dh':14} {'regs':>4} {'spill st/ld':>11} "
                     f"{'smem':>7} {'w':>2} {'s':>2} {'tc':>5}  constexprs / problems")
        for r in sorted(rows, key=lambda r: (r["kernel"], r["target"], str(r["constexprs"]))):
            dt = ",".join(r["dtypes"]) + ("/w:" + ",".join(r["weight_dtypes"])
                                          if r.get("weight_dtypes") and r["weight_dtypes"] != r["dtypes"] else "")
            dims = ",".join(map(str, r.get("dims") or [])) or "-"
            if r.get("error"):
                lines.append(f"  {r['kernel']:44} {r['target']:6} {dt:22} {dims:14} ERROR {r['error']}")
                continue
            lines.append(f"  {r['kernel']:44} {r['target']:6} {dt:22} {dims:14} {r['registers']:>4} "
                         f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>11} {r['shared']:>7} "
                         f"{r['num_warps']:>2} {r['num_stages']:>2} {r['tensor_cores']:>5}  {_cx(r['constexprs'])}"
                         + (f"  <- {'; '.join(r['problems'])}" if r["problems"] else ""))
    lines.append("")

    tcs = report["summary"].get("tensor_cores") or {}
    if tcs:
        lines.append("tensor cores of the attention dots (mma: mma.sync, wgmma: Hopper warpgroup MMA, none: FMA):")
        for kernel, per in sorted(tcs.items()):
            for target, items in sorted(per.items()):
                lines.append(f"  {kernel:44} {target:6} {'; '.join(items)}")
        lines.append("")

    lines.append("launch grids (largest per axis; limits 2^31-1, 65535, 65535):")
    for g in report["grids"]:
        lines.append(f"  {g['kernel']:44} B={g['batch']:<5} {g['launches']:>5} launches  max grid "
                     f"{tuple(g['max_grid'])}" + (f"  <- {'; '.join(g['problems'])}" if g["problems"] else ""))
    if report["refused"]:
        lines.append(f"cases the launchers refused: {len(report['refused'])}")
        for c in report["refused"][:20]:
            lines.append(f"  {c.get('family')}: {_case_text({k: x for k, x in c.items() if k != 'error'})}: "
                         f"{c['error']}")
    lines.append("")

    cuda = report["cuda"]
    if cuda.get("status") != "ok":
        lines.append(f"CUDA C++ kernels: {cuda.get('status')}: {cuda.get('note')}")
    else:
        lines.append(f"CUDA C++ kernels ({cuda['source']}, nvcc {cuda['nvcc']}, ptxas -v; {cuda['elapsed_s']} s; "
                     f"{cuda['note']}):")
        lines.append(f"  {'target':6} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'static smem':>11} "
                     f"{'max thr':>7}  kernel")
        for f in sorted(cuda["functions"], key=lambda f: (f["target"], f["kernel"])):
            lines.append(f"  {f['target']:6} {f['registers']:>4} "
                         f"{str(f['spill_stores']) + '/' + str(f['spill_loads']):>11} {f['stack_frame']:>5} "
                         f"{f['static_shared']:>11} {str(f['max_threads'] or '-'):>7}  {_short(f['kernel'])}"
                         + (f"  <- {'; '.join(f['problems'])}" if f["problems"] else ""))
    lines.append("")
    lines.append("OK: every variant fits" if report["ok"] else "FAIL: see the variants over a limit above")
    return "\n".join(lines)


def _short(name: str, width: int = 110) -> str:
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"c10::(Half|BFloat16)", r"\1", name)
    return name if len(name) <= width else name[:width - 3] + "..."


def write(report: dict[str, Any], path: str, all_variants: bool = False) -> list[str]:
    """Write the report as ``path`` (JSON when it ends in ``.json``, else the text table of
    :func:`format_table`; a directory gets both, ``report.json`` and ``report.txt``); returns the paths.
    The JSON has one variant (one launch grid, one CUDA function) per line, so reports diff line by line."""
    if os.path.isdir(path) or path.endswith(os.sep):
        os.makedirs(path, exist_ok=True)
        paths = [os.path.join(path, "report.json"), os.path.join(path, "report.txt")]
    else:
        paths = [path]
    for p in paths:
        with open(p, "w") as f:
            f.write((dumps(report) if p.endswith(".json") else format_table(report, all_variants)) + "\n")
    return paths


def dumps(obj: Any, indent: int = 0) -> str:
    """JSON with dicts one key a line and lists of records one record a line (compact)."""
    pad = " " * (indent + 1)
    if isinstance(obj, dict) and obj and (indent == 0 or any(_records(v) or isinstance(v, dict) and v
                                                             and indent < 2 for v in obj.values())):
        items = [f"{pad}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if _records(obj):
        rows = [pad + json.dumps(x, default=str, separators=(",", ":")) for x in obj]
        return "[\n" + ",\n".join(rows) + "\n" + " " * indent + "]"
    return json.dumps(obj, default=str)


def _records(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
