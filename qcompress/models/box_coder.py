"""SSD priors and box encoding (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016, sec. 2.2).

Boxes are float tensors in one of two forms:
- center form ``(cx, cy, w, h)``, normalised to [0, 1] by the input size (priors live here);
- corner form ``(x1, y1, x2, y2)``, normalised the same way.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PriorSpec:
    """One feature map's priors: ``feature_map_size`` cells, ``shrinkage`` pixels per cell."""

    feature_map_size: int
    shrinkage: int
    min_size: float
    max_size: float
    aspect_ratios: tuple[int, ...]


def generate_priors(specs: list[PriorSpec], image_size: int, clamp: bool = True) -> torch.Tensor:
    """pytorch-ssd's prior layout: per cell, small square, big square, then (r, 1/r) per aspect ratio.

    Returns ``(num_priors, 4)`` center-form boxes. The order matters: it must match the order in which
    the heads' channels are reshaped, or a trained checkpoint decodes to garbage.
    """
    priors = []
    for spec in specs:
        scale = image_size / spec.shrinkage
        for j, i in itertools.product(range(spec.feature_map_size), repeat=2):
            cx, cy = (i + 0.5) / scale, (j + 0.5) / scale
            small = spec.min_size / image_size
            big = math.sqrt(spec.max_size * spec.min_size) / image_size
            priors.append([cx, cy, small, small])
            priors.append([cx, cy, big, big])
            for ratio in spec.aspect_ratios:
                r = math.sqrt(ratio)
                priors.append([cx, cy, small * r, small / r])
                priors.append([cx, cy, small / r, small * r])
    out = torch.tensor(priors, dtype=torch.float32)
    return out.clamp_(0.0, 1.0) if clamp else out


def decode(locations: torch.Tensor, priors: torch.Tensor, center_variance: float, size_variance: float) -> torch.Tensor:
    """Regression outputs ``(..., P, 4)`` -> corner-form boxes ``(..., P, 4)``."""
    centers = locations[..., :2] * center_variance * priors[..., 2:] + priors[..., :2]
    sizes = torch.exp(locations[..., 2:] * size_variance) * priors[..., 2:]
    return torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1)


def encode(boxes: torch.Tensor, priors: torch.Tensor, center_variance: float, size_variance: float) -> torch.Tensor:
    """Corner-form target boxes ``(P, 4)`` matched to ``priors`` -> regression targets ``(P, 4)``."""
    centers = (boxes[..., :2] + boxes[..., 2:]) / 2
    sizes = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-6)
    return torch.cat(
        [
            (centers - priors[..., :2]) / (priors[..., 2:] * center_variance),
            torch.log(sizes / priors[..., 2:]) / size_variance,
        ],
        dim=-1,
    )


def center_to_corner(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of corner-form boxes ``(N, 4)`` x ``(M, 4)`` -> ``(N, M)``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def match_priors(
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    priors_corner: torch.Tensor,
    iou_threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign each prior a ground-truth box (SSD sec. 2.2, "matching strategy").

    Every ground truth keeps its best prior even below the threshold; other priors take the
    best ground truth with IoU >= ``iou_threshold`` or become background (label 0).
    Returns corner-form boxes ``(P, 4)`` and labels ``(P,)``.
    """
    num_priors = priors_corner.shape[0]
    if gt_boxes.numel() == 0:
        return torch.zeros(num_priors, 4), torch.zeros(num_priors, dtype=torch.long)
    ious = box_iou(gt_boxes, priors_corner)  # (G, P)
    best_gt_iou, best_gt = ious.max(dim=0)
    best_prior = ious.argmax(dim=1)
    best_gt[best_prior] = torch.arange(gt_boxes.shape[0])
    best_gt_iou[best_prior] = 2.0
    labels = gt_labels[best_gt].clone()
    labels[best_gt_iou < iou_threshold] = 0
    return gt_boxes[best_gt], labels
