"""CPU microbenchmarks with a regression gate on ratios (never absolute times).

Each case times two competitors interleaved in one process, single-threaded, and fails if the ratio
falls below the committed threshold in benchmarks/thresholds.json for the backend that ran (a second
measurement only when the first lands under the gate: machine noise).  A backend without committed
thresholds fails too: a new default backend must come with its own numbers.  The gates:

- ``<kind>/<axis>/<mode>``: speed-up of the fused op over the eager public-code path at (16, 197, 384);
- ``vs_layernorm``: the fused op against plain ``F.layer_norm(x + residual)`` at the cache-resident
  sizes where ViT-S/B inference and small-batch training live (identity and the noisy kinds);
- ``vs_compiled_ref``: the fused op against ``torch.compile`` of the package's own O(k d) formulation;
- ``overhead``: the raw registered op's time over the public ``mix_add_layernorm``'s at small shapes
  (1.0: the Python layers add nothing); the microseconds they add are recorded with the result;
- ``autograd``: the raw op's forward under ``no_grad`` over its forward on inputs that require grad
  (1.0: recording the autograd graph adds nothing; a Python autograd formula put it near 0.2 at
  (2, 17, 64)), and the microseconds the graph adds.

pytest-benchmark records the fused op's own timing for the report.
"""

import json
import pathlib

import pytest
import torch

import noisynn_kernels as nk
from noisynn_kernels._validate import check_mix_add_layernorm
from noisynn_kernels.bench.runner import BenchOptions, op_competitors, op_name
from noisynn_kernels.bench.timing import measure_interleaved
from noisynn_kernels.functional import backend_for
from noisynn_kernels.ops.common import mix_args

THRESHOLDS = json.loads((pathlib.Path(__file__).parents[1] / "benchmarks" / "thresholds.json").read_text())
OPTS = BenchOptions(op_shape=(16, 197, 384), warmup=2, iters=15)


@pytest.fixture(autouse=True)
def one_thread():
    # One intra-op thread: the ratio then does not swing with whatever else loads the 2 cores (with two
    # threads, the elementwise path suffers more from a busy core than eager's matmul does).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _threshold(backend: str, group: str | None, key: str) -> float:
    table = THRESHOLDS.get(backend)
    if table is not None and group is not None:
        table = table.get(group)
    assert table is not None and key in table, (
        f"no committed threshold for backend {backend!r}, {group or ''} {key}: add it to benchmarks/thresholds.json")
    return table[key]


def _gate(fns: dict, comp: str, base: str, threshold: float, opts: BenchOptions = OPTS) -> list[float]:
    """Speed-ups of ``comp`` over ``base`` (median of round-by-round ratios), measured once, or twice when
    the first lands under ``threshold``."""
    ratios = []
    for _ in range(2):
        t = measure_interleaved({base: fns[base], comp: fns[comp]}, warmup=opts.warmup, iters=opts.iters)
        ratios.append(t[comp].ratio_to(t[base]))
        if ratios[-1] >= threshold:
            break
    return ratios


def _fail_message(what: str, ratios: list[float], threshold: float) -> str:
    return (f"{what}: {max(ratios):.2f}x (tries: {', '.join(f'{r:.2f}' for r in ratios)}) fell below the "
            f"committed {threshold}x")


CASES = [(k, a, m) for m in ("forward", "forward+backward") for k in ("optimal", "shift") for a in ("tokens", "rows")]
# dense: a real k x k product (k = 196 tokens), through the BLAS in the C++ op, against the eager dense path
CASES += [("dense", "tokens", m) for m in ("forward", "forward+backward")]


@pytest.mark.parametrize("kind,axis,mode", CASES, ids=["/".join(c) for c in CASES])
def test_fused_op_keeps_its_lead_over_eager(kind, axis, mode, benchmark):
    fns, cfg = op_competitors(OPTS, torch.device("cpu"), torch.float32, kind, axis, mode)
    key = f"{kind}/{axis}/{mode}"
    threshold = _threshold(cfg["backend"], None, key)
    ratios = _gate(fns, "noisynn", "eager", threshold)
    benchmark.extra_info.update(cfg, speedup_vs_eager=max(ratios), threshold=threshold)
    benchmark.pedantic(fns["noisynn"], rounds=5, warmup_rounds=1)
    assert max(ratios) >= threshold, _fail_message(f"{key} on backend {cfg['backend']}, speed-up over eager",
                                                   ratios, threshold)


