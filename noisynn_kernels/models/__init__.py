"""timm integration: registered noisy models and in-place noise for existing timm models."""

from .patch import apply_noisynn, model_blocks, model_family, noise_config, remove_noisynn
from .registry import NOISY_MODELS, base_model_name

__all__ = ["apply_noisynn", "remove_noisynn", "noise_config", "model_family", "model_blocks",
           "NOISY_MODELS", "base_model_name"]
