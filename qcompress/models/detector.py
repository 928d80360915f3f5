"""The common detector contract.

A :class:`Detector` pairs a network (``model``: the ``nn.Module`` that compression transforms) with
what it needs around it: the class list, the input size and normalisation, and the float
post-processing (box decoding + NMS) that never enters the quantized graph.

Tensor contract:
- ``preprocess(image)``: ``uint8`` RGB ``(H, W, 3)`` numpy array -> normalised float ``(3, h, w)`` at the
  model's input size.
- ``model(batch)``: ``(N, 3, h, w)`` float -> raw head outputs (architecture specific).
- ``postprocess(raw, image_sizes)``: raw outputs -> one :class:`Detections` per image, boxes as
  ``(x1, y1, x2, y2)`` float pixels of the original image, labels as indices into ``class_names``
  (0 is the background and never returned), scores in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from qcompress.models.box_coder import decode


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint needs besides its weights to be rebuilt and used."""

    arch: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int] = (300, 300)  # (height, width)
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: float = 128.0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Detections:
    boxes: torch.Tensor  # (K, 4) float, xyxy pixels
    labels: torch.Tensor  # (K,) int64
    scores: torch.Tensor  # (K,) float

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass(frozen=True)
class PostprocessConfig:
    score_threshold: float = 0.01
    iou_threshold: float = 0.45
    candidates_per_class: int = 200
    max_detections: int = 200


def preprocess_image(image: np.ndarray, input_size: tuple[int, int], mean: Sequence[float], std: float) -> torch.Tensor:
    """uint8 RGB ``(H, W, 3)`` -> float ``(3, h, w)``: bilinear resize, then ``(x - mean) / std``."""
    array = np.ascontiguousarray(image)
    if not array.flags.writeable:  # e.g. np.asarray(PIL image); torch.from_numpy warns on those
        array = array.copy()
    x = torch.from_numpy(array).permute(2, 0, 1).float()
    if tuple(x.shape[1:]) != tuple(input_size):
        x = F.interpolate(x[None], size=input_size, mode="bilinear", align_corners=False)[0]
    return (x - torch.tensor(mean, dtype=torch.float32)[:, None, None]) / std


def ssd_postprocess(
    confidences: torch.Tensor,
    locations: torch.Tensor,
    priors: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    center_variance: float,
    size_variance: float,
    config: PostprocessConfig,
) -> list[Detections]:
    """Softmax + decode + per-class NMS, batched over images (pytorch-ssd ``Predictor`` semantics)."""
    probs = torch.softmax(confidences.float(), dim=-1)
    boxes = decode(locations.float(), priors, center_variance, size_variance)
    results = []
    for image_probs, image_boxes, (height, width) in zip(probs, boxes, image_sizes):
        scores = image_probs[:, 1:]
        num_classes = scores.shape[1]
        # Keep each class's best candidates above the threshold before NMS.
        k = min(config.candidates_per_class, scores.shape[0])
        top_scores, top_priors = scores.topk(k, dim=0)  # (k, C-1)
        classes = torch.arange(num_classes).expand(k, num_classes)
        keep = top_scores > config.score_threshold
        cand_scores, cand_priors, cand_classes = top_scores[keep], top_priors[keep], classes[keep]
        cand_boxes = image_boxes[cand_priors]
        kept = batched_nms(cand_boxes, cand_scores, cand_classes, config.iou_threshold)[: config.max_detections]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        results.append(
            Detections(
                boxes=torch.minimum((cand_boxes[kept] * scale).clamp_(min=0), scale),
                labels=cand_classes[kept] + 1,
                scores=cand_scores[kept],
            )
        )
    return results


class Detector:
    """A network plus the float pre/post-processing that makes it a detector."""

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        postprocess_fn: Callable[[Any, Sequence[tuple[int, int]], PostprocessConfig], list[Detections]],
    ) -> None:
        self.model = model
        self.spec = spec
        self._postprocess_fn = postprocess_fn
        self.postprocess_config = PostprocessConfig()
        # Where the weights came from: {"path", "sha256", "sidecar"}; filled by checkpoints.load_detector.
        self.source: dict[str, Any] = {}

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        return preprocess_image(image, self.spec.input_size, self.spec.mean, self.spec.std)

    def postprocess(self, raw: Any, image_sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        return self._postprocess_fn(raw, image_sizes, self.postprocess_config)

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """uint8 RGB images -> detections in each image's pixel coordinates."""
        self.model.eval()
        batch = torch.stack([self.preprocess(image) for image in images])
        return self.postprocess(self.model(batch), [image.shape[:2] for image in images])

    def with_model(self, model: nn.Module, **spec_changes: Any) -> Detector:
        """A detector sharing this one's processing around another network (e.g. its quantized copy)."""
        spec = self.spec if not spec_changes else ModelSpec(**{**self.spec.__dict__, **spec_changes})
        other = Detector(model, spec, self._postprocess_fn)
        other.postprocess_config = self.postprocess_config
        other.source = self.source  # provenance (parent file, its sidecar) travels with derived models
        return other
