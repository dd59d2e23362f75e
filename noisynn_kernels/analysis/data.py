"""Image folders and the sample sources of the analyses.

- :func:`scan_image_folder` checks a folder laid out as torchvision's ``ImageFolder`` / timm's
  ``create_dataset`` expect (one sub-folder per class, images anywhere below it) and decodes every image
  once, so that unreadable files are found before a run starts: they stop it (``on_bad_image='stop'``)
  or are left out and counted (``'skip'``), never silently replaced.
- :class:`ImageFolderDataset` streams the images of a scanned folder through a transform (timm's data
  pipeline, :func:`model_transform`); its ``targets`` are known without opening an image.
- :class:`SampleSource` is what the analysis entry points take their samples from: an in-memory tensor,
  any map-style ``Dataset`` of ``(input, label)`` pairs, or a ``DataLoader`` over one (its dataset,
  workers and collate function are used; the batches are the analysis's own).  :func:`as_source` builds
  one and checks it.

The module depends on the library (errors), ``_checks`` and on torch, PIL and timm, never on another
analysis module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import ConfigError, ShapeError
from ._checks import check_labels

__all__ = ["IMAGE_EXTENSIONS", "BAD_IMAGE_POLICIES", "FolderIndex", "scan_image_folder", "ImageFolderDataset",
           "model_transform", "SampleSource", "as_source"]

#: File name endings counted as images (lower case), as timm's and torchvision's folder readers.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: What :func:`scan_image_folder` does with a file that does not decode: ``stop`` (raise, naming it)
#: or ``skip`` (leave it out and count it in :attr:`FolderIndex.skipped`).
BAD_IMAGE_POLICIES = ("stop", "skip")


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


@dataclass
class FolderIndex:
    """A checked image folder (:func:`scan_image_folder`).

    Attributes:
        root: the folder, as given.
        classes: class names (sub-folder names) in natural sort order; class ``i`` is label ``i``.
        samples: ``(path, label)`` of every readable image, sorted by path.
        skipped: ``(path, reason)`` of every image left out because it did not decode (``on_bad_image='skip'``).
        ignored: files below ``root`` that are not images by their name (not counted as samples), and files
            directly in ``root`` (outside any class folder).
    """

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order."""
        return [t for _, t in self.samples]

    def class_counts(self) -> dict[str, int]:
        """Images per class name."""
        counts = dict.fromkeys(self.classes, 0)
        for _, t in self.samples:
            counts[self.classes[t]] += 1
        return counts

    def summary(self) -> dict[str, Any]:
        """Plain-data description for JSON logs and reports (skipped files listed, at most 50)."""
        return {"root": os.path.abspath(self.root), "classes": list(self.classes), "images": len(self.samples),
                "per_class": self.class_counts(), "skipped": len(self.skipped),
                "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped[:50]],
                "ignored_files": len(self.ignored)}


def _decode(path: str, mode: str | None = None):
    """The image at ``path`` fully decoded (PIL), converted to ``mode`` when given."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert(mode) if mode else img.copy()


class _Probe(Dataset):
    """Decodes one file per item; returns the error message, or ``''`` when it decodes."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            _decode(self.paths[i])
            return ""
        except Exception as e:  # noqa: BLE001  (any decoder failure makes the file unreadable)
            return f"{type(e).__name__}: {e}" or type(e).__name__


