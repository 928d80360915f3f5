"""MultiBox loss (Liu et al. 2016, eq. 1-3): smooth L1 on matched priors + cross-entropy with 3:1
hard-negative mining, normalised by the number of matched priors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_negative_mask(background_loss: torch.Tensor, labels: torch.Tensor, neg_pos_ratio: int) -> torch.Tensor:
    """Positives plus the ``neg_pos_ratio`` x as many negatives with the highest background loss, per image."""
    positive = labels > 0
    num_neg = positive.sum(dim=1, keepdim=True) * neg_pos_ratio
    loss = background_loss.masked_fill(positive, -float("inf"))
    rank = loss.argsort(dim=1, descending=True).argsort(dim=1)
    return positive | (rank < num_neg)


def multibox_loss(
    confidences: torch.Tensor,
    locations: torch.Tensor,
    target_labels: torch.Tensor,
    target_locations: torch.Tensor,
    neg_pos_ratio: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(regression_loss, classification_loss)``, each a scalar averaged over positives."""
    num_classes = confidences.shape[2]
    with torch.no_grad():
        background_loss = -F.log_softmax(confidences, dim=2)[:, :, 0]
        mask = hard_negative_mask(background_loss, target_labels, neg_pos_ratio)
    classification = F.cross_entropy(
        confidences[mask].reshape(-1, num_classes), target_labels[mask], reduction="sum"
    )
    positive = target_labels > 0
    regression = F.smooth_l1_loss(locations[positive], target_locations[positive], reduction="sum")
    num_pos = positive.sum().clamp(min=1).float()
    return regression / num_pos, classification / num_pos
