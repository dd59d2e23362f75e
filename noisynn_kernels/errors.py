"""Exception types raised by noisynn_kernels.

Every error the package raises on bad input derives from :class:`NoisyNNError`, so a caller can
catch the whole family at once.  Messages say what was given and what was expected.
"""

from __future__ import annotations

__all__ = [
    "NoisyNNError",
    "QualityMatrixError",
    "ShapeError",
    "ConfigError",
    "BatchDependenceError",
    "BackendUnavailableError",
    "UnsupportedModelError",
]


class NoisyNNError(Exception):
    """Base class of every error raised by noisynn_kernels."""


class QualityMatrixError(NoisyNNError, ValueError):
    """A quality matrix ``Q`` (or the mixing matrix ``M = I + Q``) breaks a condition of the method:
    not square, non-finite entries, not invertible, or row dominance ``M[i,i] >= M[i,j]`` broken."""


class ShapeError(NoisyNNError, ValueError):
    """A tensor has a rank, size, dtype or layout the op cannot take."""


class ConfigError(NoisyNNError, ValueError):
    """A :class:`~noisynn_kernels.NoiseConfig` field or op argument has an invalid value."""


class BatchDependenceError(NoisyNNError, RuntimeError):
    """Batch-axis mixing was about to run at inference without an explicit opt-in.

    Mixing along the batch axis makes each prediction depend on the other samples in the batch;
    the NoisyNN paper's headline accuracy was measured that way on class-sorted test batches."""


class BackendUnavailableError(NoisyNNError, RuntimeError):
    """A kernel backend was requested explicitly but is not available in this installation."""


class UnsupportedModelError(NoisyNNError, TypeError):
    """A model's architecture is not one that apply_noisynn / swap_fused_ops knows how to patch."""
