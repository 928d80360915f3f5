"""Fidelity of a compressed detector to its float parent, for data without labels.

The reference (fp32) model's own detections with ``score >= score_threshold`` become pseudo ground
truth; the compressed model's detections are scored against it with the same VOC AP machinery as
labelled data (area AP at IoU 0.5, :func:`qcompress.metrics.voc_ap.evaluate_voc_detections`). A
model identical to its reference scores AP 1.0, matched IoU 1.0 and score drift 0.

Besides AP, a greedy one-to-one matching (test detections by descending score, each taking the
unmatched pseudo ground-truth box of its class with the highest IoU ``>= iou``) gives the mean IoU
of matched boxes, the recall of the pseudo ground truth and the score drift of matched pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from qcompress.data.dataset import Annotation
from qcompress.errors import QCompressError
from qcompress.metrics.voc_ap import box_iou, evaluate_voc_detections, to_numpy


def pseudo_ground_truth(reference_detections: Sequence[Any], score_threshold: float = 0.5) -> list[Annotation]:
    """One :class:`Annotation` per image: the reference detections scoring ``>= score_threshold``.

    Labels are kept; nothing is marked difficult. ``reference_detections``: objects with ``boxes``
    ``(K, 4)`` xyxy pixels, ``labels`` ``(K,)`` and ``scores`` ``(K,)`` (torch or numpy).
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise QCompressError(f"score threshold {score_threshold} is outside [0, 1]", "use e.g. 0.5")
    annotations = []
    for det in reference_detections:
        boxes, labels, scores = _arrays(det)
        keep = (scores >= score_threshold) & (labels > 0)
        annotations.append(
            Annotation(boxes[keep].astype(np.float32), labels[keep].astype(np.int64), np.zeros(int(keep.sum()), bool))
        )
    return annotations


def fidelity_scores(
    reference_dets: Sequence[Any],
    test_dets: Sequence[Any],
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    iou: float = 0.5,
) -> dict[str, Any]:
    """How closely ``test_dets`` reproduce ``reference_dets`` (one entry per image, same images).

    Returns a JSON-ready dict:

    - ``AP50`` / ``ap_per_class``: VOC area AP of the test detections (all of them, any score)
      against the pseudo ground truth; nan for classes without pseudo ground truth (and for
      ``AP50`` when no class has any).
    - ``AP50_95``: pycocotools AP averaged over IoU .50:.95 against the same pseudo ground truth
      (nan without any).
    - ``recall``: fraction of pseudo ground-truth boxes matched by a test detection that itself
      scores ``>= score_threshold`` (what a user keeping the same threshold sees);
      ``recall_any_score``: matched by a test detection of any score; ``precision``: fraction of
      test detections ``>= score_threshold`` that matched.
    - ``mean_iou``: mean IoU of the matched pairs (greedy by test score, IoU ``>= iou``).
    - ``score_drift_abs`` / ``score_drift_signed``: mean ``|s_test - s_ref|`` and mean
      ``s_test - s_ref`` over the matched pairs.
    - counts: ``num_images``, ``num_pseudo_gt`` (and per class), ``num_test_detections``,
      ``num_test_above_threshold``, ``num_matched``.
    """
    if len(reference_dets) != len(test_dets):
        raise QCompressError(
            f"{len(reference_dets)} reference results but {len(test_dets)} test results",
            "run both models on the same images, in the same order",
        )
    if not 0.0 < iou <= 1.0:
        raise QCompressError(f"IoU threshold {iou} is outside (0, 1]", "use 0.5")
    pseudo = pseudo_ground_truth(reference_dets, score_threshold)
    voc = evaluate_voc_detections(pseudo, test_dets, class_names, iou_threshold=iou, use_07_metric=False)
    ap50_95 = _coco_ap50_95(pseudo, test_dets, class_names)

    ious: list[np.ndarray] = []
    drifts: list[np.ndarray] = []
    matched_above = matched_any = num_test = num_test_above = 0
    for ref, test in zip(reference_dets, test_dets):
        ref_boxes, ref_labels, ref_scores = _arrays(ref)
        keep = (ref_scores >= score_threshold) & (ref_labels > 0)
        ref_boxes, ref_labels, ref_scores = ref_boxes[keep], ref_labels[keep], ref_scores[keep]
        boxes, labels, scores = _arrays(test)
        valid = labels > 0
        boxes, labels, scores = boxes[valid], labels[valid], scores[valid]
        num_test += len(scores)
        num_test_above += int((scores >= score_threshold).sum())
        pair_test, pair_ref, pair_iou = greedy_match(boxes, labels, scores, ref_boxes, ref_labels, iou)
        matched_any += len(pair_test)
        matched_above += int((scores[pair_test] >= score_threshold).sum())
        ious.append(pair_iou)
        drifts.append(scores[pair_test] - ref_scores[pair_ref])

    all_iou = np.concatenate(ious) if ious else np.zeros(0)
    all_drift = np.concatenate(drifts) if drifts else np.zeros(0)
    num_gt = sum(voc.num_gt_per_class.values())
    return {
        "metric": "voc-area AP vs reference detections",
        "score_threshold": float(score_threshold),
        "iou_threshold": float(iou),
        "AP50": float(voc.mAP),
        # COCO-style AP over IoU .50:.95 (pycocotools): AP50 saturates near 1 for int8 recipes, this
        # still separates them by how tightly the boxes agree.
        "AP50_95": ap50_95,
        "ap_per_class": {k: float(v) for k, v in voc.ap_per_class.items()},
        "recall": _ratio(matched_above, num_gt),
        "recall_any_score": _ratio(matched_any, num_gt),
        "precision": _ratio(matched_above, num_test_above),
        "mean_iou": float(all_iou.mean()) if all_iou.size else math.nan,
        "score_drift_abs": float(np.abs(all_drift).mean()) if all_drift.size else math.nan,
        "score_drift_signed": float(all_drift.mean()) if all_drift.size else math.nan,
        "num_images": len(reference_dets),
        "num_pseudo_gt": int(num_gt),
        "num_pseudo_gt_per_class": dict(voc.num_gt_per_class),
        "num_test_detections": int(num_test),
        "num_test_above_threshold": int(num_test_above),
        "num_matched": int(matched_any),
    }


