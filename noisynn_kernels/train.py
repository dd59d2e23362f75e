"""``noisynn train``: a small training run of a noisy timm model, alone or under ``torchrun``.

    python -m noisynn_kernels.train --model noisy_vit_tiny_patch16_224 --img-size 32 --steps 20 \\
        --batch-size 16 --noise optimal:tokens --seed 0 --out run.pt
    python -m torch.distributed.run --nproc_per_node 2 -m noisynn_kernels.train ... (same arguments)

The data are synthetic (one random template image per class plus Gaussian noise, drawn from
``--seed``), so a run needs no download.  ``--batch-size`` is the *global* batch: every process draws
the same global batch and trains on its own contiguous slice of it, so a run with ``W`` processes
and one with a single process see the same samples at every step.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) the process group is initialized from the
environment (``gloo`` on CPU, ``nccl`` on CUDA) and the model is wrapped in
``DistributedDataParallel``.  The loss is the mean over the local batch and DDP averages the
gradients, so sample-local noise (``tokens`` / ``rows`` linear noise) gives the gradients of one
process on the global batch.  Batch-axis noise mixes only the local batch (a warning says so).
Random noise with a ``seed`` is offset by the rank so that processes draw independent noise.

``--out`` (written by rank 0) is a ``torch.save`` file: ``losses`` (global mean loss per step),
``grads`` (parameter gradients of the last step, averaged over processes), ``params`` (final
parameters), ``world_size``, ``args``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

__all__ = ["add_arguments", "build_parser", "parse_noise", "run", "main"]


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
    p.add_argument("--model", default="noisy_vit_tiny_patch16_224", help="registered noisy model (timm name)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--model-kwargs", default="{}",
                   help='JSON object of extra timm.create_model arguments, e.g. \'{"depth": 2, "patch_size": 8}\'')
    p.add_argument("--noise", default="default",
                   help="default | none | KIND | KIND:AXIS | FIELD=VALUE,... | JSON object of NoiseConfig fields")
    p.add_argument("--fused", action="store_true", help="swap_fused_ops on the model (ViT family)")
    p.add_argument("--backend", default=None, help="kernel backend for --fused (default: per device)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16, help="global batch size (split across processes)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last memory format")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--out", default=None, help="torch.save file with losses, last-step grads, final params")
    p.add_argument("--log-every", type=int, default=1, help="print the loss every N steps (0: never)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noisynn train",
                                description="Train a noisy timm model on synthetic data for a few steps, alone or "
                                            "under torchrun (DistributedDataParallel).")
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
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m noisynn_kernels.train`` (and of ``noisynn train``)."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
