"""Fidelity AP over IoU .50:.95 (pycocotools), checked on a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from qcompress.metrics.fidelity import fidelity_scores
from qcompress.models.detector import Detections


def _dets(boxes, scores):
    return Detections(torch.tensor(boxes, dtype=torch.float32), torch.ones(len(boxes), dtype=torch.int64),
                      torch.tensor(scores))


def test_ap50_95_separates_what_ap50_cannot():
    reference = [_dets([[10, 10, 50, 50], [60, 60, 90, 100]], [0.9, 0.8])]
    # The first box shifted by 4 px: IoU 1296 / 1904 = 0.68, a match at IoU .50-.65 only.
    shifted = [_dets([[14, 14, 54, 54], [60, 60, 90, 100]], [0.9, 0.8])]
    same = fidelity_scores(reference, reference, ["BACKGROUND", "a"])
    moved = fidelity_scores(reference, shifted, ["BACKGROUND", "a"])
    assert same["AP50"] == same["AP50_95"] == 1.0
    assert moved["AP50"] == 1.0
    # Thresholds .50-.65 (4 of 10): AP 1. Above: the 0.9-score box is a false positive before the
    # true 0.8 one, so precision is 1/2 up to recall 1/2 and COCO's 101-point AP is 0.5 * 51 / 101.
    assert moved["AP50_95"] == pytest.approx((4 * 1.0 + 6 * 0.5 * 51 / 101) / 10, abs=1e-6)


def test_ap50_95_without_reference_boxes_is_nan():
    empty = [_dets(torch.zeros(0, 4).tolist(), [])]
    assert math.isnan(fidelity_scores(empty, empty, ["BACKGROUND", "a"])["AP50_95"])