# Cache-resident sizes: ViT-Ti/16 at batch 8 and ViT-S/16 at batch 16.
CACHE_SHAPES = ((8, 197, 192), (16, 197, 384))
LN_CASES = [(s, k, a, m) for s in CACHE_SHAPES for m in ("forward", "forward+backward")
            for k, a in (("identity", None), ("optimal", "tokens"), ("shift", "rows"))]


@pytest.mark.parametrize("shape,kind,axis,mode", LN_CASES,
                         ids=["x".join(map(str, c[0])) + "/" + op_name(c[1], c[2]) + "/" + c[3] for c in LN_CASES])
def test_fused_op_keeps_up_with_add_layernorm(shape, kind, axis, mode, benchmark):
    """The fused op (noise included) against a plain add + LayerNorm, which moves more bytes."""
    opts = BenchOptions(op_shape=shape, warmup=3, iters=21)
    fns, cfg = op_competitors(opts, torch.device("cpu"), torch.float32, kind, axis, mode)
    key = f"{op_name(kind, axis)}/{mode}/{'x'.join(map(str, shape))}"
    threshold = _threshold(cfg["backend"], "vs_layernorm", key)
    ratios = _gate(fns, "noisynn", "layernorm", threshold, opts)
    benchmark.extra_info.update(cfg, speedup_vs_layernorm=max(ratios), threshold=threshold)
    benchmark.pedantic(fns["noisynn"], rounds=5, warmup_rounds=1)
    assert max(ratios) >= threshold, _fail_message(
        f"{key} on backend {cfg['backend']}, speed-up over add + layer_norm", ratios, threshold)


COMPILED_CASES = [("optimal", "tokens", "forward"), ("shift", "rows", "forward+backward"),
                  ("identity", None, "forward")]


@pytest.mark.parametrize("kind,axis,mode", COMPILED_CASES, ids=[op_name(k, a) + "/" + m for k, a, m in COMPILED_CASES])
def test_fused_op_beats_compiled_reference(kind, axis, mode, benchmark):
    """The fused op against ``torch.compile`` of the package's O(k d) formulation, at (16, 197, 384)."""
    opts = BenchOptions(op_shape=OPTS.op_shape, warmup=2, iters=15, compile=True)
    fns, cfg = op_competitors(opts, torch.device("cpu"), torch.float32, kind, axis, mode)
    key = f"{op_name(kind, axis)}/{mode}"
    threshold = _threshold(cfg["backend"], "vs_compiled_ref", key)
    ratios = _gate(fns, "noisynn", "compiled_ref", threshold, opts)
    benchmark.extra_info.update(cfg, speedup_vs_compiled_ref=max(ratios), threshold=threshold)
    benchmark.pedantic(fns["noisynn"], rounds=5, warmup_rounds=1)
    assert max(ratios) >= threshold, _fail_message(
        f"{key} on backend {cfg['backend']}, speed-up over compiled_ref", ratios, threshold)


OVERHEAD_SHAPES = ((2, 17, 64), (8, 197, 192))
_CALLS = 10  # op calls per timed call of the overhead tests' callables


def _gate_extra_cost(benchmark, fns: dict, comp: str, base: str, threshold: float, what: str, names: tuple):
    """Gates the speed of ``comp`` (10 calls of something) against ``base`` (the same calls without the
    layer or formula under test), ``base / comp`` at least ``threshold``, and records the ratio and the
    microseconds a call of ``comp`` adds (``names``: the extra_info keys of the ratio, the microseconds
    added and the base's microseconds per call)."""
    ratios = _gate(fns, comp, base, threshold, BenchOptions(warmup=3, iters=31))
    t = measure_interleaved(fns, warmup=1, iters=31)
    extra_us = (t[comp].median - t[base].median) / _CALLS * 1e6
    ratio_name, extra_name, base_name = names
    benchmark.extra_info.update({ratio_name: max(ratios), extra_name: extra_us,
                                 base_name: t[base].median / _CALLS * 1e6, "threshold": threshold})
    benchmark.pedantic(fns[comp], rounds=3, warmup_rounds=1)
    assert max(ratios) >= threshold, _fail_message(f"{what} ({extra_us:.1f} us a call over {base})", ratios,
                                                   threshold)


