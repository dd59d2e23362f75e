"""noisynn_kernels: NoisyNN noise injection as fused PyTorch ops and timm models.

Quick start::

    import timm, noisynn_kernels as nk
    model = timm.create_model("noisy_vit_small_patch16_224", noise=nk.NoiseConfig(kind="optimal", axis="tokens"))
    y = nk.linear_transform_noise(x, "shift", axis="rows", alpha=0.3, prefix_tokens=1)
"""

from . import analysis, quality, reference
from ._ext import backend_info
from .config import KINDS, POSITIONS, NoiseConfig
from .errors import (BackendUnavailableError, BatchDependenceError, ConfigError, NoisyNNError, QualityMatrixError,
                     ShapeError, UnsupportedModelError)
from .functional import (AXES, gaussian_noise, linear_transform_noise, mix_add_layernorm, noisy_attention,
                         salt_and_pepper_noise)
from .nn import NoiseInjection
from .models import NOISY_MODELS, apply_noisynn, noise_config, remove_noisynn
from .models.fused import is_swapped, swap_fused_ops, unswap_fused_ops

__version__ = "0.1.0"

__all__ = [
    "analysis", "quality", "reference", "backend_info",
    "NoiseConfig", "KINDS", "AXES", "POSITIONS",
    "linear_transform_noise", "gaussian_noise", "salt_and_pepper_noise", "mix_add_layernorm", "noisy_attention",
    "NoiseInjection", "apply_noisynn", "remove_noisynn", "noise_config", "NOISY_MODELS",
    "swap_fused_ops", "unswap_fused_ops", "is_swapped",
    "NoisyNNError", "QualityMatrixError", "ShapeError", "ConfigError", "BatchDependenceError",
    "BackendUnavailableError", "UnsupportedModelError",
]
