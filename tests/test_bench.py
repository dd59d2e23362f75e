"""The benchmark baselines compute the same noise as the package, and `noisynn bench` runs."""

import json

import pytest
import torch

import noisynn_kernels as nk
from noisynn_kernels import quality
from noisynn_kernels.bench import eager_add_noise_layernorm, eager_linear_noise, make_eager, measure_interleaved
from noisynn_kernels.cli import main


def _q(kind, k):
    return quality.mixing_matrix(kind, k, 0.3) - torch.eye(k, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["shift", "optimal"])
@pytest.mark.parametrize("axis", ["tokens", "rows", "batch"])
@pytest.mark.parametrize("shape,prefix,grid", [((3, 13, 5), 1, (3, 4)), ((2, 3, 4, 6), 0, None)])
def test_eager_baseline_matches_package(kind, axis, shape, prefix, grid):
    x = torch.randn(*shape, dtype=torch.float64)
    k = nk.functional.mixed_size(x, axis, prefix, grid)
    ours = nk.linear_transform_noise(x, kind, axis=axis, prefix_tokens=prefix, grid=grid)
    eager = eager_linear_noise(x, _q(kind, k), axis, prefix, grid)
    torch.testing.assert_close(eager, ours, rtol=1e-12, atol=1e-12)


def test_eager_block_path_returns_normed_and_residual():
    x, r = torch.randn(2, 17, 8, dtype=torch.float64), torch.randn(2, 17, 8, dtype=torch.float64)
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    normed, res = eager_add_noise_layernorm(x, r, _q("optimal", 16), w, b, 1e-6, "tokens", 1)
    exp_n, exp_r = nk.reference.mix_add_layernorm(x, r, w, b, 1e-6, kind="optimal", axis="tokens", prefix_tokens=1)
    torch.testing.assert_close(res, exp_r)
    torch.testing.assert_close(normed, exp_n)


def test_make_eager_model_matches_package_model():
    import timm

    torch.manual_seed(0)
    ours = timm.create_model("noisy_vit_tiny_patch16_224", img_size=32, depth=2, noise=dict(kind="shift", axis="rows"))
    eager = make_eager(timm.create_model("noisy_vit_tiny_patch16_224", img_size=32, depth=2,
                                         noise=dict(kind="shift", axis="rows")))
    eager.load_state_dict(ours.state_dict(), strict=True)
    assert type(eager.blocks[-1].noisynn).__name__ == "EagerNoiseInjection"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(eager.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)


def test_make_eager_refuses_plain_model():
    import timm

    with pytest.raises(ValueError, match="needs a model with noise"):
        make_eager(timm.create_model("resnet18"))


def test_interleaved_timing_orders_and_ratios():
    """Every round calls each competitor once; the order is shuffled, the same in every run, and each
    competitor follows each other about equally often (not one neighbour nearly always, as a rotated
    order gives)."""
    names = "abcde"

    def run(iters):
        calls = []
        t = measure_interleaved({n: (lambda n=n: calls.append(n)) for n in names}, warmup=1, iters=iters)
        return calls, t

    calls, t = run(60)
    assert all(len(t[n].times) == 60 for n in names)
    assert calls[:5] == list(names)  # the warm-up round, in the given order
    rounds = [calls[i:i + 5] for i in range(5, len(calls), 5)]
    assert len(rounds) == 60 and all(sorted(r) == list(names) for r in rounds)
    assert run(60)[0] == calls  # seeded: repeatable
    timed = calls[5:]
    follows = {(p, n): 0 for p in names for n in names if p != n}
    for p, n in zip(timed, timed[1:]):
        if p != n:
            follows[p, n] += 1
    # 295 neighbour pairs over 20 ordered pairs: about 14 each (a rotation gives 0 or ~59)
    assert min(follows.values()) >= 5 and max(follows.values()) <= 25, follows
    assert t["a"].ratio_to(t["a"]) == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timing_uses_events_and_sees_kernel_time():
    """On CUDA a call's time is its CUDA-event time with the L2 flushed: a large copy takes longer than
    an empty call, and a copy twice the size takes about twice as long (kernel time, not launch time)."""
    dev = torch.device("cuda")
    a, b = torch.empty(1 << 26, device=dev), torch.empty(1 << 26, device=dev)
    a2, b2 = torch.empty(1 << 27, device=dev), torch.empty(1 << 27, device=dev)
    t = measure_interleaved({"empty": lambda: None, "copy": lambda: b.copy_(a), "copy2": lambda: b2.copy_(a2)},
                            warmup=2, iters=10, device=dev)
    assert t["empty"].median < t["copy"].median / 5
    assert 1.6 < t["copy2"].median / t["copy"].median < 2.4


