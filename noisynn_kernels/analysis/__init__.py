"""Honest diagnostics for NoisyNN: batch dependence, entropy estimates and layer sensitivity.

- :func:`batch_dependence` evaluates a model under class-sorted batches, shuffled batches and batch
  size 1, and reports the accuracy under each plus how much any single sample's output moved when
  only the *rest of its batch* changed.  Sample-local noise must show none; batch-axis mixing at
  inference (the official NoisyViT protocol) shows it.
- :func:`gaussian_entropy`, :func:`conditional_entropy_gaussian` and :func:`entropy_diagnostics`
  estimate ``H(Z)`` and ``H(Y|Z)`` of a features tensor under Gaussian assumptions, before and after
  a noise, next to the paper's entropy change ``dS = -log|det(I+Q)|`` (:func:`entropy_change`).
- :func:`layer_sensitivity` repeats one small training run with the noise at each block in turn.
- :func:`profile_training` / :func:`profile_models` profile a few training steps (``torch.profiler``)
  and split the step's time into the noisynn ops, LayerNorm / add, attention, matmuls and the rest.

Every entry point that takes samples takes a tensor, a map-style ``Dataset`` of ``(input, label)``
pairs or a ``DataLoader`` over one; datasets are read batch by batch (the entropy estimators, which
need every sample at once, load them).  :func:`scan_image_folder` and :class:`ImageFolderDataset` read
an image folder (one sub-folder per class) through timm's data pipeline (:func:`model_transform`).

The batch-dependence guard of :class:`~noisynn_kernels.NoiseConfig` is never bypassed here: nothing
in this package builds a batch-axis config or flips ``allow_batch_dependence``.  A model whose noise
mixes the batch at inference can only reach these functions if its config was opted in explicitly.

Modules, each importing only the ones listed before it (and the library below):

- ``_checks``: the argument checks and input handling the others share;
- :mod:`.data`: image folders and the sample sources (tensor, Dataset, DataLoader);
- :mod:`.batch`: batch orderings, inference by batches and :func:`batch_dependence`;
- :mod:`.entropy`: Gaussian entropy estimates, :func:`apply_noise` and :func:`entropy_diagnostics`;
- :mod:`.training`: :class:`TrainSettings`, :func:`train_classifier`, :func:`evaluate_accuracy`;
- :mod:`.layers`: :func:`layer_sensitivity`;
- :mod:`.profile`: :func:`profile_models`, :func:`profile_training` (imports only ``_checks``).
"""

from .batch import (
                    ORDERINGS,
                    BatchDependenceResult,
                    batch_dependence,
                    default_tolerance,
                    ordering_batches,
                    predict,
                    rotated_batches,
)
from .data import (
                      BAD_IMAGE_POLICIES,
                      FolderIndex,
                      ImageFolderDataset,
                      SampleSource,
                      as_source,
                      model_transform,
                      scan_image_folder,
)
from .entropy import (
                      EntropyDiagnostics,
                      apply_noise,
                      conditional_entropy_gaussian,
                      entropy_change,
                      entropy_diagnostics,
                      gaussian_entropy,
                      label_entropy,
                      shrunk_covariance,
)
from .layers import LayerSensitivity, layer_sensitivity
from .profile import CATEGORIES, ProfileResult, profile_models, profile_training
from .training import TrainSettings, evaluate_accuracy, train_classifier

__all__ = [
    "ORDERINGS",
    "ordering_batches",
    "rotated_batches",
    "BatchDependenceResult",
    "batch_dependence",
    "default_tolerance",
    "entropy_change",
    "label_entropy",
    "gaussian_entropy",
    "shrunk_covariance",
    "conditional_entropy_gaussian",
    "apply_noise",
    "EntropyDiagnostics",
    "entropy_diagnostics",
    "TrainSettings",
    "train_classifier",
    "predict",
    "evaluate_accuracy",
    "LayerSensitivity",
    "layer_sensitivity",
    "BAD_IMAGE_POLICIES",
    "FolderIndex",
    "scan_image_folder",
    "ImageFolderDataset",
    "model_transform",
    "SampleSource",
    "as_source",
    "CATEGORIES",
    "ProfileResult",
    "profile_models",
    "profile_training",
]
