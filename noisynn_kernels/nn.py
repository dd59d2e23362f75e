"""Modules: the noise layer that models carry at their noise site."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from . import functional as F
from .config import NoiseConfig
from .errors import ConfigError, UnsupportedModelError

__all__ = ["NoiseInjection"]

NOT_SCRIPTABLE_MESSAGE = (
    "noisynn_kernels models cannot be compiled by TorchScript (torch.jit.script): the noise module holds a "
    "NoiseConfig and per-device generators, and the fused block stack calls torch.library ops from Python. "
    "Use torch.export.export(model.eval(), (x,)) or torch.compile(model) instead (both keep the noisynn:: ops), "
    "or torch.jit.trace for a fixed input shape.")


class NoiseInjection(nn.Module):
    """Applies one :class:`NoiseConfig` to its input, in the modes the config switches on.

    Args:
        config: the noise (a NoiseConfig, a dict of its fields or a kind name).
        prefix_tokens: leading class / register tokens of ``(B, N, D)`` inputs, left unchanged.
        grid: ``(gh, gw)`` patch grid for ``axis='rows'`` on tokens (inferred when square).

    The module holds no persistent state: adding it to a model leaves ``state_dict()`` unchanged.  A
    ``dense`` quality matrix is a non-persistent buffer, so it follows ``.to(device)``.  With
    ``config.seed`` set, the random kinds draw from the module's own generator (one per device,
    seeded on first use; :meth:`reset_generator` starts the sequence again).

    Random kinds run through :func:`noisynn_kernels.gaussian_noise` /
    :func:`noisynn_kernels.salt_and_pepper_noise` with the automatic backend: the fused Triton kernels
    on CUDA (the kernel's Philox seed drawn from the same generator), the reference ops elsewhere.

    Distributed training: ``axis='batch'`` mixes the samples of the batch this process sees, so under
    ``DistributedDataParallel`` each process mixes only its local batch (results differ from one
    process on the global batch); a warning says so once per module when a ``torch.distributed``
    process group with world size > 1 is initialized.  ``tokens`` / ``rows`` noise is sample-local
    and gives the same gradients as one process on the global batch.  Random kinds with ``seed`` draw
    the same stream in every process: offset the seed by the rank for independent noise.

    TorchScript cannot compile this module (it holds a NoiseConfig and per-device generators):
    ``torch.jit.script`` raises :class:`~noisynn_kernels.UnsupportedModelError`; use
    ``torch.export.export`` or ``torch.compile``.
    """

    def __init__(self, config, prefix_tokens: int = 0, grid: Sequence[int] | None = None):
        super().__init__()
        cfg = NoiseConfig.coerce(config)
        if cfg is None:
            raise TypeError("NoiseInjection needs a noise config, got None")
        self.config = cfg
        self.prefix_tokens = prefix_tokens
        self.grid: tuple[int, int] | None = tuple(grid) if grid is not None else None
        self.register_buffer("quality_matrix", cfg.matrix, persistent=False)
        self._generators: dict[str, torch.Generator] = {}
        self._validated_k: set = set()
        self._warned_local_batch = False

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it: fail here, clearly,
        # instead of deep inside the TorchScript frontend.
        raise UnsupportedModelError(NOT_SCRIPTABLE_MESSAGE)

    def warn_if_local_batch_mix(self) -> None:
        """Warn (once per module) when batch-dependent noise (batch-axis mixing, a batch-wide
        salt-and-pepper range) runs in a ``torch.distributed`` process group of world size > 1: each
        process then sees only its own local batch."""
        if getattr(self, "_warned_local_batch", False) or not self.config.batch_dependent:  # (older pickles lack it)
            return
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world <= 1:
            return
        self._warned_local_batch = True
        what = ("axis='batch'" if self.config.mixes_batch else "value_range='batch'")
        warnings.warn(
            f"NoiseInjection(kind={self.config.kind!r}, {what}) runs in a torch.distributed process group of "
            f"world size {world}: it mixes only the samples of this process's local batch, not the global batch, "
            "so results differ from one process on the global batch. Use axis='tokens' or 'rows' (or "
            "value_range='sample') for sample-local noise.", UserWarning, stacklevel=2)

    def reset_generator(self) -> None:
        """Forget the per-device generators, so the next call starts again from ``config.seed``."""
        self._generators.clear()

    def _generator(self, x: torch.Tensor) -> torch.Generator | None:
        if self.config.seed is None:
            return None
        key = str(x.device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(self.config.seed)
            self._generators[key] = gen
        return gen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not cfg.active(self.training):
            return x
        prefix = self.prefix_tokens if x.dim() == 3 else 0
        if cfg.is_linear:
            self.warn_if_local_batch_mix()
            grid = self.grid if (x.dim() == 3 and cfg.axis == "rows") else None
            # Validating a dense I + Q costs an SVD: do it once per mixed size k.
            check = cfg.check_matrix and (cfg.kind != "dense" or F.mixed_size(x, cfg.axis, prefix, grid)
                                          not in self._validated_k)
            out = F.linear_transform_noise(x, cfg.kind, axis=cfg.axis, alpha=cfg.alpha, matrix=self.quality_matrix,
                                           prefix_tokens=prefix, grid=grid,
                                           straight_through=cfg.straight_through, check=check, shift=cfg.shift)
            if check and cfg.kind == "dense":
                self._validated_k.add(F.mixed_size(x, cfg.axis, prefix, grid))
            return out
        generator = self._generator(x)
        self.warn_if_local_batch_mix()
        if cfg.kind == "gaussian":
            return F.gaussian_noise(x, std=cfg.std, mean=cfg.mean, strength=cfg.strength, prefix_tokens=prefix,
                                    generator=generator)
        if cfg.kind == "salt_and_pepper":
            return F.salt_and_pepper_noise(x, cfg.p, low=cfg.low, high=cfg.high, value_range=cfg.value_range,
                                           prefix_tokens=prefix, generator=generator)
        raise ConfigError(f"NoiseInjection has no implementation of kind={cfg.kind!r}")  # a kind added to config only

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"kind={c.kind}"]
        if c.is_linear:
            parts.append(f"axis={c.axis}")
            if c.kind == "shift":
                parts.append(f"alpha={c.alpha}, shift={c.shift:+d}")
        parts += [f"prefix_tokens={self.prefix_tokens}", f"train={c.train}", f"eval={c.eval}"]
        return ", ".join(parts)
