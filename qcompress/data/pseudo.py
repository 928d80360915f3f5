"""Training and evaluating on unlabelled images: the float parent's own detections as labels.

``--pseudo-labels T`` (prune fine-tuning, QAT) replaces each image's annotation by the fp32 parent's
detections with ``score >= T`` (:func:`qcompress.metrics.fidelity.pseudo_ground_truth`). Evaluating a
compressed model on those labels is the fidelity AP of ``qcompress eval --reference``; training on
them is self-distillation to the parent's hard outputs.

Which images do what: the first ``--limit N`` images are the evaluation set, every later image is
for training and calibration (the two never overlap).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qcompress.data.dataset import Annotation, DetectionDataset
from qcompress.errors import QCompressError
from qcompress.metrics.fidelity import pseudo_ground_truth
from qcompress.models.detector import Detector


def pseudo_split_indices(total: int, holdout: int | None, role: str) -> list[int]:
    """``role`` "eval": images ``[0, holdout)``; "train": ``[holdout, total)``."""
    if holdout is None or holdout <= 0:
        raise QCompressError("--pseudo-labels needs --limit N: the first N images are held out for evaluation",
                             "pass e.g. --limit 50")
    if holdout >= total:
        raise QCompressError(f"--limit {holdout} leaves no training images out of {total}",
                             f"pass --limit below {total}")
    return list(range(holdout, total)) if role == "train" else list(range(holdout))


class PseudoLabeled:
    """``dataset`` restricted to ``indices``, annotated with ``reference``'s detections (score >= threshold)."""

    def __init__(
        self, dataset: DetectionDataset, reference: Detector, score_threshold: float, indices: Sequence[int],
        batch_size: int = 8,
    ) -> None:
        self.base = dataset
        self.class_names = reference.class_names
        self.indices = list(indices)
        self.score_threshold = score_threshold
        self._annotations = self._label(reference, batch_size)

    @torch.inference_mode()
    def _label(self, reference: Detector, batch_size: int) -> list[Annotation]:
        detections = []
        for start in range(0, len(self.indices), batch_size):
            images = [self.base.load_image(i) for i in self.indices[start : start + batch_size]]
            detections += reference.detect(images)
        return pseudo_ground_truth(detections, self.score_threshold)

    def __len__(self) -> int:
        return len(self.indices)

    def image_id(self, index: int) -> str:
        return self.base.image_id(self.indices[index])

    def load_image(self, index: int) -> np.ndarray:
        return self.base.load_image(self.indices[index])

    def annotation(self, index: int) -> Annotation:
        return self._annotations[index]

    @property
    def num_objects(self) -> int:
        return sum(len(a.labels) for a in self._annotations)
