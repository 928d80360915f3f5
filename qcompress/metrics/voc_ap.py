"""PASCAL VOC average precision, vectorised with numpy.

The definitions are the VOC devkit's (``VOCevaldet.m`` / ``voc_eval.py``), with two deliberate
departures, both about coordinates and thresholds rather than the algorithm:

- Boxes are continuous float pixels ``(x1, y1, x2, y2)`` (see :mod:`qcompress.data.dataset`), so
  areas are ``(x2 - x1) * (y2 - y1)`` with no ``+ 1`` terms: the readers already turned VOC's
  1-based inclusive corners into continuous ones.
- A detection matches when its best IoU is ``>= iou_threshold`` (the MATLAB devkit's rule;
  ``voc_eval.py`` and pytorch-ssd use ``>``, which differs only at exact equality).

Matching per class: detections of that class over all images, sorted by score descending (stable, so
ties keep input order: image by image, then position in the image); each detection takes the
ground truth box of its class in its image with the highest IoU, whether that box is already matched
or difficult. If that IoU reaches the threshold, a difficult box makes the detection ignored (neither
TP nor FP), an unmatched box makes it a TP (and marks the box), a matched box makes it a FP
(duplicate); otherwise it is a FP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompress.errors import QCompressError

# np.arange's thresholds, not i / 10: 3 * 0.1 == 0.30000000000000004, so a recall of exactly 0.3
# does not reach "0.3". The Python devkit (voc_eval.py) and pytorch-ssd both iterate over this
# array, and the 11-point metric exists here to reproduce their numbers.
_VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)


@dataclass
class VocResult:
    ap_per_class: dict[str, float]  # class name -> AP; nan for classes without non-difficult ground truth
    num_gt_per_class: dict[str, int]  # non-difficult ground truth boxes
    num_det_per_class: dict[str, int]  # all detections of the class, ignored ones included
    mAP: float  # mean over classes whose AP is not nan (nan if there is none)
    metric: str  # "voc07" (11-point) or "voc" (area under the curve, VOC2010+)


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP of one precision/recall curve (points in detection order, recall non-decreasing).

    ``use_07_metric``: the VOC2007 11-point metric, the mean over ``t`` in ``0, 0.1, ..., 1`` of the
    highest precision at recall ``>= t`` (0 where recall never reaches ``t``). Otherwise the VOC2010+
    area: precision made monotone (each point takes the highest precision at any later point), summed
    over the steps where recall changes, with the curve closed at recall 0 and 1.
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise QCompressError(
            f"recall and precision differ in length ({recall.size} vs {precision.size})",
            "pass one precision per recall point",
        )
    if use_07_metric:
        if recall.size == 0:
            return 0.0
        # Highest precision at or after each point; recall is non-decreasing, so "recall >= t" is a
        # suffix of the curve starting at the first point that reaches t.
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        first = np.searchsorted(recall, _VOC07_RECALL_THRESHOLDS, side="left")
        reached = first < recall.size
        return float(np.sum(envelope[first[reached]]) / _VOC07_RECALL_THRESHOLDS.size)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def evaluate_voc(
    gt_boxes: list[np.ndarray],
    gt_labels: list[np.ndarray],
    gt_difficult: list[np.ndarray],
    det_boxes: list[np.ndarray],
    det_labels: list[np.ndarray],
    det_scores: list[np.ndarray],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> VocResult:
    """VOC AP per class and their mean over a dataset.

    Every argument but ``class_names`` is a list with one entry per image: boxes ``(K, 4)`` float
    ``(x1, y1, x2, y2)`` pixels, labels ``(K,)`` indices into ``class_names`` (entry 0 is the
    background: its detections are skipped), difficult flags ``(K,)``, scores ``(K,)``.
    ``use_07_metric`` picks the VOC2007 11-point AP (what pytorch-ssd reports) over the area under
    the curve (VOC2010+). Classes without non-difficult ground truth get AP nan and stay out of mAP.
    """
    num_images = len(gt_boxes)
    lengths = {len(x) for x in (gt_boxes, gt_labels, gt_difficult, det_boxes, det_labels, det_scores)}
    if len(lengths) != 1:
        raise QCompressError(
            "per-image lists differ in length "
            f"(gt boxes/labels/difficult: {len(gt_boxes)}/{len(gt_labels)}/{len(gt_difficult)}, "
            f"det boxes/labels/scores: {len(det_boxes)}/{len(det_labels)}/{len(det_scores)})",
            "pass one entry per image to every list",
        )
    if not 0.0 < iou_threshold <= 1.0:
        raise QCompressError(f"iou_threshold {iou_threshold} is outside (0, 1]", "VOC uses 0.5")
    num_classes = len(class_names)

    gt_label_parts, gt_difficult_parts = [], []
    det_label_parts, det_score_parts, det_match_parts = [], [], []
    gt_offset = 0
    for i in range(num_images):
        g_boxes = _boxes(gt_boxes[i], "ground truth", i)
        g_labels = _vector(gt_labels[i], np.int64, len(g_boxes), "ground truth labels", i)
        g_difficult = _vector(gt_difficult[i], bool, len(g_boxes), "difficult flags", i)
        d_boxes = _boxes(det_boxes[i], "detection", i)
        d_labels = _vector(det_labels[i], np.int64, len(d_boxes), "detection labels", i)
        d_scores = _vector(det_scores[i], np.float64, len(d_boxes), "detection scores", i)
        _check_labels(g_labels, num_classes, "ground truth", i)
        _check_labels(d_labels, num_classes, "detection", i)
        if not np.all(np.isfinite(d_scores)):
            raise QCompressError(
                f"image {i}: detection scores contain nan or inf", "check the model's outputs"
            )

        # Index of the ground truth box each detection matches (>= threshold), -1 for none. Which box
        # is the best depends only on geometry, not on what earlier detections took: that is what
        # lets the whole matching run without a per-detection loop.
        match = np.full(len(d_boxes), -1, dtype=np.int64)
        if len(d_boxes) and len(g_boxes):
            iou = box_iou(d_boxes, g_boxes)
            iou[d_labels[:, None] != g_labels[None, :]] = -1.0
            best = iou.argmax(axis=1)  # first of equal IoUs, like np.argmax in the devkit
            hit = iou[np.arange(len(d_boxes)), best] >= iou_threshold
            match[hit] = best[hit] + gt_offset
        gt_offset += len(g_boxes)
        gt_label_parts.append(g_labels)
        gt_difficult_parts.append(g_difficult)
        det_label_parts.append(d_labels)
        det_score_parts.append(d_scores)
        det_match_parts.append(match)

    all_gt_labels = _concat(gt_label_parts, np.int64)
    all_gt_difficult = _concat(gt_difficult_parts, bool)
    all_det_labels = _concat(det_label_parts, np.int64)
    all_det_scores = _concat(det_score_parts, np.float64)
    all_det_match = _concat(det_match_parts, np.int64)

    num_gt = np.bincount(all_gt_labels[~all_gt_difficult], minlength=num_classes)
    num_det = np.bincount(all_det_labels, minlength=num_classes)
    # Class, then score descending; lexsort is stable, so equal scores keep input order.
    order = np.lexsort((-all_det_scores, all_det_labels))
    sorted_labels = all_det_labels[order]
    sorted_match = all_det_match[order]
    bounds = np.searchsorted(sorted_labels, np.arange(num_classes + 1), side="left")

    ap_per_class: dict[str, float] = {}
    for c in range(1, num_classes):
        name = class_names[c]
        if num_gt[c] == 0:
            ap_per_class[name] = math.nan
            continue
        match = sorted_match[bounds[c] : bounds[c + 1]]
        matched = match >= 0
        # Detections whose best box is difficult are neither TP nor FP; dropping them leaves AP as is.
        keep = ~(matched & all_gt_difficult[np.where(matched, match, 0)])
        match, matched = match[keep], matched[keep]
        tp = np.zeros(match.size, dtype=bool)
        matched_index = np.flatnonzero(matched)
        # The first (highest scoring) detection on a box is the TP; later ones are duplicates.
        _, first = np.unique(match[matched_index], return_index=True)
        tp[matched_index[first]] = True
        tp_cum = np.cumsum(tp, dtype=np.float64)
        fp_cum = np.cumsum(~tp, dtype=np.float64)
        recall = tp_cum / float(num_gt[c])
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        ap_per_class[name] = average_precision(recall, precision, use_07_metric)

    valid = [ap for ap in ap_per_class.values() if not math.isnan(ap)]
    return VocResult(
        ap_per_class=ap_per_class,
        num_gt_per_class={class_names[c]: int(num_gt[c]) for c in range(1, num_classes)},
        num_det_per_class={class_names[c]: int(num_det[c]) for c in range(1, num_classes)},
        mAP=float(np.mean(valid)) if valid else math.nan,
        metric="voc07" if use_07_metric else "voc",
    )


def evaluate_voc_detections(
    annotations: Sequence[Any],
    detections: Sequence[Any],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> VocResult:
    """:func:`evaluate_voc` on :class:`~qcompress.data.dataset.Annotation` objects and detections.

    ``detections``: one object per image with ``boxes``, ``labels`` and ``scores`` as torch tensors
    or numpy arrays (e.g. :class:`~qcompress.models.detector.Detections`).
    """
    if len(annotations) != len(detections):
        raise QCompressError(
            f"{len(annotations)} annotations but {len(detections)} detections",
            "pass one detection result per annotated image, in the same order",
        )
    return evaluate_voc(
        gt_boxes=[to_numpy(a.boxes) for a in annotations],
        gt_labels=[to_numpy(a.labels) for a in annotations],
        gt_difficult=[to_numpy(a.difficult) for a in annotations],
        det_boxes=[to_numpy(d.boxes) for d in detections],
        det_labels=[to_numpy(d.labels) for d in detections],
        det_scores=[to_numpy(d.scores) for d in detections],
        class_names=class_names,
        iou_threshold=iou_threshold,
        use_07_metric=use_07_metric,
    )


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """``(N, M)`` IoU of ``(x1, y1, x2, y2)`` boxes; continuous coordinates (no ``+ 1``); 0 if no union."""
    a = np.asarray(boxes_a, dtype=np.float64)
    b = np.asarray(boxes_b, dtype=np.float64)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    width_height = np.clip(bottom_right - top_left, 0, None)
    inter = width_height[..., 0] * width_height[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _boxes(x: Any, what: str, image: int) -> np.ndarray:
    boxes = np.asarray(x, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise QCompressError(
            f"image {image}: {what} boxes have shape {boxes.shape}", "expected (K, 4) x1, y1, x2, y2 pixels"
        )
    return boxes


def _vector(x: Any, dtype: Any, length: int, what: str, image: int) -> np.ndarray:
    values = np.asarray(x, dtype=dtype).reshape(-1)
    if values.size != length:
        raise QCompressError(
            f"image {image}: {values.size} {what} for {length} boxes", "pass one value per box"
        )
    return values


def _check_labels(labels: np.ndarray, num_classes: int, what: str, image: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise QCompressError(
            f"image {image}: {what} label {int(labels.min() if labels.min() < 0 else labels.max())} "
            f"is outside 0..{num_classes - 1}",
            "labels index into class_names, whose entry 0 is BACKGROUND",
        )


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros((0,), dtype=dtype)
