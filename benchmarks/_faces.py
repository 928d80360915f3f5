"""What the face benchmarks share: a released Ultra-Light checkpoint, the COCO person images, and the
split into fidelity images (the first ``limit``) and calibration images drawn from the rest."""

from __future__ import annotations

from pathlib import Path

import torch

from qcompress.core.checkpoints import load_detector
from qcompress.data.calibration import calibration_indices
from qcompress.data.coco import CocoDataset
from qcompress.models.detector import Detector


def face_setup(weights: Path, coco: Path, model_file: str, arch: str, input_size: int, limit: int,
               calib_images: int, seed: int) -> tuple[Detector, CocoDataset, list[int], list[torch.Tensor]]:
    """(fp32 detector, dataset, fidelity image indices, calibration batches of 16)."""
    fp32 = load_detector(weights / model_file, arch=arch, labels=weights / "face-model-labels.txt",
                         options={"input_size": input_size})
    dataset = CocoDataset(coco / "images", coco / "instances_person.json", fp32.class_names)
    limit = min(limit, len(dataset))
    test = list(range(limit))
    rest = len(dataset) - limit
    calib_idx = [limit + i for i in calibration_indices(rest, calib_images, seed)] if rest else test
    images = [fp32.preprocess(dataset.load_image(i)) for i in calib_idx]
    return fp32, dataset, test, [torch.stack(images[i : i + 16]) for i in range(0, len(images), 16)]