def test_cli_bench_runs_and_writes_results(tmp_path, capsys):
    rc = main(["bench", "--models", "noisy_vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2",
               "--op-shape", "2", "17", "16", "--attn-shape", "2", "2", "17", "16", "--warmup", "0", "--iters", "2",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "optimal/tokens forward" in out and "noisy_vit_tiny_patch16_224/train" in out
    res = json.loads((tmp_path / "noisynn_bench.json").read_text())
    kinds = {(r["benchmark"], r["name"]) for r in res["rows"]}
    assert ("op", "shift/rows") in kinds and ("model", "noisy_vit_tiny_patch16_224/inference") in kinds
    row = next(r for r in res["rows"] if r["name"] == "optimal/tokens")
    for key in ("device", "torch", "triton", "timm", "commit", "shape", "dtype", "backend"):
        assert key in row
    assert set(row["competitors"]) == {"eager", "noisynn", "layernorm"}
    # identity (mix=None) is an op row of its own, once per mode, without the eager noise path
    identity = [r for r in res["rows"] if r["benchmark"] == "op" and r["name"] == "identity"]
    assert [r["mode"] for r in identity] == ["forward", "forward+backward"]
    assert set(identity[0]["competitors"]) == {"noisynn", "layernorm"} and identity[0]["axis"] is None
    assert ("op", "dense/tokens") in kinds and ("op", "dense/rows") in kinds
    for c in row["competitors"].values():
        assert c["q1_ms"] <= c["median_ms"] <= c["q3_ms"] and len(c["times_ms"]) == c["repeats"] == 2
    attn = [r for r in res["rows"] if r["benchmark"] == "attention"]
    assert {(r["kind"], r["mode"]) for r in attn} == {(k, m) for k in ("optimal", "shift")
                                                       for m in ("forward", "forward+backward")}
    assert set(attn[0]["competitors"]) >= {"eager", "sdpa"}
    for png in ("models.png", "ops.png", "op_sizes.png", "attention.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = [r for r in res["rows"] if r["benchmark"] == "op_sweep"]
    assert [r["shape"] for r in sweep] == [[8, 17, 16], [16, 17, 16], [32, 17, 16], [64, 17, 16]]
    assert row["competitors"]["noisynn"]["speedup_vs"]["eager"] > 0


def test_cli_rejects_unknown_model(capsys):
    assert main(["bench", "--models", "resnet_nonexistent", "--quiet"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_cli_info_reports_extension(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] == {"cpu": True, "cuda": True}
    assert info["chosen"]["cpu"] in ("reference", "cpu")
    assert "extension" in info and "triton" in info


def test_compiled_extension_is_built():
    # The documented install compiles the C++ extension; a build that silently lost it must fail here.
    info = nk.backend_info()["extension"]
    assert info["built"], info.get("why")
    assert info["torch_version"] == torch.__version__.split("+")[0]


def test_noisynn_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("NOISYNN_BACKEND", "nonsense")
    with pytest.raises(nk.BackendUnavailableError, match="nonsense"):
        nk.backend_info()


def test_cli_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "--op-sizes", "0", "--quiet"]) == 2
    assert "--op-sizes" in capsys.readouterr().err


def test_op_bytes_counts_the_tensors_an_ideal_kernel_moves():
    from noisynn_kernels.bench.runner import op_bytes

    assert op_bytes((2, 3, 4), torch.float32, "forward") == 4 * 24 * 4
    assert op_bytes((2, 3, 4), torch.bfloat16, "forward+backward") == 7 * 24 * 2


@pytest.mark.parametrize("kind,axis,mode", [("shift", "rows", "forward"), ("optimal", "tokens", "forward+backward"),
                                           ("dense", "tokens", "forward")])
def test_competitors_compute_the_same_result(kind, axis, mode):
    """The timed callables of the op benchmark, ``compiled`` and ``compiled_ref`` included, compute the
    same noisy LayerNorm (``layernorm`` is the noise-free floor and must differ)."""
    from noisynn_kernels.bench.runner import BenchOptions, op_competitors

    opts = BenchOptions(op_shape=(2, 17, 8), compile=True)
    fns, cfg = op_competitors(opts, torch.device("cpu"), torch.float32, kind, axis, mode)
    assert set(fns) == {"eager", "noisynn", "layernorm", "compiled", "compiled_ref"}
    assert (cfg["kind"], cfg["axis"], cfg["mode"]) == (kind, axis, mode)
    with torch.no_grad():
        out = {name: fn.compute() for name, fn in fns.items()}
    torch.testing.assert_close(out["compiled"], out["eager"])
    torch.testing.assert_close(out["compiled_ref"], out["eager"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["noisynn"], out["eager"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["layernorm"], out["eager"], rtol=1e-3, atol=1e-3)
    for fn in fns.values():
        fn()  # the timed form runs (with the backward pass for forward+backward)


def test_dense_competitor_is_a_real_product():
    """``dense`` rows mix with a matrix without structure (not the optimal / shift one), strictly
    diagonally dominant, so the noise passes NoiseConfig's checks."""
    from noisynn_kernels.bench.runner import _bench_matrix

    q = _bench_matrix("dense", 196)
    assert q.shape == (196, 196) and (q > 0).all() and (q.sum(1) < 1).all()
    assert q.std() > 0.1 / 196
    quality.validate(torch.eye(196, dtype=torch.float64) + q)


def test_identity_competitors_are_add_layernorm():
    """The identity row (``mix=None``): the fused op and ``compiled_ref`` compute ``F.layer_norm(x + r)``;
    no eager / compiled (they would be the same path as ``layernorm``)."""
    from noisynn_kernels.bench.runner import BenchOptions, op_competitors, op_name

    opts = BenchOptions(op_shape=(2, 17, 8), compile=True)
    fns, cfg = op_competitors(opts, torch.device("cpu"), torch.float32, "identity", "tokens", "forward+backward")
    assert set(fns) == {"noisynn", "layernorm", "compiled_ref"} and cfg["axis"] is None
    assert op_name(cfg["kind"], cfg["axis"]) == "identity"
    out = {name: fn.compute() for name, fn in fns.items()}
    torch.testing.assert_close(out["noisynn"], out["layernorm"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["compiled_ref"], out["layernorm"], rtol=1e-5, atol=1e-5)


def test_model_bench_compiles_plain_and_swapped_models(monkeypatch):
    """With ``compile`` the model rows carry ``compiled`` (the eager noisy model compiled), ``compiled_ref``
    (plain timm compiled) and ``compiled_noisynn`` (the swapped model compiled), each its own model; the
    speed-ups are taken against ``compiled_ref`` too.  (torch.compile is given the eager backend here:
    what is checked is which model each competitor compiles.)"""
    from noisynn_kernels.bench import runner
    from noisynn_kernels.models.fused import is_swapped
    from noisynn_kernels.models.patch import noise_module

    compiled = []
    real_compile = torch.compile

    def fake_compile(model, **kw):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", fake_compile)
    opts = runner.BenchOptions(models=["noisy_vit_tiny_patch16_224"], img_size=32, batch_size=2, compile=True,
                               warmup=0, iters=2, quiet=True)
    row = runner._model_bench(opts, torch.device("cpu"), torch.float32, "noisy_vit_tiny_patch16_224", "inference",
                              runner.environment(torch.device("cpu")))
    assert set(row["competitors"]) == {"timm", "eager", "noisynn", "compiled", "compiled_ref", "compiled_noisynn"}
    assert len(compiled) == 3 and len({id(m) for m in compiled}) == 3
    eager_noisy, plain, swapped = compiled
    assert type(noise_module(eager_noisy)).__name__ == "EagerNoiseInjection" and not is_swapped(eager_noisy)
    assert noise_module(plain) is None and not is_swapped(plain)
    assert noise_module(swapped) is not None and is_swapped(swapped)
    assert "compiled_ref" in row["competitors"]["compiled_noisynn"]["speedup_vs"]
    c = row["competitors"]["noisynn"]
    assert c["throughput_q1_per_s"] <= c["throughput_per_s"] <= c["throughput_q3_per_s"]


def test_timing_quartiles_and_spread():
    from noisynn_kernels.bench.timing import Timing

    t = Timing([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert t.quartiles == (2.0, 6.0) and t.spread == 1.0
    assert Timing([2.0, 1.0, 4.0]).quartiles == (1.0, 4.0)


def test_plot_error_bars_span_the_interquartile_range(tmp_path):
    """Op and model bars carry the interquartile range; rows with different competitor sets (identity has
    no eager) plot together."""
    from noisynn_kernels.bench.plots import _errors, write_plots

    e = [{"median_ms": 2.0, "q1_ms": 1.5, "q3_ms": 3.0}, None, {"median_ms": 1.0, "q1_ms": 1.0, "q3_ms": 1.25}]
    assert _errors(e, "median_ms") == [[0.5, 0.0, 0.0], [1.0, 0.0, 0.25]]
    assert _errors([{"median_ms": 1.0}], "median_ms") is None  # results of older versions: no bars

    def comp(ms):
        return {"median_ms": ms, "q1_ms": 0.9 * ms, "q3_ms": 1.2 * ms, "spread": 0.3, "repeats": 5,
                "speedup_vs": {}, "throughput_per_s": 8 / ms, "throughput_q1_per_s": 8 / (1.2 * ms),
                "throughput_q3_per_s": 8 / (0.9 * ms)}

    rows = [{"benchmark": "op", "name": "identity", "mode": "forward", "shape": [2, 17, 8], "dtype": "float32",
             "competitors": {"noisynn": comp(1.0), "layernorm": comp(1.1)}},
            {"benchmark": "op", "name": "optimal/tokens", "mode": "forward", "shape": [2, 17, 8], "dtype": "float32",
             "competitors": {"eager": comp(3.0), "noisynn": comp(1.0), "layernorm": comp(1.1)}},
            {"benchmark": "model", "name": "m/inference", "mode": "inference", "dtype": "float32",
             "competitors": {"timm": comp(5.0), "noisynn": comp(4.0)}}]
    result = {"environment": {"device": "CPU", "torch": "x", "commit": "c"}, "rows": rows}
    paths = write_plots(result, str(tmp_path))
    assert {p.rsplit("/", 1)[1] for p in paths} == {"ops.png", "models.png"}


def test_summary_reports_the_target_ratios(tmp_path):
    """``python -m noisynn_kernels.bench.summary``: fused / (add + LayerNorm) per op row, the speed-up over
    compiled_ref, and for models swapped vs timm and compiled swapped vs compiled timm, with the IQR of the
    round-by-round ratios."""
    from noisynn_kernels.bench import summary

    def comp(times, **speedups):
        return {"times_ms": times, "repeats": len(times), "speedup_vs": speedups}

    op = {"benchmark": "op", "name": "shift/rows", "mode": "forward", "shape": [16, 197, 384], "dtype": "float32",
          "competitors": {"noisynn": comp([1.0, 1.0, 2.0, 1.0], layernorm=1.25, compiled_ref=1.5),
                          "layernorm": comp([1.0, 1.5, 2.0, 1.0]), "compiled_ref": comp([2.0, 1.0, 3.0, 1.0])}}
    model = {"benchmark": "model", "model": "noisy_vit_small_patch16_224", "mode": "train", "batch_size": 16,
             "dtype": "bfloat16",
             "competitors": {"noisynn": comp([1.0] * 4, timm=1.02), "timm": comp([1.0] * 4),
                             "compiled_noisynn": comp([1.0] * 4, compiled_ref=1.1), "compiled_ref": comp([1.1] * 4)}}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "noisynn_bench.json").write_text(json.dumps({"rows": [op, model]}))
    text = summary.format_summary(summary.load_results([str(tmp_path)]))
    assert "| (16, 197, 384) | float32 | shift/rows | forward | 0.80 [" in text
    assert "| 1.50x [" in text
    assert ("| noisy_vit_small_patch16_224 | train | 16 | bfloat16 | 4 | 1.02x [1.00, 1.00] | 1.10x [1.10, 1.10] |"
            in text)
    assert summary.main([str(tmp_path / "nothing-here")]) == 2


def test_plots_and_table_show_gpu_bandwidth(tmp_path):
    from noisynn_kernels.bench.plots import write_plots
    from noisynn_kernels.bench.runner import format_table

    comp = {"median_ms": 0.1, "spread": 0.01, "repeats": 3, "speedup_vs": {}, "gb_per_s": 2000.0,
            "pct_of_copy_bandwidth": 71.4}
    row = {"benchmark": "op", "name": "optimal/tokens", "mode": "forward", "shape": [64, 197, 768],
           "dtype": "bfloat16", "competitors": {"eager": dict(comp), "noisynn": dict(comp)}}
    result = {"environment": {"device": "GPU", "torch": "x", "commit": "c", "copy_bandwidth_gbps": 2800.0},
              "rows": [row]}
    assert "71%" in format_table(result) and "2000" in format_table(result)
    paths = write_plots(result, str(tmp_path))
    assert str(tmp_path / "bandwidth.png") in paths


def test_bench_noise_option_forms():
    """``noisynn bench --noise`` takes the forms ``noisynn train --noise`` takes (one parser); ``none`` is refused."""
    import argparse

    from noisynn_kernels.cli import bench_noise

    assert bench_noise("shift:rows") == nk.NoiseConfig(kind="shift", axis="rows")
    assert bench_noise("kind=shift,alpha=0.2,eval=false") == nk.NoiseConfig(kind="shift", alpha=0.2, eval=False)
    assert bench_noise('{"kind": "optimal", "axis": "rows"}') == nk.NoiseConfig(kind="optimal", axis="rows")
    assert bench_noise("default") is None
    with pytest.raises(argparse.ArgumentTypeError, match="noisy paths"):
        bench_noise("none")


def test_environment_records_the_allocator_setting(monkeypatch):
    """A CPU result says whether large outputs came from a reusing allocator: it changes the op ratios."""
    from noisynn_kernels.bench.runner import MALLOC_ENV, environment
    for k in MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    assert environment(torch.device("cpu"))["malloc"] == "default"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    assert (environment(torch.device("cpu"))["malloc"]
            == "LD_PRELOAD=libjemalloc.so.2 GLIBC_TUNABLES=glibc.malloc.mmap_max=0")
