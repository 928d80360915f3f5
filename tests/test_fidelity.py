import math

import numpy as np
import pytest
import torch

from qcompress.errors import QCompressError
from qcompress.metrics.fidelity import fidelity_scores, greedy_match, pseudo_ground_truth
from qcompress.models.detector import Detections

CLASSES = ("BACKGROUND", "face", "person")


def _dets(boxes, labels, scores) -> Detections:
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(scores, dtype=torch.float32),
    )


def _reference() -> list[Detections]:
    return [
        _dets([[10, 10, 50, 50], [100, 100, 140, 160], [200, 20, 240, 60], [0, 0, 5, 5]], [1, 1, 2, 1], [0.95, 0.7, 0.8, 0.1]),
        _dets([[30, 30, 90, 90], [120, 40, 160, 80]], [1, 2], [0.6, 0.9]),
        _dets([], [], []),
    ]


def _shifted(dets: list[Detections], dx: float) -> list[Detections]:
    return [Detections(d.boxes + torch.tensor([dx, 0.0, dx, 0.0]), d.labels.clone(), d.scores.clone()) for d in dets]


def test_pseudo_ground_truth_keeps_labels_above_threshold():
    gt = pseudo_ground_truth(_reference(), score_threshold=0.5)
    assert [len(a.labels) for a in gt] == [3, 2, 0]
    assert gt[0].labels.tolist() == [1, 1, 2]
    assert gt[0].boxes.dtype == np.float32 and gt[0].labels.dtype == np.int64
    assert not any(a.difficult.any() for a in gt)
    assert [len(a.labels) for a in pseudo_ground_truth(_reference(), 0.85)] == [1, 1, 0]


def test_identical_detections_are_perfect():
    ref = _reference()
    f = fidelity_scores(ref, [Detections(d.boxes.clone(), d.labels.clone(), d.scores.clone()) for d in ref], CLASSES)
    assert f["AP50"] == pytest.approx(1.0)
    assert f["ap_per_class"] == {"face": pytest.approx(1.0), "person": pytest.approx(1.0)}
    assert f["mean_iou"] == pytest.approx(1.0)
    assert f["score_drift_abs"] == 0.0 and f["score_drift_signed"] == 0.0
    assert f["recall"] == 1.0 and f["recall_any_score"] == 1.0 and f["precision"] == 1.0
    assert f["num_pseudo_gt"] == 5 and f["num_matched"] == 5 and f["num_images"] == 3


def test_shifted_boxes_lower_iou_and_ap():
    ref = _reference()
    small = fidelity_scores(ref, _shifted(ref, 2.0), CLASSES)
    large = fidelity_scores(ref, _shifted(ref, 12.0), CLASSES)
    assert 0.5 < small["mean_iou"] < 1.0
    assert small["AP50"] == pytest.approx(1.0)  # still above IoU 0.5
    # A 40-pixel-wide box moved by 12 px has IoU 28/52 ~ 0.54: matched but lower; the 60-wide one 0.67.
    assert large["mean_iou"] < small["mean_iou"]
    far = fidelity_scores(ref, _shifted(ref, 40.0), CLASSES)
    assert far["AP50"] == 0.0 and far["recall"] == 0.0 and math.isnan(far["mean_iou"])


def test_dropped_detections_lower_recall_and_ap():
    ref = _reference()
    test = [Detections(d.boxes[1:], d.labels[1:], d.scores[1:]) for d in ref]  # first of each image gone
    f = fidelity_scores(ref, test, CLASSES)
    assert f["recall"] == pytest.approx(3 / 5)
    # face: 1 of 3 pseudo boxes found by the top detection (area AP 1/3); person: both kept (AP 1)
    assert f["ap_per_class"] == {"face": pytest.approx(1 / 3), "person": pytest.approx(1.0)}
    assert f["AP50"] == pytest.approx(2 / 3)
    assert f["mean_iou"] == pytest.approx(1.0)


def test_score_drift_signed_and_absolute():
    ref = _reference()
    test = [Detections(d.boxes.clone(), d.labels.clone(), d.scores * 0.9) for d in ref]
    f = fidelity_scores(ref, test, CLASSES)
    matched_ref_scores = np.array([0.95, 0.7, 0.8, 0.6, 0.9])
    assert f["score_drift_signed"] == pytest.approx(-0.1 * matched_ref_scores.mean(), abs=1e-6)
    assert f["score_drift_abs"] == pytest.approx(0.1 * matched_ref_scores.mean(), abs=1e-6)
    # 0.6 * 0.9 = 0.54 stays above 0.5; every box is still recalled at the threshold.
    assert f["recall"] == 1.0


def test_low_scores_count_in_ap_but_not_in_thresholded_recall():
    ref = [_dets([[0, 0, 10, 10]], [1], [0.9])]
    test = [_dets([[0, 0, 10, 10]], [1], [0.2])]
    f = fidelity_scores(ref, test, CLASSES)
    assert f["AP50"] == pytest.approx(1.0)
    assert f["recall_any_score"] == 1.0 and f["recall"] == 0.0


def test_wrong_class_is_not_matched():
    ref = [_dets([[0, 0, 10, 10]], [1], [0.9])]
    f = fidelity_scores(ref, [_dets([[0, 0, 10, 10]], [2], [0.9])], CLASSES)
    assert f["ap_per_class"]["face"] == 0.0 and math.isnan(f["ap_per_class"]["person"])
    assert f["num_matched"] == 0 and f["precision"] == 0.0


def test_no_pseudo_ground_truth_gives_nan_not_an_error():
    ref = [_dets([[0, 0, 10, 10]], [1], [0.1])]
    f = fidelity_scores(ref, ref, CLASSES)
    assert math.isnan(f["AP50"]) and math.isnan(f["recall"]) and f["num_pseudo_gt"] == 0


def test_greedy_match_takes_highest_score_first_one_to_one():
    ref_boxes = np.array([[0, 0, 10, 10]], float)
    test_boxes = np.array([[0, 0, 10, 9], [0, 0, 10, 10]], float)
    t, r, iou = greedy_match(test_boxes, np.array([1, 1]), np.array([0.9, 0.5]), ref_boxes, np.array([1]))
    assert t.tolist() == [0] and r.tolist() == [0] and iou[0] == pytest.approx(0.9)


def test_mismatched_lengths_raise():
    with pytest.raises(QCompressError):
        fidelity_scores(_reference(), _reference()[:2], CLASSES)
