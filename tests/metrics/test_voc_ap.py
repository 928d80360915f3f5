"""VOC AP: hand-built cases with known answers, and random cases against a loop-based reference.

The reference below follows the devkit's pseudo-code (VOCevaldet.m / voc_eval.py) one detection at
a time, in plain Python; it shares no code with qcompress.metrics.voc_ap. The hand-built cases run
on both, so the reference is itself checked before the random cases compare against it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcompress.data.dataset import Annotation
from qcompress.errors import QCompressError
from qcompress.metrics.voc_ap import average_precision, evaluate_voc, evaluate_voc_detections
from qcompress.models.detector import Detections

CLASSES = ("BACKGROUND", "cat", "dog", "bird")


# ----------------------------------------------------------------------------- reference (devkit loops)
def _reference_ap(rec: list[float], prec: list[float], use_07_metric: bool) -> float:
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):  # the devkit's / pytorch-ssd's thresholds
            above = [p for r, p in zip(rec, prec) if r >= t]
            ap += (max(above) if above else 0.0) / 11.0
        return ap
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def _reference_voc(gt_boxes, gt_labels, gt_difficult, det_boxes, det_labels, det_scores, class_names,
                   iou_threshold=0.5, use_07_metric=True):
    n = len(gt_boxes)
    aps, num_gt, num_det = {}, {}, {}
    for c in range(1, len(class_names)):
        records, npos = [], 0
        for i in range(n):
            boxes = [[float(v) for v in b] for b, l in zip(gt_boxes[i], gt_labels[i]) if int(l) == c]
            difficult = [bool(d) for d, l in zip(gt_difficult[i], gt_labels[i]) if int(l) == c]
            records.append({"bbox": boxes, "difficult": difficult, "det": [False] * len(boxes)})
            npos += sum(1 for d in difficult if not d)
        dets = [
            (i, float(s), [float(v) for v in b])
            for i in range(n)
            for b, l, s in zip(det_boxes[i], det_labels[i], det_scores[i])
            if int(l) == c
        ]
        num_gt[class_names[c]], num_det[class_names[c]] = npos, len(dets)
        dets = sorted(dets, key=lambda d: -d[1])  # sorted() is stable: ties keep input order
        tp, fp = [0.0] * len(dets), [0.0] * len(dets)
        for d, (i, _, bb) in enumerate(dets):
            record = records[i]
            ovmax, jmax = -math.inf, -1
            for j, g in enumerate(record["bbox"]):
                iw = min(bb[2], g[2]) - max(bb[0], g[0])
                ih = min(bb[3], g[3]) - max(bb[1], g[1])
                if iw > 0 and ih > 0:
                    inter = iw * ih
                    union = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
                    ov = inter / union
                    if ov > ovmax:
                        ovmax, jmax = ov, j
            if ovmax >= iou_threshold:
                if not record["difficult"][jmax]:
                    if not record["det"][jmax]:
                        tp[d] = 1.0
                        record["det"][jmax] = True
                    else:
                        fp[d] = 1.0
            else:
                fp[d] = 1.0
        if npos == 0:
            aps[class_names[c]] = math.nan
            continue
        rec, prec, tp_sum, fp_sum = [], [], 0.0, 0.0
        for t, f in zip(tp, fp):
            tp_sum += t
            fp_sum += f
            rec.append(tp_sum / npos)
            prec.append(tp_sum / max(tp_sum + fp_sum, np.finfo(np.float64).eps))
        aps[class_names[c]] = _reference_ap(rec, prec, use_07_metric)
    valid = [a for a in aps.values() if not math.isnan(a)]
    return aps, num_gt, num_det, (sum(valid) / len(valid) if valid else math.nan)


def _ours(*args, **kwargs):
    r = evaluate_voc(*args, **kwargs)
    return r.ap_per_class, r.num_gt_per_class, r.num_det_per_class, r.mAP


BOTH = pytest.mark.parametrize("impl", [_ours, _reference_voc], ids=["qcompress", "reference"])


def _case(images, dets):
    """images: per image list of (box, label, difficult); dets: per image list of (box, label, score)."""
    gt_boxes = [np.array([g[0] for g in im], np.float64).reshape(-1, 4) for im in images]
    gt_labels = [np.array([g[1] for g in im], np.int64) for im in images]
    gt_difficult = [np.array([g[2] for g in im], bool) for im in images]
    det_boxes = [np.array([d[0] for d in im], np.float64).reshape(-1, 4) for im in dets]
    det_labels = [np.array([d[1] for d in im], np.int64) for im in dets]
    det_scores = [np.array([d[2] for d in im], np.float64) for im in dets]
    return gt_boxes, gt_labels, gt_difficult, det_boxes, det_labels, det_scores


A, B, C = [10, 10, 50, 50], [60, 60, 120, 100], [0, 0, 30, 40]
FAR = [200, 200, 240, 240]


# ----------------------------------------------------------------------------- hand-built known answers
@BOTH
@pytest.mark.parametrize("use_07", [True, False])
def test_perfect_detections_give_one(impl, use_07):
    images = [[(A, 1, False), (B, 2, False)], [(C, 1, False)], [(B, 3, False)]]
    dets = [[(A, 1, 0.9), (B, 2, 0.8)], [(C, 1, 0.3)], [(B, 3, 0.5)]]
    aps, num_gt, num_det, mAP = impl(*_case(images, dets), CLASSES, use_07_metric=use_07)
    # approx: the devkit's 11-point sum of eleven 1/11 terms is 1.0000000000000002
    assert aps == pytest.approx({"cat": 1.0, "dog": 1.0, "bird": 1.0}, abs=1e-12)
    assert mAP == pytest.approx(1.0, abs=1e-12)
    assert num_gt == {"cat": 2, "dog": 1, "bird": 1}
    assert num_det == {"cat": 2, "dog": 1, "bird": 1}


@BOTH
@pytest.mark.parametrize("use_07", [True, False])
def test_all_false_positives_give_zero(impl, use_07):
    images = [[(A, 1, False)], [(B, 2, False)]]
    # Far away, or in the right place with the wrong class.
    dets = [[(FAR, 1, 0.9), (A, 2, 0.8)], [(B, 1, 0.7), (FAR, 2, 0.6)]]
    aps, _, _, mAP = impl(*_case(images, dets), CLASSES, use_07_metric=use_07)
    assert aps["cat"] == 0.0 and aps["dog"] == 0.0
    assert math.isnan(aps["bird"])  # no ground truth: nan, not part of mAP
    assert mAP == 0.0


@BOTH
def test_no_detections_give_zero(impl):
    images = [[(A, 1, False)]]
    aps, _, num_det, mAP = impl(*_case(images, [[]]), CLASSES)
    assert aps["cat"] == 0.0 and mAP == 0.0 and num_det["cat"] == 0


@BOTH
def test_duplicate_detection_is_a_false_positive(impl):
    # Two cat boxes in two images; the second detection repeats the first on box A.
    # tp = [1, 0, 1], rec = [.5, .5, 1], prec = [1, .5, 2/3].
    images = [[(A, 1, False)], [(B, 1, False)]]
    dets = [[(A, 1, 0.9), ([11, 10, 50, 50], 1, 0.8)], [(B, 1, 0.7)]]
    case = _case(images, dets)
    aps07, _, num_det, _ = impl(*case, CLASSES, use_07_metric=True)
    aps, _, _, _ = impl(*case, CLASSES, use_07_metric=False)
    # 11 point: t = 0 .. 0.5 reach precision 1 (6 points), t = 0.6 .. 1 only 2/3 (5 points).
    assert aps07["cat"] == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11, abs=1e-12)
    # Area: recall 0 -> .5 at precision 1, .5 -> 1 at the envelope's 2/3.
    assert aps["cat"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3, abs=1e-12)
    assert num_det["cat"] == 3


@BOTH
def test_best_match_taken_means_duplicate_even_if_another_box_is_free(impl):
    # The devkit rule: a detection whose best box is already matched is a FP, even though a second
    # box (0.6 IoU) is still free. Both boxes are cats in one image.
    box1, box2 = [0, 0, 100, 100], [0, 0, 100, 60]
    images = [[(box1, 1, False), (box2, 1, False)]]
    dets = [[(box1, 1, 0.9), ([0, 0, 100, 90], 1, 0.8)]]  # IoU with box1 0.9, box2 0.667
    aps, _, _, _ = impl(*_case(images, dets), CLASSES, use_07_metric=False)
    # tp = [1, 0]: recall stops at .5 with precision 1 -> area .5
    assert aps["cat"] == pytest.approx(0.5, abs=1e-12)


@BOTH
@pytest.mark.parametrize("use_07", [True, False])
def test_difficult_only_images_contribute_nothing(impl, use_07):
    base_images = [[(A, 1, False)]]
    base_dets = [[(A, 1, 0.5)]]
    # Added: an image with only a difficult cat, detected with a higher score (ignored, not FP), and
    # an image with only a difficult cat that nobody detects (no recall lost).
    images = base_images + [[(B, 1, True)], [(C, 1, True)]]
    dets = base_dets + [[(B, 1, 0.9)], []]
    aps, num_gt, num_det, _ = impl(*_case(images, dets), CLASSES, use_07_metric=use_07)
    assert aps["cat"] == pytest.approx(1.0, abs=1e-12)
    assert num_gt["cat"] == 1
    assert num_det["cat"] == 2


@BOTH
def test_class_with_only_difficult_boxes_is_nan_and_left_out_of_map(impl):
    images = [[(A, 1, False), (B, 2, True)]]
    dets = [[(A, 1, 0.9), (FAR, 2, 0.8)]]
    aps, num_gt, _, mAP = impl(*_case(images, dets), CLASSES)
    assert math.isnan(aps["dog"]) and num_gt["dog"] == 0
    assert mAP == pytest.approx(1.0, abs=1e-12)


@BOTH
def test_detection_whose_best_box_is_difficult_is_ignored_even_over_a_regular_box(impl):
    # Difficult box D overlaps the detection best (IoU 1); the regular box R also reaches 0.5 but is
    # not the best, so the detection is ignored and R stays unfound: AP 0, not 1.
    d_box, r_box = [0, 0, 100, 100], [0, 0, 100, 70]
    images = [[(d_box, 1, True), (r_box, 1, False)]]
    aps, _, _, _ = impl(*_case(images, [[(d_box, 1, 0.9)]]), CLASSES, use_07_metric=False)
    assert aps["cat"] == 0.0


@BOTH
def test_iou_exactly_at_threshold_matches(impl):
    images = [[([0, 0, 10, 10], 1, False)]]
    dets = [[([0, 0, 10, 5], 1, 0.9)]]  # intersection 50, union 100
    aps, _, _, _ = impl(*_case(images, dets), CLASSES)
    assert aps["cat"] == pytest.approx(1.0, abs=1e-12)


@BOTH
def test_eleven_point_and_area_differ_as_computed_by_hand(impl):
    # Four cats, detections: TP, FP, TP, then nothing. rec = [.25, .25, .5], prec = [1, .5, 2/3].
    images = [[(A, 1, False), (B, 1, False)], [(A, 1, False), (C, 1, False)]]
    dets = [[(A, 1, 0.9), (FAR, 1, 0.8), (B, 1, 0.7)], []]
    case = _case(images, dets)
    aps07, _, _, _ = impl(*case, CLASSES, use_07_metric=True)
    aps, _, _, _ = impl(*case, CLASSES, use_07_metric=False)
    # 11 point: t = 0, .1, .2 -> 1; t = .3, .4, .5 -> 2/3; t = .6 .. 1 -> 0.
    assert aps07["cat"] == pytest.approx((3 * 1.0 + 3 * 2 / 3) / 11, abs=1e-12)
    # Area: .25 * 1 + .25 * 2/3.
    assert aps["cat"] == pytest.approx(0.25 + 0.25 * 2 / 3, abs=1e-12)


@BOTH
def test_equal_scores_keep_input_order(impl):
    # Two detections of one box with the same score: the first given is the TP. Putting the FP first
    # lowers AP, so the order is observable.
    images = [[(A, 1, False), (B, 1, False)]]
    tp_first = [[(A, 1, 0.5), (FAR, 1, 0.5), (B, 1, 0.4)]]
    fp_first = [[(FAR, 1, 0.5), (A, 1, 0.5), (B, 1, 0.4)]]
    ap_tp_first = impl(*_case(images, tp_first), CLASSES, use_07_metric=False)[0]["cat"]
    ap_fp_first = impl(*_case(images, fp_first), CLASSES, use_07_metric=False)[0]["cat"]
    assert ap_tp_first == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-12)
    # FP first: rec [0, .5, 1], prec [0, .5, 2/3] -> envelope 2/3 over the whole recall range
    assert ap_fp_first == pytest.approx(2 / 3, abs=1e-12)


@BOTH
def test_background_detections_are_skipped(impl):
    images = [[(A, 1, False)]]
    aps, _, _, mAP = impl(*_case(images, [[(FAR, 0, 0.99), (A, 1, 0.5)]]), CLASSES)
    assert aps["cat"] == pytest.approx(1.0, abs=1e-12) and mAP == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- average_precision itself
def test_average_precision_eleven_point_uses_the_devkit_thresholds():
    # Recall exactly 0.3 does not reach np.arange's third threshold 0.30000000000000004 (devkit and
    # pytorch-ssd behaviour): 3 of 11 points, not 4.
    rec, prec = np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.0, 1.0])
    assert average_precision(rec, prec, use_07_metric=True) == pytest.approx(3 / 11, abs=1e-15)
    assert average_precision(rec, prec, use_07_metric=False) == pytest.approx(0.3, abs=1e-15)


def test_average_precision_of_an_empty_curve_is_zero():
    empty = np.zeros(0)
    assert average_precision(empty, empty, True) == 0.0
    assert average_precision(empty, empty, False) == 0.0


def test_average_precision_uses_the_precision_envelope():
    rec = np.array([0.2, 0.4, 0.6, 1.0])
    prec = np.array([0.5, 1.0, 0.3, 0.8])
    # envelope: [1, 1, .8, .8]; area = .2*1 + .2*1 + .2*.8 + .4*.8
    assert average_precision(rec, prec, False) == pytest.approx(0.2 + 0.2 + 0.16 + 0.32, abs=1e-12)
    assert average_precision(rec, prec, False) == pytest.approx(_reference_ap(list(rec), list(prec), False))
    assert average_precision(rec, prec, True) == pytest.approx(_reference_ap(list(rec), list(prec), True))


# ----------------------------------------------------------------------------- random vs reference
def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    num_images = int(rng.integers(1, 15))
    num_classes = len(CLASSES)
    gt_boxes, gt_labels, gt_difficult, det_boxes, det_labels, det_scores = [], [], [], [], [], []
    for _ in range(num_images):
        k = int(rng.integers(0, 7))
        xy = rng.uniform(0, 200, size=(k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 80, size=(k, 2))], axis=1)
        labels = rng.integers(1, num_classes, size=k)
        difficult = rng.random(k) < 0.2
        # Detections: jittered copies of ground truth boxes (some twice, some with another class,
        # some near the IoU threshold), boxes anywhere, and a few background detections.
        num_copies = int(rng.integers(0, 2 * k + 1)) if k else 0
        source = rng.integers(0, max(k, 1), size=num_copies)
        copies = boxes[source] + rng.normal(0, rng.choice([2.0, 6.0, 12.0]), size=(num_copies, 4))
        copy_labels = np.where(
            rng.random(num_copies) < 0.85, labels[source], rng.integers(0, num_classes, num_copies)
        )
        m = int(rng.integers(0, 6))
        rxy = rng.uniform(0, 200, size=(m, 2))
        randoms = np.concatenate([rxy, rxy + rng.uniform(5, 80, size=(m, 2))], axis=1)
        d_boxes = np.concatenate([copies, randoms]).reshape(-1, 4)
        d_boxes[:, 2:] = np.maximum(d_boxes[:, 2:], d_boxes[:, :2] + 1.0)
        d_labels = np.concatenate([copy_labels, rng.integers(0, num_classes, size=m)]).astype(np.int64)
        d_scores = np.round(rng.random(len(d_boxes)), 1)  # a coarse grid, so ties happen
        gt_boxes.append(boxes)
        gt_labels.append(labels)
        gt_difficult.append(difficult)
        det_boxes.append(d_boxes)
        det_labels.append(d_labels)
        det_scores.append(d_scores)
    return gt_boxes, gt_labels, gt_difficult, det_boxes, det_labels, det_scores


def _assert_same(ours, reference):
    aps, num_gt, num_det, mAP = ours
    ref_aps, ref_gt, ref_det, ref_mAP = reference
    assert num_gt == ref_gt and num_det == ref_det
    assert aps.keys() == ref_aps.keys()
    for name in aps:
        if math.isnan(ref_aps[name]):
            assert math.isnan(aps[name]), name
        else:
            assert aps[name] == pytest.approx(ref_aps[name], abs=1e-6), name
    if math.isnan(ref_mAP):
        assert math.isnan(mAP)
    else:
        assert mAP == pytest.approx(ref_mAP, abs=1e-6)


@pytest.mark.parametrize("seed", range(50))
@pytest.mark.parametrize("use_07", [True, False])
def test_random_cases_match_the_reference(seed, use_07):
    case = _random_case(seed)
    iou_threshold = (0.5, 0.5, 0.3, 0.7)[seed % 4]
    ours = _ours(*case, CLASSES, iou_threshold=iou_threshold, use_07_metric=use_07)
    reference = _reference_voc(*case, CLASSES, iou_threshold=iou_threshold, use_07_metric=use_07)
    _assert_same(ours, reference)


def test_random_cases_are_not_trivial():
    # Guard on the generator: across the seeds, APs must spread between 0 and 1, and difficult
    # detections, duplicates and ties must occur, or the comparison above proves little.
    values = []
    for seed in range(50):
        aps = _ours(*_random_case(seed), CLASSES)[0]
        values += [v for v in aps.values() if not math.isnan(v)]
    values = np.array(values)
    assert np.mean((values > 0.05) & (values < 0.95)) > 0.3
    assert np.any(values > 1 - 1e-9) and np.any(values == 0.0)


# ----------------------------------------------------------------------------- wrappers and errors
def test_evaluate_voc_detections_takes_annotations_and_torch_detections():
    annotations = [
        Annotation(np.array([A, B], np.float32), np.array([1, 2]), np.array([False, True])),
        Annotation.empty(),
    ]
    detections = [
        Detections(torch.tensor([A, B], dtype=torch.float32), torch.tensor([1, 2]), torch.tensor([0.9, 0.8])),
        Detections(torch.tensor([FAR], dtype=torch.float32), torch.tensor([1]), torch.tensor([0.95])),
    ]
    result = evaluate_voc_detections(annotations, detections, CLASSES, use_07_metric=False)
    # cat: FP (0.95) then TP (0.9): rec [0, 1], prec [0, .5] -> .5; dog: only difficult -> nan
    assert result.ap_per_class["cat"] == pytest.approx(0.5)
    assert math.isnan(result.ap_per_class["dog"])
    assert result.mAP == pytest.approx(0.5)
    assert result.metric == "voc"
    assert evaluate_voc_detections(annotations, detections, CLASSES).metric == "voc07"


def test_inputs_are_not_modified():
    case = _random_case(3)
    before = [[a.copy() for a in part] for part in case]
    evaluate_voc(*case, CLASSES)
    for part, saved in zip(case, before):
        for a, b in zip(part, saved):
            np.testing.assert_array_equal(a, b)


def test_mismatched_lists_raise():
    case = list(_case([[(A, 1, False)]], [[(A, 1, 0.9)]]))
    case[3] = case[3] * 2
    with pytest.raises(QCompressError, match="differ in length"):
        evaluate_voc(*case, CLASSES)


def test_label_outside_class_names_raises():
    case = _case([[(A, 1, False)]], [[(A, 7, 0.9)]])
    with pytest.raises(QCompressError, match="label 7"):
        evaluate_voc(*case, CLASSES)


def test_bad_box_shape_raises():
    case = list(_case([[(A, 1, False)]], [[(A, 1, 0.9)]]))
    case[3] = [np.zeros((1, 5))]
    with pytest.raises(QCompressError, match="shape"):
        evaluate_voc(*case, CLASSES)
