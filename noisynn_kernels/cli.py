"""The ``noisynn`` command.

    noisynn bench   op microbenchmarks and model throughput, competitors side by side
    noisynn train   train on an image folder (--data DIR) or a short synthetic run; also under torchrun (DDP)
    noisynn info    what this installation has (extension, Triton, CUDA, chosen backends)
    noisynn audit   batch-dependence audit: a small NoisyViT on real digits under three batch orderings, or
                    (--data DIR --model NAME [--checkpoint FILE]) a user's model on a user's image folder
    noisynn profile where a training step's time goes (torch.profiler): noisynn ops, LayerNorm/add, attention,
                    matmuls, the rest; --compare: plain timm, eager noisy and fused side by side
    noisynn kernels compile every kernel variant for GPU targets (no GPU needed): registers, spills, shared memory
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "bench_noise"]


def bench_noise(text: str):
    """``--noise`` of ``noisynn bench``: ``kind``, ``kind:axis``, ``key=value,...`` or JSON -> NoiseConfig, with
    :func:`noisynn_kernels.train.parse_noise` (``default`` gives the bench's default; ``none`` is refused:
    the benchmarks compare noisy paths)."""
    from .train import parse_noise

    cfg = parse_noise(text)
    if cfg is False:
        raise argparse.ArgumentTypeError("--noise none: the benchmarks compare noisy paths; give a noise "
                                         "(e.g. optimal:tokens) or leave --noise out for the default")
    return cfg


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noisynn", description="NoisyNN kernels: benchmarks and diagnostics.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="benchmark fused/reference noise against eager NoisyNN code, timm and more",
                       description="Op microbenchmarks (add + noise + LayerNorm at a ViT noise site) and model "
                                   "throughput (inference and train step) for eager NoisyNN code, plain timm and "
                                   "this package, side by side in one run. Defaults finish in a few minutes on a "
                                   "2-core CPU.")
    b.add_argument("--models", nargs="*", default=None,
                   help="registered noisy model names (default: noisy_vit_tiny_patch16_224 noisy_resnet18); "
                        "pass none to skip model benchmarks")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--img-size", type=int, default=224)
    b.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], default="float32",
                   help="dtype of inputs and model weights")
    b.add_argument("--amp", choices=["float16", "bfloat16"], default=None,
                   help="run the models under torch.autocast with this dtype (weights stay in --dtype)")
    b.add_argument("--channels-last", action="store_true", help="models and input in channels_last memory format")
    b.add_argument("--compile", action="store_true",
                   help="add the `compiled` competitor: torch.compile of the eager op and of the eager noisy model "
                        "(compile time is excluded from the timings but adds minutes to the run)")
    b.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    b.add_argument("--noise", type=bench_noise, default=None,
                   help="model noise: KIND, KIND:AXIS, or FIELD=VALUE,... of NoiseConfig (default: optimal:tokens)")
    b.add_argument("--backend", default=None,
                   help="kernel backend for the noisynn competitor: reference, triton, ... (default: per device, "
                        "see `noisynn info`)")
    b.add_argument("--no-ops", dest="ops", action="store_false", help="skip the op microbenchmarks")
    b.add_argument("--no-attention", dest="attention", action="store_false",
                   help="skip the noisy attention benchmark (noisy_attention vs SDPA + eager noise vs SDPA)")
    b.add_argument("--attn-shape", type=int, nargs=4, default=(8, 12, 197, 64), metavar=("B", "H", "N", "Dh"))
    b.add_argument("--op-shape", type=int, nargs=3, default=(64, 197, 768), metavar=("B", "N", "D"))
    b.add_argument("--op-sizes", type=int, nargs="*", default=[8, 16, 32, 64], metavar="B",
                   help="batch sizes of the op size sweep (optimal/tokens forward at N, D of --op-shape); "
                        "pass none to skip it")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--iters", type=int, default=10, help="timed rounds per op benchmark (models use half)")
    b.add_argument("--out", default="bench_out", help="directory for noisynn_bench.json")
    b.add_argument("--quiet", action="store_true", help="no progress output")

    from .train import add_arguments as add_train_arguments

    add_train_arguments(sub.add_parser(
        "train", help="train on an image folder (--data DIR), or a short synthetic run; works under torchrun with "
                      "DistributedDataParallel",
        description="Train a timm model with NoisyNN noise on an image folder (one sub-folder per class; timm's data "
                    "pipeline, AdamW + cosine by default; writes checkpoint.pt and log.json into --out), or without "
                    "--data a short synthetic run. Under torchrun it trains with DistributedDataParallel."))
    sub.add_parser("info", help="print what this installation has, as JSON")

    a = sub.add_parser("audit", help="batch-dependence audit: small NoisyViT on real digits, or your model on your "
                                     "image folder (--data), under three batch orderings",
                       description="Without --data: train a small NoisyViT on scikit-learn's 8x8 digits (no download) "
                                   "under each noise condition, including the official batch-axis protocol (measured "
                                   "with an explicit opt-in), and evaluate every model with class-sorted batches, "
                                   "shuffled batches and batch size 1; the default run takes about 10 minutes on a "
                                   "2-core CPU, --fast well under a minute. With --data DIR --model NAME [--checkpoint "
                                   "FILE]: evaluate that model on that image folder (streamed) under the same three "
                                   "orderings, without noise, with each --noise and with the official protocol. "
                                   "Both write report.md, audit.json and PNG plots.")
    a.add_argument("--out", default="audit-results", help="output directory (default: audit-results)")
    a.add_argument("--data", default=None, metavar="DIR", help="audit a model on this image folder (one sub-folder "
                                                              "per class) instead of the digits experiment")
    a.add_argument("--model", default=None, help="--data: timm model name (default: the checkpoint's architecture)")
    a.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="--data: a noisynn train checkpoint.pt or a state_dict file (loaded with strict=True)")
    a.add_argument("--pretrained", action="store_true", help="--data without --checkpoint: timm's pretrained weights")
    a.add_argument("--img-size", type=int, default=None, help="--data: input size (default: the checkpoint's)")
    a.add_argument("--model-kwargs", default="{}", help="--data: JSON object of extra timm.create_model arguments")
    a.add_argument("--noise", action="append", default=[], metavar="SPEC",
                   help="--data: a noise condition to add (repeatable): KIND, KIND:AXIS, FIELD=VALUE,... or JSON")
    a.add_argument("--no-official", dest="official", action="store_false",
                   help="--data: leave out the official batch-axis protocol")
    a.add_argument("--batch-size", type=int, default=10, help="--data: batch size of the sorted / shuffled orderings")
    a.add_argument("--batch-sizes", type=int, nargs="*", default=[2, 10, 50], metavar="B",
                   help="--data: evaluation batch sizes of the official-protocol sweep (none: no sweep)")
    a.add_argument("--max-images", type=int, default=None, help="--data: a stratified subset of at most N images")
    a.add_argument("--seed", type=int, default=0, help="--data: seed of the shuffled ordering and the subset")
    a.add_argument("--workers", type=int, default=0, help="--data: DataLoader worker processes")
    a.add_argument("--bad-images", choices=["stop", "skip"], default="stop",
                   help="--data: an image that does not decode: stop with its name, or skip it and count it")
    a.add_argument("--device", default="auto", help="--data: auto, cpu, cuda, ...")
    a.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --fast)")
    a.add_argument("--epochs", type=int, default=None, help="training epochs per run (default 12; 2 with --fast)")
    a.add_argument("--fast", action="store_true", help="smoke run: 1 seed, 2 epochs; numbers not meaningful")
    a.add_argument("--threads", type=int, default=None,
                   help="torch threads (digits default 1: the model is tiny, and one thread stays fast on a busy "
                        "machine; --data default: torch's)")
    a.add_argument("--quiet", action="store_true", help="no progress output")

    pr = sub.add_parser("profile", help="profile a few training steps: time per step, images/s, and the share of "
                                        "noisynn ops, LayerNorm/add, attention, matmuls and the rest",
                        description="Run a few training steps (random inputs, AdamW) under torch.profiler, write a "
                                    "Chrome trace (trace.json) and profile.json into --out and print a table: time "
                                    "per step and images/s (un-profiled steps), and the share of the profiled "
                                    "operator time (self CPU time; device time on CUDA) in the noisynn ops, "
                                    "LayerNorm/add, attention, matmul/conv and the rest. --compare adds plain timm and "
                                    "the eager noisy model (and fused, for the ViT family) side by side.")
    pr.add_argument("--model", default="noisy_vit_tiny_patch16_224",
                    help="a registered noisy model or a timm model with --noise")
    pr.add_argument("--img-size", type=int, default=224)
    pr.add_argument("--num-classes", type=int, default=10)
    pr.add_argument("--model-kwargs", default="{}", help="JSON object of extra timm.create_model arguments")
    pr.add_argument("--noise", default="default",
                    help="default | none | KIND | KIND:AXIS | FIELD=VALUE,... | JSON (default: the noisy model's)")
    pr.add_argument("--fused", action="store_true", help="profile the model with swap_fused_ops (ViT family)")
    pr.add_argument("--backend", default=None, help="kernel backend of the fused ops (default: per device)")
    pr.add_argument("--compare", action="store_true",
                    help="profile plain timm, the eager noisy model and (ViT family) the fused one side by side")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--steps", type=int, default=5, help="steps timed, then as many profiled")
    pr.add_argument("--warmup", type=int, default=2)
    pr.add_argument("--amp", nargs="?", const="auto", default=None, choices=["auto", "float16", "bfloat16"],
                    help="autocast (--amp alone: bfloat16 on CPU, float16 on CUDA)")
    pr.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--out", default="profile-results", help="directory for trace.json and profile.json")
    pr.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    pr.add_argument("--quiet", action="store_true", help="no progress output")

    k = sub.add_parser("kernels", help="compile every kernel variant for GPU targets (no GPU needed) and check "
                                       "registers, spills and shared memory against the limits",
                       description="Compile, with the real Triton compiler and no GPU, every Triton kernel variant "
                                   "the launchers pick at ViT shapes (and, with --cuda, the CUDA C++ kernels with "
                                   "nvcc -Xptxas -v), and report per variant and target the registers, spills, "
                                   "shared memory, num_warps, num_stages and tensor-core use, and whether it fits. "
                                   "Exit status 1 when any variant cannot launch or spills more than 64 bytes. "
                                   "The full run takes about half an hour on one CPU core; --quick (every kernel "
                                   "and dtype) a few minutes.")
    k.add_argument("--target", nargs="+", default=None, metavar="SM",
                   help="targets: sm_80, sm_86, sm_89, sm_90 (default: sm_80 sm_90)")
    k.add_argument("--quick", action="store_true",
                   help="the CI subset: every kernel function and dtype, a few shapes")
    k.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                   help="include the CUDA C++ kernels (nvcc; default: on for the full run, off with --quick)")
    k.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    k.add_argument("--all", action="store_true", help="list every variant in the table, not only those over a limit")
    k.add_argument("--out", default=None, metavar="FILE",
                   help="also write the report: FILE.json (JSON, every variant), any other name (the table), or "
                        "an existing directory (report.json and report.txt)")
    k.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _kernels(args, argv: list[str]) -> int:
    import os

    from . import kernel_report  # imports nothing heavy: Triton is imported by run()
    from .errors import NoisyNNError

    targets = []
    for t in args.target or list(kernel_report.DEFAULT_TARGETS):
        name = _target_name(t, kernel_report.TARGETS)
        if name is None:
            print(f"noisynn kernels: unknown --target {t!r}; expected some of {' '.join(kernel_report.TARGETS)}",
                  file=sys.stderr)
            return 2
        targets.append(name)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The report compiles real kernels, and Triton decides interpreter or compiler when a kernel (its
        # own library included, imported with torch) is defined: run it in a fresh process without it.
        import subprocess

        print("noisynn kernels: running in a subprocess with TRITON_INTERPRET=0 (the report compiles real "
              "kernels)", file=sys.stderr)
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.run([sys.executable, "-m", "noisynn_kernels.cli", "kernels", *argv], env=env).returncode

    def progress(msg):
        if not args.quiet:
            print(f"[kernels] {msg}", file=sys.stderr, flush=True)

    try:
        report = kernel_report.run(targets, quick=args.quick, include_cuda=args.cuda, progress=progress)
    except (kernel_report.ReportError, NoisyNNError, ValueError) as e:
        print(f"noisynn kernels: {e}", file=sys.stderr)
        return 2
    if args.out:
        paths = kernel_report.write(report, args.out, all_variants=args.all)
        progress("wrote " + ", ".join(paths))
    print(kernel_report.dumps(report) if args.json else kernel_report.format_table(report, all_variants=args.all))
    return kernel_report.exit_code(report)


def _target_name(text: str, known) -> str | None:
    """``sm_80`` from ``sm_80``, ``sm80``, ``80`` or ``8.0``; ``None`` for a target not in ``known``."""
    import re

    m = re.fullmatch(r"(?:sm_?)?(\d)\.?(\d)", text.strip().lower())
    name = f"sm_{m.group(1)}{m.group(2)}" if m else None
    return name if name in known else None


def _audit(args) -> int:
    from .errors import NoisyNNError

    try:
        if args.data is not None:
            from .audit import FolderAuditOptions, run_folder

            kwargs = json.loads(args.model_kwargs)
            if not isinstance(kwargs, dict):
                raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
            result = run_folder(FolderAuditOptions(
                data=args.data, model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                out=args.out, img_size=args.img_size, model_kwargs=kwargs, noises=tuple(args.noise),
                official=args.official, batch_size=args.batch_size, batch_sizes=tuple(args.batch_sizes),
                max_images=args.max_images, seed=args.seed, workers=args.workers, bad_images=args.bad_images,
                device=args.device, threads=args.threads, quiet=args.quiet))
        else:
            from .audit import AuditOptions
            from .audit import run as run_audit

            result = run_audit(AuditOptions(out=args.out, seeds=args.seeds, epochs=args.epochs, fast=args.fast,
                                            threads=1 if args.threads is None else args.threads, quiet=args.quiet))
    except (NoisyNNError, ValueError, argparse.ArgumentTypeError) as e:  # ValueError: --model-kwargs JSON
        print(f"noisynn audit: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # scikit-learn (data) comes with the [test] and [bench] extras
        print(f"noisynn audit: {e}", file=sys.stderr)
        return 2
    print("report: " + next(p for p in result["paths"] if p.endswith("report.md")))
    print("files: " + ", ".join(result["paths"]))
    return 0


def _profile(args) -> int:
    import os

    import torch

    from .analysis.profile import format_table, profile_models
    from .errors import ConfigError, NoisyNNError
    from .models import noise_config
    from .models.fused import swap_fused_ops
    from .train import amp_dtype, create_model, parse_noise

    def say(msg):
        if not args.quiet:
            print(f"[profile] {msg}", file=sys.stderr, flush=True)

    try:
        for name in ("batch_size", "steps", "img_size", "num_classes"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
        kwargs = json.loads(args.model_kwargs)
        if not isinstance(kwargs, dict):
            raise ConfigError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
        noise = parse_noise(args.noise)
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
        amp = amp_dtype(args.amp, device)

        def build(noisy: bool, fused: bool):
            torch.manual_seed(args.seed)
            model, arch, _ = create_model(args.model, num_classes=args.num_classes, img_size=args.img_size,
                                          model_kwargs=kwargs, noise=noise if noisy else False)
            if noisy and noise_config(model) is None:
                raise ConfigError(f"{args.model} has no noise: give --noise (a plain timm model has none by default)")
            if fused:
                swap_fused_ops(model, backend=args.backend)
            return model, arch

        variants = []
        if args.compare:
            variants = [("plain timm", False, False), ("eager noisy", True, False)]
            if args.fused or args.model.startswith("noisy_vit"):
                variants.append(("fused", True, True))
        else:
            variants = [("fused" if args.fused else "eager noisy", True, args.fused)]
        os.makedirs(args.out, exist_ok=True)
        main_label = "fused" if args.fused else "eager noisy"
        models, traces = {}, {}
        for label, noisy, fused in variants:
            models[label], arch = build(noisy, fused)
            traces[label] = os.path.join(args.out, "trace.json" if label == main_label else
                                         f"trace-{label.replace(' ', '_')}.json")
        say(f"{', '.join(models)}: {arch} batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed (side by "
            f"side) + {args.steps} profiled steps each on {device}")
        results = profile_models(models, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                                 num_classes=args.num_classes, device=device, amp=amp, trace_paths=traces,
                                 seed=args.seed)
    except (NoisyNNError, ValueError, argparse.ArgumentTypeError) as e:
        print(f"noisynn profile: {e}", file=sys.stderr)
        return 2
    from .bench.environment import environment

    payload = {"model": args.model, "arch": arch, "img_size": args.img_size, "batch_size": args.batch_size,
               "amp": None if amp is None else str(amp).replace("torch.", ""), "environment": environment(device),
               "results": [r.to_dict() for r in results]}
    path = os.path.join(args.out, "profile.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    if args.json:
        print(json.dumps(payload, indent=1, default=str))
    else:
        print(f"noisynn profile: {args.model} ({arch}), batch {args.batch_size}, {args.img_size} px, {device}"
              + (f", amp {payload['amp']}" if amp else ""))
        print(format_table(results))
        print(f"traces: {', '.join(r.trace for r in results)}; results: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        from .train import run as run_train

        return run_train(args)
    if args.command == "info":
        from . import backend_info

        print(json.dumps(backend_info(), indent=2, default=str))
        return 0
    if args.command == "audit":
        return _audit(args)
    if args.command == "profile":
        return _profile(args)
    if args.command == "kernels":
        argv = list(sys.argv[1:] if argv is None else argv)
        return _kernels(args, argv[argv.index("kernels") + 1:])

    from .bench import BenchOptions, format_table, run
    from .errors import NoisyNNError
    from .models import NOISY_MODELS

    models = BenchOptions().models if args.models is None else args.models
    unknown = [m for m in models if m not in NOISY_MODELS]
    if unknown:
        print(f"noisynn bench: unknown model(s) {unknown}; expected some of {sorted(NOISY_MODELS)}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        print(f"noisynn bench: --batch-size and --iters must be >= 1 and --warmup >= 0, got --batch-size "
              f"{args.batch_size}, --iters {args.iters}, --warmup {args.warmup}", file=sys.stderr)
        return 2
    if min(list(args.attn_shape)) < 1 or args.attn_shape[2] < 2:
        print(f"noisynn bench: --attn-shape must be positive with N >= 2, got {list(args.attn_shape)}", file=sys.stderr)
        return 2
    if min(list(args.op_shape) + list(args.op_sizes), default=1) < 1 or args.op_shape[1] < 2:
        print(f"noisynn bench: --op-shape and --op-sizes must be positive with N >= 2, got --op-shape "
              f"{list(args.op_shape)} --op-sizes {args.op_sizes}", file=sys.stderr)
        return 2
    opts = BenchOptions(models=models, batch_size=args.batch_size, img_size=args.img_size, dtype=args.dtype,
                        device=args.device, noise=args.noise, backend=args.backend, ops=args.ops,
                        op_shape=tuple(args.op_shape),
                        op_sizes=tuple(args.op_sizes), attention=args.attention, attn_shape=tuple(args.attn_shape),
                        compile=args.compile, channels_last=args.channels_last,
                        amp=args.amp,
                        warmup=args.warmup, iters=args.iters, out=args.out, quiet=args.quiet)
    try:
        result = run(opts)
    except NoisyNNError as e:
        print(f"noisynn bench: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"\nresults: {result['path']}")
    from .bench.plots import write_plots

    try:
        paths = write_plots(result, args.out)
    except ImportError:  # matplotlib comes with the [bench] extra
        print("plots: skipped, matplotlib is not installed (pip install 'noisynn_kernels[bench]')")
    else:
        print("plots: " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
