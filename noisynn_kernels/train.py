"""``noisynn train``: train a timm model with NoisyNN noise on an image folder, or a short synthetic run.

On your images (one sub-folder per class, as torchvision's ``ImageFolder``)::

    noisynn train --data train/ --val-data val/ --model noisy_vit_small_patch16_224 --img-size 224 \\
        --epochs 10 --batch-size 64 --noise optimal:tokens --fused --out run/
    torchrun --nproc_per_node 4 -m noisynn_kernels.train --data train/ ... (same arguments)

``--data`` runs use timm's data pipeline (``timm.data.create_transform`` at ``--img-size`` with the
normalisation of the model's ``pretrained_cfg``; ``--no-aug`` for the evaluation transform in training
too), AdamW with a cosine schedule (``--opt sgd``, ``--sched constant`` to change), ``--amp``
(autocast; a gradient scaler for float16 on CUDA), accuracy on ``--val-data`` after every epoch and
``--resume`` from a checkpoint.  The folder is checked before training: a path that is not a folder,
fewer than two class folders, a class folder without images, or an image that does not decode
(``--bad-images stop``, the default; ``skip`` leaves such images out and counts them in the log) end
the run with a message and exit status 2.  ``--model`` is a registered ``noisy_*`` model (its default
noise unless ``--noise``) or any timm model (plain unless ``--noise`` is given).  ``--out DIR`` gets
``checkpoint.pt`` (after every epoch) and ``log.json``; the checkpoint's ``model`` entry loads with
``strict=True`` into ``timm.create_model(ckpt['arch'], **ckpt['create_kwargs'])``, the plain timm model.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) the process group is initialized from the
environment (``gloo`` on CPU, ``nccl`` on CUDA) and the model is wrapped in
``DistributedDataParallel``; ``--batch-size`` is the *global* batch.  A ``--data`` run shards every
epoch with a ``DistributedSampler`` (seeded with ``--seed`` and the epoch; where the folder's size is
not a multiple of the processes it repeats a few images to even the shards, and the epoch's
``images`` count includes them) and the validation set without padding, so the accuracy counts every
image once.  The loss is the mean over the local batch
and DDP averages the gradients, so sample-local noise (``tokens`` / ``rows`` linear noise) gives the
gradients of one process on the global batch.  Batch-axis noise mixes only the local batch (a
warning says so).  Random noise with a ``seed`` is offset by the rank so that processes draw
independent noise.

Without ``--data`` the run is synthetic (``--steps`` steps of one random template image per class plus
Gaussian noise, drawn from ``--seed``; SGD with momentum by default), so it needs no files: every
process draws the same global batch and trains on its own contiguous slice of it, so a run with ``W``
processes and one with a single process see the same samples at every step.  There ``--out`` (written
by rank 0) is a ``torch.save`` file: ``losses`` (global mean loss per step), ``grads`` (parameter
gradients of the last step, averaged over processes), ``params`` (final parameters), ``world_size``,
``args``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

__all__ = ["add_arguments", "build_parser", "parse_noise", "create_model", "amp_dtype", "run", "main"]


def parse_noise(text: str):
    """``--noise`` value -> what ``timm.create_model(..., noise=)`` takes.

    ``default`` (the package default noise), ``none`` (no noise site), ``KIND``, ``KIND:AXIS``,
    ``FIELD=VALUE,FIELD=VALUE`` or a JSON object of :class:`~noisynn_kernels.NoiseConfig` fields.
    The result is validated (a bad value raises :class:`~noisynn_kernels.NoisyNNError`).
    """
    from .config import NoiseConfig

    text = text.strip()
    if text in ("default", ""):
        return None
    if text == "none":
        return False
    if text.startswith("{"):
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--noise is not valid JSON: {e}") from None
        return NoiseConfig.coerce(fields)
    if "=" in text:
        fields: dict[str, Any] = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            value = value.strip()
            if value.lower() in ("true", "false"):
                fields[key.strip()] = value.lower() == "true"
                continue
            for conv in (int, float):
                try:
                    value = conv(value)
                    break
                except ValueError:
                    pass
            fields[key.strip()] = value
        return NoiseConfig.coerce(fields)
    kind, _, axis = text.partition(":")
    return NoiseConfig(kind=kind, **({"axis": axis} if axis else {}))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` options to ``p`` (used by ``noisynn train`` and ``python -m noisynn_kernels.train``)."""
    p.add_argument("--data", default=None, metavar="DIR",
                   help="image folder to train on (one sub-folder per class); without it the data are synthetic")
    p.add_argument("--val-data", default=None, metavar="DIR",
                   help="image folder with the same classes: accuracy after every epoch")
    p.add_argument("--model", default="noisy_vit_tiny_patch16_224",
                   help="a registered noisy model (noisy_vit_*, noisy_resnet*) or, with --data, any timm model")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic data (--data: its folders)")
    p.add_argument("--model-kwargs", default="{}",
                   help='JSON object of extra timm.create_model arguments, e.g. \'{"depth": 2, "patch_size": 8}\'')
    p.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (--data)")
    p.add_argument("--noise", default="default",
                   help="default | none | KIND | KIND:AXIS | FIELD=VALUE,... | JSON object of NoiseConfig fields "
                        "(default: the noisy model's default noise; none for a plain timm model)")
    p.add_argument("--fused", action="store_true", help="swap_fused_ops on the model (ViT family)")
    p.add_argument("--backend", default=None, help="kernel backend for --fused (default: per device)")
    p.add_argument("--epochs", type=int, default=1, help="epochs over --data")
    p.add_argument("--steps", type=int, default=10, help="steps of a synthetic run (without --data)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (split across processes)")
    p.add_argument("--opt", choices=["adamw", "sgd"], default=None,
                   help="optimizer (default: adamw with --data, sgd for synthetic runs)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3 adamw, 0.01 sgd)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (--data)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--sched", choices=["cosine", "constant"], default="cosine",
                   help="learning-rate schedule over the --data run, per step (synthetic runs: constant)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up before the cosine decay")
    p.add_argument("--amp", nargs="?", const="auto", default=None, choices=["auto", "float16", "bfloat16"],
                   help="autocast (--amp alone: bfloat16 on CPU, float16 with a gradient scaler on CUDA)")
    p.add_argument("--no-aug", dest="augment", action="store_false",
                   help="train with timm's evaluation transform (resize, centre crop, normalise): no augmentation")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per training process")
    p.add_argument("--bad-images", choices=["stop", "skip"], default="stop",
                   help="an image that does not decode: stop with its name (default), or skip it and count it")
    p.add_argument("--resume", default=None, metavar="FILE", help="continue a --data run from its checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last memory format")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--out", default=None,
                   help="--data: the run directory for checkpoint.pt and log.json (default train-results); "
                        "synthetic: a torch.save file with losses, last-step grads, final params")
    p.add_argument("--log-every", type=int, default=1, help="synthetic runs: print the loss every N steps (0: never)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noisynn train",
                                description="Train a timm model with NoisyNN noise on an image folder (--data), or "
                                            "on synthetic data for a few steps; alone or under torchrun "
                                            "(DistributedDataParallel).")
    return add_arguments(p)