@pytest.mark.parametrize("shape", OVERHEAD_SHAPES, ids=["x".join(map(str, s)) for s in OVERHEAD_SHAPES])
def test_public_call_overhead(shape, benchmark):
    """The public ``mix_add_layernorm`` (checks, backend choice, launcher) against the raw registered op
    it ends in, forward under ``no_grad`` at small shapes: the ratio raw / public is gated, and the
    microseconds the Python layers add are recorded (``overhead_us``)."""
    backend = backend_for("mix_add_layernorm", "cpu")
    if backend != "cpu":
        pytest.skip(f"the raw op is the compiled cpu backend's; the CPU default here is {backend!r}")
    g = torch.Generator().manual_seed(0)
    B, N, D = shape
    x, r = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    mix = nk.NoiseConfig(kind="shift", axis="tokens")
    raw_op = torch.ops.noisynn.mix_add_layernorm_fwd_cpp
    # the schema arguments of this call, as the launcher builds them (once, outside the timed calls)
    spec = check_mix_add_layernorm(x, r, w, b, 1e-6, mix, 1, None, False)
    args = (x, r, w, b, 1e-6, *mix_args(spec, x.device), False, False)
    with torch.no_grad():
        public_out = nk.mix_add_layernorm(x, r, w, b, 1e-6, mix=mix, prefix_tokens=1)
        raw_out = raw_op(*args)
    torch.testing.assert_close(public_out[0], raw_out[0], rtol=0, atol=0)  # the same op, the same call

    def public():
        with torch.no_grad():
            for _ in range(_CALLS):
                nk.mix_add_layernorm(x, r, w, b, 1e-6, mix=mix, prefix_tokens=1)

    def raw():
        with torch.no_grad():
            for _ in range(_CALLS):
                raw_op(*args)

    key = "x".join(map(str, shape))
    benchmark.extra_info["shape"] = list(shape)
    _gate_extra_cost(benchmark, {"public": public, "raw": raw}, "public", "raw", _threshold(backend, "overhead", key),
                     f"public mix_add_layernorm at {shape}, raw / public", ("raw_over_public", "overhead_us", "raw_us"))


@pytest.mark.parametrize("shape", OVERHEAD_SHAPES, ids=["x".join(map(str, s)) for s in OVERHEAD_SHAPES])
def test_autograd_formula_overhead(shape, benchmark):
    """The raw registered op's forward on inputs that require grad (its autograd formula records the
    graph: C++, csrc/autograd.cpp) against the same call under ``no_grad``: the ratio is gated, the
    microseconds the formula adds are recorded (``autograd_us``)."""
    backend = backend_for("mix_add_layernorm", "cpu")
    if backend != "cpu":
        pytest.skip(f"the raw op is the compiled cpu backend's; the CPU default here is {backend!r}")
    g = torch.Generator().manual_seed(0)
    B, N, D = shape
    leaves = [torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g), torch.randn(D, generator=g),
              torch.randn(D, generator=g)]
    for t in leaves:
        t.requires_grad_(True)
    spec = check_mix_add_layernorm(*leaves, 1e-6, nk.NoiseConfig(kind="shift", axis="tokens"), 1, None, False)
    args = (*leaves, 1e-6, *mix_args(spec, leaves[0].device), False, False)
    raw_op = torch.ops.noisynn.mix_add_layernorm_fwd_cpp
    out = raw_op(*args)
    assert out[0].grad_fn is not None and out[2].grad_fn is None  # the graph is recorded; mean is not differentiable

    def graph():
        for _ in range(_CALLS):
            raw_op(*args)

    def no_graph():
        with torch.no_grad():
            for _ in range(_CALLS):
                raw_op(*args)

    key = "x".join(map(str, shape))
    benchmark.extra_info["shape"] = list(shape)
    _gate_extra_cost(benchmark, {"graph": graph, "no_graph": no_graph}, "graph", "no_graph",
                     _threshold(backend, "autograd", key),
                     f"raw mix_add_layernorm forward at {shape} recording autograd, no_grad / with graph",
                     ("no_graph_over_graph", "autograd_us", "no_graph_us"))
