"""Batched inference over a dataset: images decoded and resized in worker processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from qcompress.data.dataset import DetectionDataset
from qcompress.models.detector import Detections, Detector


class _PreprocessedImages(Dataset):
    def __init__(self, dataset: DetectionDataset, detector: Detector, indices: list[int]) -> None:
        self.dataset = dataset
        self.spec = detector.spec
        self.preprocess = detector.preprocess
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image = self.dataset.load_image(self.indices[i])
        return self.preprocess(image), torch.tensor(image.shape[:2])


def num_workers_for(count: int) -> int:
    """One decoding worker when there is enough work to hide; none for tiny runs."""
    return 1 if count >= 64 else 0


def predict_dataset(
    detector: Detector,
    dataset: DetectionDataset,
    indices: list[int] | None = None,
    batch_size: int = 16,
    num_workers: int | None = None,
    on_batch: Callable[[int], Any] | None = None,
) -> list[Detections]:
    """Detections for ``dataset[indices]`` (all images by default), in order."""
    indices = list(range(len(dataset))) if indices is None else list(indices)
    data = _PreprocessedImages(dataset, detector, indices)
    loader = DataLoader(
        data,
        batch_size=batch_size,
        num_workers=num_workers_for(len(indices)) if num_workers is None else num_workers,
        shuffle=False,
    )
    detector.model.eval()
    results: list[Detections] = []
    with torch.inference_mode():
        for images, sizes in loader:
            raw = detector.model(images)
            results.extend(detector.postprocess(raw, [tuple(s.tolist()) for s in sizes]))
            if on_batch:
                on_batch(len(images))
    return results


def raw_outputs(detector: Detector, images: torch.Tensor, batch_size: int = 16) -> list[Any]:
    """Raw head outputs for a preprocessed batch, chunked (used by fidelity checks and tests)."""
    outputs = []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            outputs.append(detector.model(chunk))
    return outputs