def scan_image_folder(root, *, on_bad_image: str = "stop", workers: int = 0,
                      progress: Callable[[str], None] | None = None, shard: tuple[int, int] = (0, 1),
                      gather: Callable[[list], list] | None = None) -> FolderIndex:
    """Check the image folder ``root`` and index its images (see :class:`FolderIndex`).

    ``root`` must be a directory whose sub-folders are the classes (at least two, each with at least one
    image; images may sit in nested folders below a class folder).  Every image is decoded once (with
    ``workers`` DataLoader worker processes) so that a run never meets an unreadable file midway:
    ``on_bad_image='stop'`` raises :class:`~noisynn_kernels.ConfigError` naming the first such files,
    ``'skip'`` leaves them out and lists them in :attr:`FolderIndex.skipped`.  ``progress`` receives one
    line when the scan starts and one when it ends.

    Under several processes each decodes its share: ``shard=(rank, world)`` checks every ``world``-th image
    from ``rank`` on, and ``gather(list)`` must return the concatenation of every process's list (e.g. with
    ``torch.distributed.all_gather_object``), so every process ends with the same index and the same errors.

    Raises:
        ConfigError: ``root`` is not a folder, has fewer than two class folders, no images, a class folder
            without images, or (with ``stop``) an unreadable image.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an int >= 0, got {workers!r}")
    root = os.fspath(root)
    if not os.path.exists(root):
        raise ConfigError(f"image folder {root!r} does not exist; expected a folder with one sub-folder of images "
                          "per class")
    if not os.path.isdir(root):
        raise ConfigError(f"{root!r} is not a folder (it is a file); expected a folder with one sub-folder of images "
                          "per class")
    entries = sorted(os.listdir(root), key=_natural_key)
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    ignored = [os.path.join(root, e) for e in entries if os.path.isfile(os.path.join(root, e))]
    if len(classes) < 2:
        raise ConfigError(f"image folder {root!r} has {len(classes)} class folder(s) {classes}; expected at least "
                          "two sub-folders, one per class, each holding that class's images")
    paths: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, files in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in files:
                full = os.path.join(dirpath, f)
                (found if f.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(full)
        if not found:
            empty.append(name)
        paths.extend((p, label) for p in sorted(found, key=_natural_key))
    if not paths:
        raise ConfigError(f"image folder {root!r} holds no images in its {len(classes)} class folders (image files "
                          f"end in {', '.join(IMAGE_EXTENSIONS)}); {len(ignored)} other file(s) found")
    if empty:
        raise ConfigError(f"image folder {root!r}: class folder(s) {empty} hold no images; expected at least one "
                          "image in every class folder (remove empty folders, they would be classes without data)")
    if progress:
        progress(f"checking {len(paths)} images in {len(classes)} classes under {root}")
    rank, world = shard
    if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
        raise ConfigError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    mine = [p for p, _ in paths[rank::world]]
    probe = DataLoader(_Probe(mine), batch_size=None, num_workers=workers)
    bad = [(p, err) for p, err in zip(mine, probe) if err]
    if gather is not None:
        bad = gather(bad)
    order = {p: i for i, (p, _) in enumerate(paths)}
    bad = sorted(((p, err) for p, err in bad), key=lambda b: order[b[0]])
    if bad and on_bad_image == "stop":
        shown = "; ".join(f"{p} ({err})" for p, err in bad[:5])
        raise ConfigError(f"image folder {root!r}: {len(bad)} of {len(paths)} image(s) cannot be read: {shown}"
                          f"{' ...' if len(bad) > 5 else ''}. Fix or remove them, or skip and count them "
                          "(on_bad_image='skip', --bad-images skip)")
    bad_paths = {p for p, _ in bad}
    samples = [(p, t) for p, t in paths if p not in bad_paths]
    index = FolderIndex(root=root, classes=classes, samples=samples, skipped=bad, ignored=ignored)
    left = [c for c, n in index.class_counts().items() if n == 0]
    if left:
        raise ConfigError(f"image folder {root!r}: every image of class(es) {left} is unreadable ({len(bad)} "
                          "unreadable in all); expected at least one readable image per class")
    if progress:
        progress(f"{len(samples)} readable images" + (f", {len(bad)} unreadable skipped" if bad else ""))
    return index


class ImageFolderDataset(Dataset):
    """The images of a :class:`FolderIndex` as ``(transform(image), label)`` pairs, read on demand.

    ``mode`` is the PIL mode images are converted to (``RGB``; ``L`` for one-channel models).  An image that
    no longer decodes (changed since the scan) raises :class:`~noisynn_kernels.ConfigError` naming it.
    ``targets`` (a list of labels) and ``classes`` are available without reading any image.
    """

    def __init__(self, index: FolderIndex, transform: Callable | None = None, *, mode: str = "RGB"):
        if not isinstance(index, FolderIndex):
            raise ConfigError(f"index must be a FolderIndex (scan_image_folder), got {type(index).__name__}")
        self.index, self.transform, self.mode = index, transform, mode
        self.samples = index.samples
        self.classes = index.classes
        self.targets = index.targets

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        try:
            img = _decode(path, self.mode)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"image {path!r} could not be read ({type(e).__name__}: {e}); it decoded when the "
                              "folder was scanned, so it changed during the run") from None
        return (self.transform(img) if self.transform is not None else img), target


def model_transform(model, img_size: int, *, training: bool, augment: bool = True, in_chans: int = 3):
    """timm's data pipeline for ``model``: ``timm.data.create_transform`` at ``img_size`` with the
    normalisation, interpolation and crop of the model's ``pretrained_cfg`` (``resolve_model_data_config``).

    ``training=True`` gives timm's training transform (random resized crop, flip, colour jitter), or with
    ``augment=False`` the evaluation one; one-channel models (``in_chans=1``) use the mean of the
    configured per-channel mean and std.
    """
    from timm.data import create_transform, resolve_model_data_config

    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ConfigError(f"img_size must be an int >= 1, got {img_size!r}")
    cfg = resolve_model_data_config(model)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if in_chans != len(mean):
        mean = (sum(mean) / len(mean),) * in_chans
        std = (sum(std) / len(std),) * in_chans
    return create_transform((in_chans, img_size, img_size), is_training=training and augment,
                            interpolation=cfg.get("interpolation", "bilinear"), mean=mean, std=std,
                            crop_pct=cfg.get("crop_pct"), crop_mode=cfg.get("crop_mode"))


# --------------------------------------------------------------------------------------------------
# sample sources of the analyses
# --------------------------------------------------------------------------------------------------
class SampleSource:
    """Samples an analysis reads by index batches: from a tensor, a ``Dataset`` or a ``DataLoader``.

    ``n`` is the number of samples; ``targets`` their labels (a 1-D int64 tensor, or ``None`` when unknown);
    :meth:`batches` yields ``(indices, inputs)`` for a list of index batches, reading a dataset through a
    ``DataLoader`` with the given batches as its ``batch_sampler`` (so only one batch, or a few with
    workers, is in memory).  :meth:`tensor` loads every input (for estimators that need all samples).
    """

    def __init__(self, data, targets=None, *, workers: int = 0, collate_fn=None, name: str = "data"):
        self.name = name
        self._tensor: torch.Tensor | None = None
        self._dataset: Dataset | None = None
        self.workers, self.collate_fn = workers, collate_fn
        if isinstance(data, torch.Tensor):
            if data.dim() < 1 or data.shape[0] < 1:
                raise ShapeError(f"{name} must hold at least one sample along dim 0, got shape {tuple(data.shape)}")
            self._tensor = data
            self.n = data.shape[0]
        elif isinstance(data, TensorDataset) and len(data.tensors) >= 1:
            self._tensor = data.tensors[0]
            self.n = self._tensor.shape[0]
            if targets is None and len(data.tensors) >= 2:
                targets = data.tensors[1]
        else:
            if isinstance(data, (str, bytes, os.PathLike)):
                raise ShapeError(f"{name} must be a tensor, a Dataset or a DataLoader, got the path {data!r} (read a "
                                 "folder with ImageFolderDataset(scan_image_folder(path), transform))")
            try:
                self.n = len(data)
            except TypeError:
                raise ShapeError(f"{name} must be a torch.Tensor of samples (N, ...), a map-style Dataset of "
                                 f"(input, label) pairs or a DataLoader over one, got {type(data).__name__}") from None
            self._dataset = data
            if self.n < 1:
                raise ShapeError(f"{name} must hold at least one sample, got an empty {type(data).__name__}")
        self.targets = None if targets is None else check_labels(targets, self.n, f"targets of {name}")

    @property
    def in_memory(self) -> bool:
        """True for a tensor source (indexing is free; nothing is read)."""
        return self._tensor is not None

    def _label_of(self, item):
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            return item[1]
        raise ShapeError(f"{self.name}: a Dataset item must be an (input, label) pair to read labels from, got "
                         f"{type(item).__name__}; pass targets explicitly")

    def read_targets(self) -> torch.Tensor:
        """``targets``, read from the dataset when not known yet: its ``targets`` attribute (torchvision,
        :class:`ImageFolderDataset`), else every item's label (this reads every sample once)."""
        if self.targets is None:
            ds = self._dataset
            if ds is not None and getattr(ds, "targets", None) is not None:
                labels = ds.targets
            elif ds is not None:
                labels = [int(torch.as_tensor(self._label_of(ds[i]))) for i in range(self.n)]
            else:
                raise ConfigError(f"{self.name}: a tensor of inputs carries no labels; pass the labels "
                                  "(targets / y) with it")
            self.targets = check_labels(labels, self.n, f"targets of {self.name}")
        return self.targets

    def batches(self, index_batches: Sequence[torch.Tensor]):
        """``(indices, inputs)`` for every index batch, in order."""
        if self._tensor is not None:
            for idx in index_batches:
                yield idx, self._tensor[idx]
            return
        plan = [[int(i) for i in idx] for idx in index_batches]
        loader = DataLoader(self._dataset, batch_sampler=plan, num_workers=self.workers,
                            collate_fn=self.collate_fn)
        for idx, item in zip(plan, loader):
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor):
                raise ShapeError(f"{self.name}: a batch's inputs must be a tensor, got {type(x).__name__} (give the "
                                 "dataset a transform that returns tensors)")
            if x.shape[0] != len(idx):
                raise ShapeError(f"{self.name}: a batch of {len(idx)} indices gave inputs of shape {tuple(x.shape)}")
            yield torch.tensor(idx), x

    def tensor(self) -> torch.Tensor:
        """Every input stacked in one tensor (reads the whole dataset once)."""
        if self._tensor is not None:
            return self._tensor
        chunks = [x for _, x in self.batches(list(torch.split(torch.arange(self.n), 256)))]
        return torch.cat(chunks)


def as_source(data, targets=None, *, name: str = "data") -> SampleSource:
    """A :class:`SampleSource` over ``data``: a tensor ``(N, ...)``, a map-style ``Dataset`` of
    ``(input, label)`` pairs (a ``TensorDataset`` reads its tensors directly) or a ``DataLoader`` (its
    dataset, ``num_workers`` and ``collate_fn``; its own batching and order are replaced by the
    analysis's).  A ``SampleSource`` is returned as it is (with ``targets`` set when given)."""
    if isinstance(data, SampleSource):
        if targets is not None:
            data.targets = check_labels(targets, data.n, f"targets of {name}")
        return data
    if isinstance(data, DataLoader):
        if isinstance(data.dataset, torch.utils.data.IterableDataset):
            raise ShapeError(f"{name}: a DataLoader over an IterableDataset cannot be re-batched by index; "
                             "expected a map-style Dataset")
        return SampleSource(data.dataset, targets, workers=data.num_workers, collate_fn=data.collate_fn, name=name)
    return SampleSource(data, targets, name=name)
