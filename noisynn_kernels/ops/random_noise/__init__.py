"""The random noises: Gaussian (``x + strength * N(mean, std)``) and salt-and-pepper (with probability
``p`` an element becomes ``high`` or ``low``, ``p/2`` each), both leaving prefix tokens untouched.

Definitions: :func:`noisynn_kernels.reference.gaussian_noise` and
:func:`noisynn_kernels.reference.salt_and_pepper_noise` (``low``/``high`` not given: the detached
minimum/maximum of each sample's non-prefix elements, or with ``value_range='batch'`` of the whole
batch's, the official latent-level rule).  Reproducibility: a ``generator`` (or the global RNG) or,
for the fused kernels, a ``seed``; the reference draws from ``torch.randn`` / ``torch.rand``, the
fused kernels from Philox keyed by ``(seed, element index)``, so the two agree in distribution, not
element by element.  The gradient is the identity for Gaussian noise and the unreplaced elements'
for salt-and-pepper (the fused backward regenerates the mask from the seed instead of storing it).

Files: :mod:`.triton` (the Triton ops, kernels in ``noisynn_kernels/triton/random_noise.py``) and
this module: the reference launchers and :data:`GAUSSIAN` / :data:`SALT_AND_PEPPER`, the
``{backend: launcher}`` tables of the two noises, by kind in :data:`LAUNCHERS`.  Launchers take
arguments checked by :mod:`noisynn_kernels.functional`.
"""

from __future__ import annotations

import torch

from ... import reference

__all__ = ["LAUNCHERS", "GAUSSIAN", "SALT_AND_PEPPER"]


def _generator(x: torch.Tensor, generator: torch.Generator | None, seed: int | None):
    if seed is None:
        return generator
    return torch.Generator(device=x.device).manual_seed(seed)


def gaussian_reference(x: torch.Tensor, *, std: float, mean: float, strength: float, prefix_tokens: int,
                       generator: torch.Generator | None, seed: int | None) -> torch.Tensor:
    """The ``reference`` Gaussian noise (``seed``: a fresh generator seeded with it)."""
    return reference.gaussian_noise(x, std=std, mean=mean, strength=strength, prefix_tokens=prefix_tokens,
                                    generator=_generator(x, generator, seed))


def salt_and_pepper_reference(x: torch.Tensor, p: float, *, low: float | None, high: float | None,
                              value_range: str, prefix_tokens: int, generator: torch.Generator | None,
                              seed: int | None) -> torch.Tensor:
    """The ``reference`` salt-and-pepper noise (``seed``: a fresh generator seeded with it)."""
    return reference.salt_and_pepper_noise(x, p, low=low, high=high, value_range=value_range,
                                           prefix_tokens=prefix_tokens, generator=_generator(x, generator, seed))


def gaussian_triton(x, **kwargs):
    """The ``triton`` Gaussian noise (:func:`.triton.launch_gaussian`), imported on first use."""
    from .triton import launch_gaussian

    return launch_gaussian(x, **kwargs)


def salt_and_pepper_triton(x, p, **kwargs):
    """The ``triton`` salt-and-pepper noise (:func:`.triton.launch_salt_and_pepper`), imported on first use."""
    from .triton import launch_salt_and_pepper

    return launch_salt_and_pepper(x, p, **kwargs)


#: Backend name -> launcher, per noise.
GAUSSIAN = {"reference": gaussian_reference, "triton": gaussian_triton}
SALT_AND_PEPPER = {"reference": salt_and_pepper_reference, "triton": salt_and_pepper_triton}
#: Random kind -> its table (the kinds of :data:`noisynn_kernels.config.RANDOM_KINDS`).
LAUNCHERS = {"gaussian": GAUSSIAN, "salt_and_pepper": SALT_AND_PEPPER}
