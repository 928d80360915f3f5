"""Deterministic calibration subsets (which images feed the observers is part of a recipe)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qcompress.data.dataset import Annotation, DetectionDataset
from qcompress.errors import QCompressError


def calibration_indices(num_items: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of ``range(num_items)``, sorted, fixed by ``seed``.

    The sample is a prefix of one seeded permutation, so for a given seed a smaller subset is
    contained in a larger one. ``count >= num_items`` gives every index.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
        raise QCompressError(
            f"calibration image count must be a positive integer, got {count!r}",
            "pass e.g. --calib-images 100",
        )
    if num_items <= 0:
        raise QCompressError(
            "the calibration dataset has no images", "point --data at a non-empty dataset split"
        )
    if count >= num_items:
        return list(range(num_items))
    order = np.random.default_rng(int(seed)).permutation(num_items)
    return sorted(int(i) for i in order[:count])


class CalibrationSubset:
    """A view of ``count`` images of ``dataset`` chosen by :func:`calibration_indices`."""

    def __init__(self, dataset: DetectionDataset, count: int, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.indices: tuple[int, ...] = tuple(calibration_indices(len(dataset), count, seed))
        self.class_names: tuple[str, ...] = tuple(dataset.class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"CalibrationSubset({len(self)} of {len(self.dataset)} images, seed={self.seed})"

    def source_index(self, index: int) -> int:
        return self.indices[index]

    def image_id(self, index: int) -> str:
        return self.dataset.image_id(self.indices[index])

    def load_image(self, index: int) -> np.ndarray:
        return self.dataset.load_image(self.indices[index])

    def annotation(self, index: int) -> Annotation:
        return self.dataset.annotation(self.indices[index])

    def image_ids(self) -> Sequence[str]:
        return [self.image_id(i) for i in range(len(self))]
