"""Real images as image folders for the tests: scikit-learn's 8 x 8 handwritten digits (shipped inside the
package, nothing downloaded) written as PNG files, one sub-folder per class, as a user's folder would be.

:func:`export_digits` writes ``per_class`` images of each class into ``root/<class>/<n>.png`` (upscaled by
``scale`` with nearest-neighbour, grey or RGB), taking images ``offset``, ``offset + 1``, ... of each class
so that a train and a validation folder can be drawn without overlap.
"""

from __future__ import annotations

import os

import numpy as np

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def export_digits(root, per_class: int, *, classes=range(10), offset: int = 0, scale: int = 2,
                  mode: str = "RGB") -> str:
    """Write the digits as an image folder under ``root`` (created); returns ``root`` as a string."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = os.fspath(root)
    for c in classes:
        folder = os.path.join(root, CLASS_NAMES[c])
        os.makedirs(folder, exist_ok=True)
        idx = np.flatnonzero(digits.target == c)[offset:offset + per_class]
        assert len(idx) == per_class, f"class {c} has too few images for offset {offset} + {per_class}"
        for k, i in enumerate(idx):
            pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
            img = Image.fromarray(pixels).resize((8 * scale, 8 * scale), Image.NEAREST)
            img.convert(mode).save(os.path.join(folder, f"{k:04d}.png"))
    return root
