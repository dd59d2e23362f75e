"""noisynn_kernels: NoisyNN noise injection as fused PyTorch ops and timm models.

Quick start::

    import timm, noisynn_kernels as nk
    model = timm.create_model("noisy_vit_small_patch16_224", noise=nk.NoiseConfig(kind="optimal", axis="tokens"))
    y = nk.linear_transform_noise(x, "shift", axis="rows", alpha=0.3, prefix_tokens=1)

``import noisynn_kernels`` loads the noises, the ops, the models and the backends.  The research
tools (``analysis``, ``audit``, ``bench``, ``train``) are subpackages loaded on first use, e.g.
``noisynn_kernels.analysis.batch_dependence`` or the ``noisynn`` command.
"""

import importlib

from . import quality, reference
from ._checks import AXES
from ._ext import backend_info
from ._version import __version__
from .config import KINDS, POSITIONS, NoiseConfig
from .errors import (
    BackendUnavailableError,
    BatchDependenceError,
    ConfigError,
    NoisyNNError,
    QualityMatrixError,
    ShapeError,
    UnsupportedModelError,
)
from .functional import (
    gaussian_noise,
    linear_transform_noise,
    mix_add_layernorm,
    noisy_attention,
    salt_and_pepper_noise,
)
from .models import NOISY_MODELS, apply_noisynn, noise_config, remove_noisynn
from .models.fused import is_swapped, swap_fused_ops, unswap_fused_ops
from .nn import NoiseInjection

#: The tools, imported when first used (not by ``import noisynn_kernels``).
TOOLS = ("analysis", "audit", "bench", "train")

__all__ = [
    "__version__", "analysis", "quality", "reference", "backend_info",
    "NoiseConfig", "KINDS", "AXES", "POSITIONS",
    "linear_transform_noise", "gaussian_noise", "salt_and_pepper_noise", "mix_add_layernorm", "noisy_attention",
    "NoiseInjection", "apply_noisynn", "remove_noisynn", "noise_config", "NOISY_MODELS",
    "swap_fused_ops", "unswap_fused_ops", "is_swapped",
    "NoisyNNError", "QualityMatrixError", "ShapeError", "ConfigError", "BatchDependenceError",
    "BackendUnavailableError", "UnsupportedModelError",
]


def __getattr__(name):
    # PEP 562: `noisynn_kernels.analysis` (and the other tools) work as attributes without being
    # imported by `import noisynn_kernels`.
    if name in TOOLS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
