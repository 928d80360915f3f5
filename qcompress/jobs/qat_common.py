"""What the ``qat`` job and its ``--steps`` mode share: the training split and BN re-estimation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qcompress.core import DataConfig, load_dataset


def split_dataset(data: DataConfig, class_names: Sequence[str], split: str, reference=None):
    """The ``split`` image set of ``data`` (COCO folders have no image sets: all of it)."""
    if data.dataset == "coco" and data.pseudo_labels is None:
        return load_dataset(data, class_names)
    return load_dataset(data, class_names, split, reference=reference)


def reestimate_bn_after_training(config: Any, model: torch.nn.Module, calib) -> dict[str, Any]:
    """With ``config.bn_reestimate``: recompute BN running statistics with the trained network on the
    calibration images, where BN trained on batch statistics (their running averages lag the weights);
    with BN frozen (``config.bn_frozen_at_end``) the network trained against the running statistics
    themselves, so they stay. Returns what reports show."""
    if not config.bn_reestimate:
        return {"skipped": "off (--bn-reestimate turns it on)"}
    if config.bn_frozen_at_end:
        return {"skipped": "BN statistics were frozen during training: the network trained against them"}
    from qcompress.quant.bn_reestimate import reestimate_bn
    from qcompress.quant.qat import observers_disabled

    with observers_disabled(model):
        return reestimate_bn(model, calib).summary()


__all__ = ["reestimate_bn_after_training", "split_dataset"]
