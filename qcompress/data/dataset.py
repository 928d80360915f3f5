"""The dataset contract every reader implements.

Coordinates are float pixels ``(x1, y1, x2, y2)`` of the original image, 0-based, x2/y2 exclusive
(VOC XML's 1-based inclusive corners become ``xmin - 1, ymin - 1, xmax, ymax``, like pytorch-ssd).
Labels index into ``class_names``, whose entry 0 is ``BACKGROUND`` and never appears in an annotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Annotation:
    boxes: np.ndarray  # (K, 4) float32
    labels: np.ndarray  # (K,) int64, >= 1
    difficult: np.ndarray  # (K,) bool

    @staticmethod
    def empty() -> Annotation:
        return Annotation(np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0,), bool))


class DetectionDataset(Protocol):
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def image_id(self, index: int) -> str: ...

    def load_image(self, index: int) -> np.ndarray:
        """uint8 RGB ``(H, W, 3)``; raises QCompressError naming the file if it cannot be decoded."""
        ...

    def annotation(self, index: int) -> Annotation: ...