def _synthetic_batches(steps: int, batch: int, num_classes: int, img: int, seed: int):
    """``steps`` global batches ``(images, labels)``: a fixed random template per class plus noise."""
    import torch

    g = torch.Generator().manual_seed(seed + 1_000_003)
    templates = torch.randn(num_classes, 3, img, img, generator=g)
    for _ in range(steps):
        y = torch.randint(0, num_classes, (batch,), generator=g)
        x = templates[y] + torch.randn(batch, 3, img, img, generator=g)
        yield x, y


def _describe(noise) -> str:
    """The noise's non-default fields, for the progress line."""
    if noise is False:
        return "none"
    if noise is None:
        return "default"
    from .config import NoiseConfig

    defaults = NoiseConfig().to_dict()
    return ", ".join(f"{k}={v}" for k, v in noise.to_dict().items() if k == "kind" or v != defaults[k])


def _device(name: str, local_rank: int):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; returns an exit code (2 for bad arguments)."""
    import timm
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import noisynn_kernels  # noqa: F401  (registers the noisy_* timm models)

    from .errors import NoisyNNError
    from .models import NOISY_MODELS
    from .models.fused import swap_fused_ops

    def fail(msg: str) -> int:
        print(f"noisynn train: {msg}", file=sys.stderr)
        return 2

    if getattr(args, "data", None):
        return _run_folder(args)
    if args.model.split(".", 1)[0] not in NOISY_MODELS:
        return fail(f"unknown model {args.model!r}; expected one of {sorted(NOISY_MODELS)}")
    if args.steps < 1 or args.batch_size < 1 or args.img_size < 1 or args.num_classes < 2:
        return fail(f"--steps, --batch-size, --img-size must be >= 1 and --num-classes >= 2, got {args.steps}, "
                    f"{args.batch_size}, {args.img_size}, {args.num_classes}")
    try:
        noise = parse_noise(args.noise) if isinstance(args.noise, str) else args.noise
        model_kwargs = json.loads(args.model_kwargs) if isinstance(args.model_kwargs, str) else dict(args.model_kwargs)
    except (NoisyNNError, argparse.ArgumentTypeError, json.JSONDecodeError) as e:
        return fail(str(e))
    if not isinstance(model_kwargs, dict):
        return fail(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.batch_size % world:
        return fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    device = _device(args.device, local_rank)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    log = (lambda *a: print(*a, flush=True)) if (rank == 0 and not args.quiet) else (lambda *a: None)

    try:
        if noise is not None and noise is not False and noise.seed is not None and distributed:
            noise = noise.replace(seed=noise.seed + rank)  # independent noise per process
        torch.manual_seed(args.seed)  # the same initial weights in every process
        model = timm.create_model(args.model, img_size=args.img_size, num_classes=args.num_classes, noise=noise,
                                  **model_kwargs)
        if args.fused:
            swap_fused_ops(model, backend=args.backend)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        torch.manual_seed(args.seed + 1 + rank)  # dropout / unseeded noise: a stream per process
        net = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        lr = 0.01 if args.lr is None else args.lr
        if getattr(args, "opt", None) == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=lr if args.lr is not None else 1e-3,
                                    weight_decay=args.weight_decay)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
        local = args.batch_size // world
        log(f"noisynn train: {args.model} on {device} x {world} process(es), global batch {args.batch_size} "
            f"({local} per process), {args.steps} steps, noise {_describe(noise)}{', fused' if args.fused else ''}")
        losses: list[float] = []
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(_synthetic_batches(args.steps, args.batch_size, args.num_classes,
                                                         args.img_size, args.seed)):
            x, y = x[rank * local:(rank + 1) * local].to(device), y[rank * local:(rank + 1) * local].to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            if step == args.steps - 1:
                grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
            opt.step()
            global_loss = loss.detach().clone()
            if distributed:
                dist.all_reduce(global_loss)
                global_loss /= world
            losses.append(float(global_loss))
            if args.log_every and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
                log(f"step {step + 1}/{args.steps} loss {losses[-1]:.5f} ({time.perf_counter() - t0:.1f} s)")
    except NoisyNNError as e:
        if distributed:
            dist.destroy_process_group()
        return fail(str(e))

    if rank == 0 and args.out:
        params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        torch.save({"losses": losses, "grads": grads, "params": params, "world_size": world,
                    "args": {k: v for k, v in vars(args).items()
                             if isinstance(v, (str, int, float, bool, type(None)))}},
                   args.out)
        log(f"saved {args.out}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def create_model(name: str, *, num_classes: int, img_size: int | None = None, model_kwargs: dict | None = None,
                 noise: Any = None, pretrained: bool = False):
    """Build ``name`` with timm; returns ``(model, arch, create_kwargs)``.

    ``name`` is a registered noisy model (``noise``: a NoiseConfig, ``None`` for its default noise,
    ``False`` for none) or any timm model (``noise``: ``None`` / ``False`` for the plain model, else applied
    with :func:`~noisynn_kernels.apply_noisynn`).  ``arch`` is the plain timm architecture and
    ``create_kwargs`` the keyword arguments that build it: ``timm.create_model(arch, **create_kwargs)`` is
    the plain model whose ``state_dict`` keys are ``model``'s.  ``img_size`` is passed to architectures
    that take it (ViT family) and left out for the others.  Raises :class:`~noisynn_kernels.ConfigError`
    for a name timm does not know or arguments it rejects.
    """
    import timm
    from timm.models import is_model

    from .errors import ConfigError
    from .models import NOISY_MODELS, apply_noisynn, base_model_name

    base = name.split(".", 1)[0]
    noisy = base in NOISY_MODELS
    if not noisy and not is_model(name):
        hint = [m for m in timm.list_models(f"*{base.split('_')[0][:12]}*")][:8] if base else []
        raise ConfigError(f"timm does not know the model {name!r}; expected a registered noisy model "
                          f"({', '.join(sorted(NOISY_MODELS)[:3])}, ...) or a timm model name"
                          + (f" such as {', '.join(hint)}" if hint else " (see timm.list_models())"))
    arch = base_model_name(name) if noisy else base
    kwargs = {**(model_kwargs or {}), "num_classes": num_classes}
    if img_size is not None:
        kwargs["img_size"] = img_size

    def build(kw):
        if noisy:
            return timm.create_model(name, pretrained=pretrained, noise=False if noise is False else noise, **kw)
        model = timm.create_model(name, pretrained=pretrained, **kw)
        if noise is not None and noise is not False:
            apply_noisynn(model, noise)
        return model

    try:
        try:
            model = build(kwargs)
        except TypeError as e:
            if "img_size" not in str(e) or "img_size" in (model_kwargs or {}):
                raise
            kwargs.pop("img_size")  # not a ViT: its input size is free
            model = build(kwargs)
    except TypeError as e:
        raise ConfigError(f"timm.create_model({name!r}) rejected the arguments {kwargs}: {e}") from None
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        # no network / no cached file, or weights that do not fit the arguments (e.g. another img_size)
        raise ConfigError(f"timm could not load the pretrained weights of {name!r} with {kwargs}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return model, arch, kwargs


def amp_dtype(amp: str | None, device):
    """The autocast dtype of ``--amp``: ``None`` (off), ``auto`` (bfloat16 on CPU, float16 on CUDA),
    ``float16`` or ``bfloat16``."""
    import torch

    if amp is None:
        return None
    if amp == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    from .errors import ConfigError

    if amp not in ("float16", "bfloat16"):
        raise ConfigError(f"--amp must be auto, float16 or bfloat16, got {amp!r}")
    return getattr(torch, amp)


class _EpochBar:
    """The progress bar of one epoch on stderr: redrawn in place on a terminal, four lines otherwise."""

    def __init__(self, total: int, title: str, enabled: bool):
        self.total, self.title, self.enabled = total, title, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.marks = {max(1, round(total * f)) for f in (0.25, 0.5, 0.75)}

    def update(self, done: int, loss: float, images: int) -> None:
        if not self.enabled:
            return
        rate = images / max(time.perf_counter() - self.t0, 1e-9)
        filled = round(20 * done / self.total)
        line = (f"{self.title} [{'#' * filled}{'.' * (20 - filled)}] {done}/{self.total} loss {loss:.4f} "
                f"{rate:.1f} img/s")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif done in self.marks and done < self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print("\r" + " " * 100 + "\r", end="", file=sys.stderr, flush=True)


def _check_run_args(args, world: int) -> str | None:
    """The message for an invalid --data run argument, or ``None``."""
    for name in ("epochs", "batch_size", "img_size"):
        v = getattr(args, name)
        if v < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {v}"
    if args.workers < 0:
        return f"--workers must be >= 0, got {args.workers}"
    if args.lr is not None and not args.lr > 0:
        return f"--lr must be > 0, got {args.lr}"
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        return f"--warmup-epochs must be in [0, --epochs = {args.epochs}], got {args.warmup_epochs}"
    if args.batch_size % world:
        return f"--batch-size {args.batch_size} is not divisible by the {world} processes"
    if args.out is not None and os.path.isfile(args.out):
        return f"--out {args.out!r} is a file; a --data run writes a directory (checkpoint.pt, log.json)"
    return None


def _evaluate(model, dataset, batch_size: int, device, amp, rank: int, world: int, workers: int):
    """``(correct, count)`` of ``model`` on ``dataset``, summed over processes (each takes every
    ``world``-th image: no padding, every image counted once)."""
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    shard = list(range(rank, len(dataset), world))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=workers)
    was = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                correct[0] += (model(x).argmax(-1) == y).sum()
                correct[1] += len(y)
    finally:
        model.train(was)
    if world > 1:
        dist.all_reduce(correct)
    return int(correct[0]), int(correct[1])


def _run_folder(args: argparse.Namespace) -> int:
    """``--data`` run (see the module docstring); returns the exit code."""
    import math

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler

    from ._progress import Progress
    from .analysis.data import ImageFolderDataset, model_transform, scan_image_folder
    from .errors import NoisyNNError
    from .models import noise_config
    from .models.fused import swap_fused_ops

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world > 1

    def fail(msg: str) -> int:
        print(f"noisynn train: {msg}", file=sys.stderr)
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
        return 2

    bad = _check_run_args(args, world)
    if bad:
        return fail(bad)
    out_dir = args.out or "train-results"
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if (rank == 0 and not args.quiet) else (lambda *a: None)
    try:
        noise = parse_noise(args.noise) if isinstance(args.noise, str) else args.noise
        model_kwargs = json.loads(args.model_kwargs) if isinstance(args.model_kwargs, str) else dict(args.model_kwargs)
        if not isinstance(model_kwargs, dict):
            return fail(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
        device = _device(args.device, local_rank)
        amp = amp_dtype(args.amp, device)
    except (NoisyNNError, argparse.ArgumentTypeError, json.JSONDecodeError) as e:
        return fail(str(e))
    if distributed and not dist.is_initialized():
        # before the folder check: the processes share the decoding and end with the same index (or error)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def gather(items: list) -> list:
        if not distributed:
            return items
        parts: list = [None] * world
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    try:
        index = scan_image_folder(args.data, on_bad_image=args.bad_images, workers=args.workers, shard=(rank, world),
                                  gather=gather, progress=lambda m: log(f"noisynn train: --data: {m}"))
        val_index = None
        if args.val_data:
            val_index = scan_image_folder(args.val_data, on_bad_image=args.bad_images, workers=args.workers,
                                          shard=(rank, world), gather=gather,
                                          progress=lambda m: log(f"noisynn train: --val-data: {m}"))
            if val_index.classes != index.classes:
                return fail(f"--val-data {args.val_data!r} has classes {val_index.classes}; expected the classes of "
                            f"--data {args.data!r}: {index.classes}")
        plain_noise = noise is None and not args.model.startswith("noisy_")
        torch.manual_seed(args.seed)  # the same initial weights in every process
        model, arch, create_kwargs = create_model(args.model, num_classes=len(index.classes), img_size=args.img_size,
                                                  model_kwargs=model_kwargs, noise=False if plain_noise else noise,
                                                  pretrained=args.pretrained)
    except NoisyNNError as e:
        return fail(str(e))
    except RuntimeError as e:  # timm: pretrained weights that cannot be loaded here
        return fail(f"could not build {args.model!r}: {e}")

    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        cfg = noise_config(model)
        if cfg is not None and cfg.seed is not None and distributed:
            from .models import apply_noisynn, remove_noisynn

            apply_noisynn(remove_noisynn(model), cfg.replace(seed=cfg.seed + rank))  # independent noise per process
        if args.fused:
            swap_fused_ops(model, backend=args.backend)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        in_chans = int(model_kwargs.get("in_chans", 3))
        mode = "L" if in_chans == 1 else "RGB"
        train_tf = model_transform(model, args.img_size, training=True, augment=args.augment, in_chans=in_chans)
        eval_tf = model_transform(model, args.img_size, training=False, in_chans=in_chans)
        train_ds = ImageFolderDataset(index, train_tf, mode=mode)
        val_ds = ImageFolderDataset(val_index, eval_tf, mode=mode) if val_index is not None else None
        local = args.batch_size // world
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        loader = DataLoader(train_ds, batch_size=local, sampler=sampler, num_workers=args.workers,
                            pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
        opt_name = args.opt or "adamw"
        lr = args.lr if args.lr is not None else (1e-3 if opt_name == "adamw" else 0.01)
        if opt_name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
        steps_per_epoch = len(loader)
        total_steps = args.epochs * steps_per_epoch
        warm = round(args.warmup_epochs * steps_per_epoch)

        def lr_factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if args.sched == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        scaler = torch.amp.GradScaler("cuda") if (amp == torch.float16 and device.type == "cuda") else None
        history: list[dict] = []
        start_epoch = 0
        if args.resume:
            start_epoch, history = _resume(args.resume, model, opt, sched, scaler, arch, index.classes)
        torch.manual_seed(args.seed + 1 + rank + 1000 * start_epoch)  # dropout / unseeded noise: a stream per process
        net = model
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        cfg = noise_config(model)
        log(f"noisynn train: {args.model} ({arch}, {sum(p.numel() for p in model.parameters()):,} parameters) on "
            f"{device} x {world} process(es); {len(train_ds)} images in {len(index.classes)} classes"
            + (f" ({len(index.skipped)} unreadable skipped)" if index.skipped else "")
            + (f", {len(val_ds)} validation images" if val_ds is not None else "")
            + f"; global batch {args.batch_size} ({local} per process), {args.epochs} epoch(s) of {steps_per_epoch} "
              f"steps, {opt_name} lr {lr:g} {args.sched}; noise {_describe(cfg if cfg is not None else False)}"
            + (", fused" if args.fused else "") + (f", amp {str(amp).replace('torch.', '')}" if amp else ""))
        if start_epoch:
            log(f"noisynn train: resumed from {args.resume} after epoch {start_epoch}")
        progress = Progress(args.epochs, rank != 0 or args.quiet, width=len(str(args.epochs)))
        progress.done = start_epoch
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
        for epoch in range(start_epoch, args.epochs):
            sampler.set_epoch(epoch)
            net.train()
            bar = _EpochBar(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", rank == 0 and not args.quiet)
            stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, images (local)
            t0 = time.perf_counter()
            for i, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    logits = net(x)
                    loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                sched.step()
                stats += torch.stack([loss.detach().double() * len(y), (logits.argmax(-1) == y).sum().double(),
                                      torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
                bar.update(i + 1, float(stats[0] / stats[2]), int(stats[2]) * world)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            bar.close()
            if distributed:
                dist.all_reduce(stats)
            record = {"epoch": epoch + 1, "train_loss": float(stats[0] / stats[2]),
                      "train_accuracy": float(stats[1] / stats[2]), "images": int(stats[2]),
                      "seconds": seconds, "images_per_second": float(stats[2]) / seconds,
                      "lr": sched.get_last_lr()[0]}
            if val_ds is not None:
                correct, count = _evaluate(model, val_ds, local, device, amp, rank, world, args.workers)
                record.update(val_accuracy=correct / count, val_images=count)
            history.append(record)
            progress(f"epoch {epoch + 1}/{args.epochs}  loss {record['train_loss']:.4f}  train acc "
                     f"{100 * record['train_accuracy']:.1f}%"
                     + (f"  val acc {100 * record['val_accuracy']:.1f}%" if val_ds is not None else "")
                     + f"  {record['images_per_second']:.1f} img/s")
            if rank == 0:
                _save(out_dir, model, opt, sched, scaler, args, arch, create_kwargs, index, val_index, cfg,
                      history, epoch + 1)
    except NoisyNNError as e:
        return fail(str(e))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        last = history[-1] if history else {}
        rate = [h["images_per_second"] for h in history[start_epoch:]] or [float("nan")]
        print(f"noisynn train: {len(history)} epoch(s), {len(train_ds)} images, {len(index.classes)} classes: "
              f"loss {last.get('train_loss', float('nan')):.4f}, train accuracy "
              f"{100 * last.get('train_accuracy', float('nan')):.1f}%"
              + (f", val accuracy {100 * last['val_accuracy']:.1f}%" if "val_accuracy" in last else "")
              + f", {sum(rate) / len(rate):.1f} images/s; checkpoint {os.path.join(out_dir, 'checkpoint.pt')}, log "
                f"{os.path.join(out_dir, 'log.json')}", flush=True)
    return 0


def _resume(path: str, model, opt, sched, scaler, arch: str, classes: list[str]):
    """Load a checkpoint of this run into the model and optimizer state; returns ``(epoch, history)``."""
    import torch

    from .errors import ConfigError

    if not os.path.isfile(path):
        raise ConfigError(f"--resume {path!r} is not a file; expected the checkpoint.pt of an earlier run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unpickling failure)
        raise ConfigError(f"--resume {path!r} could not be read as a checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"--resume {path!r} is not a noisynn train checkpoint (format {CHECKPOINT_FORMAT!r})")
    if ckpt["arch"] != arch or ckpt["classes"] != classes:
        raise ConfigError(f"--resume {path!r} is for {ckpt['arch']} on classes {ckpt['classes']}; this run is {arch} "
                          f"on {classes}")
    model.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["epoch"]), list(ckpt["history"])


#: ``format`` entry of a ``noisynn train`` checkpoint.
CHECKPOINT_FORMAT = "noisynn-train/1"


def _save(out_dir, model, opt, sched, scaler, args, arch, create_kwargs, index, val_index, cfg, history, epoch):
    """Write ``checkpoint.pt`` (atomically) and ``log.json``."""
    import torch

    ckpt = {"format": CHECKPOINT_FORMAT, "arch": arch, "create_kwargs": create_kwargs, "model_name": args.model,
            "img_size": args.img_size, "in_chans": int(create_kwargs.get("in_chans", 3)),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "classes": list(index.classes),
            "noise": None if cfg is None else cfg.to_dict(), "epoch": epoch, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "history": history, "args": _plain_args(args)}
    path = os.path.join(out_dir, "checkpoint.pt")
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
    from .bench.environment import environment

    log = {"args": _plain_args(args), "arch": arch, "create_kwargs": create_kwargs,
           "noise": ckpt["noise"], "data": index.summary(), "val_data": val_index.summary() if val_index else None,
           "world_size": int(os.environ.get("WORLD_SIZE", "1")), "epochs": history,
           "environment": environment(next(model.parameters()).device), "checkpoint": path}
    with open(os.path.join(out_dir, "log.json"), "w") as f:
        json.dump(log, f, indent=1, default=str)


def _plain_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m noisynn_kernels.train`` (and of ``noisynn train``)."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