def _coco_ap50_95(pseudo: Sequence[Annotation], test_dets: Sequence[Any], class_names: Sequence[str]) -> float:
    if not any(len(a.labels) for a in pseudo):
        return math.nan
    from qcompress.metrics.coco_ap import evaluate_coco_detections

    # Image sizes only name the COCO images (bbox AP does not use them): the extent of the boxes.
    sizes = []
    for annotation, det in zip(pseudo, test_dets):
        extent = [np.asarray(annotation.boxes, np.float64).reshape(-1, 4), _arrays(det)[0].reshape(-1, 4)]
        corner = np.concatenate(extent).max(axis=0) if sum(len(e) for e in extent) else np.ones(4)
        sizes.append((int(corner[3]) + 1, int(corner[2]) + 1))
    return float(evaluate_coco_detections(pseudo, test_dets, class_names, sizes).stats["AP"])


def greedy_match(
    test_boxes: np.ndarray,
    test_labels: np.ndarray,
    test_scores: np.ndarray,
    ref_boxes: np.ndarray,
    ref_labels: np.ndarray,
    iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches in one image: ``(test indices, reference indices, IoUs)``.

    Test detections in descending score order (stable) each take the still unmatched reference box
    of the same label with the highest IoU, if that IoU is ``>= iou``.
    """
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if len(test_boxes) == 0 or len(ref_boxes) == 0:
        return empty
    overlaps = box_iou(test_boxes, ref_boxes)
    overlaps[test_labels[:, None] != ref_labels[None, :]] = -1.0
    taken = np.zeros(len(ref_boxes), bool)
    pairs_test, pairs_ref, pairs_iou = [], [], []
    for t in np.argsort(-test_scores, kind="stable"):
        row = np.where(taken, -1.0, overlaps[t])
        r = int(row.argmax())
        if row[r] >= iou:
            taken[r] = True
            pairs_test.append(int(t))
            pairs_ref.append(r)
            pairs_iou.append(float(row[r]))
            if taken.all():
                break
    if not pairs_test:
        return empty
    return np.asarray(pairs_test, np.int64), np.asarray(pairs_ref, np.int64), np.asarray(pairs_iou, np.float64)


def _arrays(det: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = to_numpy(det.boxes).astype(np.float64).reshape(-1, 4)
    labels = to_numpy(det.labels).astype(np.int64).reshape(-1)
    scores = to_numpy(det.scores).astype(np.float64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise QCompressError(
            f"{len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores in one result",
            "pass one label and score per box",
        )
    return boxes, labels, scores


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


__all__ = ["fidelity_scores", "greedy_match", "pseudo_ground_truth"]
