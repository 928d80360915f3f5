"""COCO AP through pycocotools, for COCO data and for any dataset converted on the fly.

pycocotools prints progress on stdout; the library must not print, so every call into it runs with
stdout redirected. Its ``loadRes`` also crashes on an empty result list and writes into the result
dicts; :func:`evaluate_coco` handles both.

VOC "difficult" boxes become ``iscrowd=1`` annotations when converted: pycocotools overwrites any
``ignore`` field with ``iscrowd``, so crowd is its only ignore mechanism. A detection matched to a
crowd box is neither TP nor FP and a crowd box missed costs no recall, which is VOC's "difficult"
meaning. Two differences from VOC's rule remain, both pycocotools': a crowd box's overlap is
intersection over the *detection's* area, and a detection prefers a regular box above the IoU
threshold to a crowd box.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from qcompress.errors import QCompressError
from qcompress.metrics.voc_ap import to_numpy

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class CocoResult:
    stats: dict[str, float]  # STAT_NAMES -> pycocotools' summary value (-1 where no ground truth qualifies)
    ap_per_class: dict[str, float]  # category name -> AP@[.5:.95], area all, 100 detections; nan without gt


def evaluate_coco(
    coco_gt: COCO,
    results: list[dict],
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
    category_names: Mapping[int, str] | None = None,
) -> CocoResult:
    """pycocotools' bbox evaluation of ``results`` against ``coco_gt``.

    ``results``: COCO result dicts (``image_id``, ``category_id``, ``bbox`` as ``[x, y, w, h]``
    pixels, ``score``); left unchanged. An empty list is valid (AP 0 where there is ground truth).
    ``image_ids`` restricts the evaluation to those images (e.g. the first N of a dataset);
    ``category_ids`` to those categories (the ones a model can predict). ``category_names`` (category
    id -> name) keys ``ap_per_class`` by the model's class names instead of COCO's ("motorbike", not
    "motorcycle"); categories it does not name keep COCO's name.
    """
    gt_image_ids = set(coco_gt.getImgIds())
    unknown = {r["image_id"] for r in results} - gt_image_ids
    if unknown:
        raise QCompressError(
            f"{len(unknown)} result image id(s) are not in the ground truth, "
            f"e.g. {min(unknown, key=str)!r}",
            "use the image ids the ground truth was built with",
        )
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to each dict
        else:
            coco_dt = _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        if category_ids is not None:
            evaluator.params.catIds = sorted({int(c) for c in category_ids})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    # precision: [IoU thresholds, recall thresholds, categories, area ranges, max detections];
    # area "all" is index 0, 100 detections the last; -1 marks "no ground truth".
    precision = evaluator.eval["precision"]
    ap_per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        name = (category_names or {}).get(category_id, coco_gt.cats[category_id]["name"])
        ap_per_class[name] = float(values.mean()) if values.size else math.nan
    return CocoResult(stats=stats, ap_per_class=ap_per_class)


def annotations_to_coco(
    annotations: Sequence[Any],
    class_names: Sequence[str],
    image_sizes: Sequence[tuple[int, int]],
    image_ids: Sequence[int] | None = None,
) -> COCO:
    """An in-memory COCO ground truth from :class:`~qcompress.data.dataset.Annotation` objects.

    ``image_sizes``: ``(height, width)`` per image. ``image_ids`` default to the dataset indices
    ``0..N-1``; pass the same ids to :func:`detections_to_coco`. Category ids are the label indices
    ``1..C-1`` named by ``class_names`` (entry 0, the background, is not a category). Difficult boxes
    become ``iscrowd=1`` (see the module docstring); areas are box areas.
    """
    ids = list(range(len(annotations))) if image_ids is None else [int(i) for i in image_ids]
    if not len(ids) == len(annotations) == len(image_sizes):
        raise QCompressError(
            f"{len(annotations)} annotations, {len(image_sizes)} image sizes, {len(ids)} image ids",
            "pass one size and one id per annotated image",
        )
    if len(set(ids)) != len(ids):
        raise QCompressError("image ids repeat", "give every image its own id")
    images = [
        {"id": image_id, "height": int(height), "width": int(width)}
        for image_id, (height, width) in zip(ids, image_sizes)
    ]
    categories = [{"id": c, "name": name} for c, name in enumerate(class_names) if c > 0]
    coco_annotations = []
    for image_id, annotation in zip(ids, annotations):
        boxes = to_numpy(annotation.boxes).astype(np.float64).reshape(-1, 4)
        labels = to_numpy(annotation.labels).astype(np.int64).reshape(-1)
        difficult = to_numpy(annotation.difficult).astype(bool).reshape(-1)
        if labels.size and (labels.min() < 1 or labels.max() >= len(class_names)):
            raise QCompressError(
                f"image {image_id}: ground truth labels must be in 1..{len(class_names) - 1}",
                "labels index into class_names, whose entry 0 is BACKGROUND",
            )
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        for x1, y1, w, h, label, crowd in zip(
            boxes[:, 0].tolist(), boxes[:, 1].tolist(), widths.tolist(), heights.tolist(),
            labels.tolist(), difficult.tolist(),
        ):
            coco_annotations.append(
                {
                    # pycocotools treats annotation id 0 as "unmatched", so ids start at 1.
                    "id": len(coco_annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": coco_annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco(
    detections: Sequence[Any],
    image_ids: Sequence[int],
    label_to_category: Mapping[int, int] | None = None,
) -> list[dict]:
    """COCO result dicts from per-image detections (``boxes`` xyxy pixels, ``labels``, ``scores``).

    Labels map to category ids through ``label_to_category`` (identity when None, matching
    :func:`annotations_to_coco`); label 0, the background, is skipped.
    """
    if len(detections) != len(image_ids):
        raise QCompressError(
            f"{len(detections)} detection results but {len(image_ids)} image ids", "pass one id per image"
        )
    results = []
    for image_id, detection in zip(image_ids, detections):
        boxes = to_numpy(detection.boxes).astype(np.float64).reshape(-1, 4)
        labels = to_numpy(detection.labels).astype(np.int64).reshape(-1).tolist()
        scores = to_numpy(detection.scores).astype(np.float64).reshape(-1).tolist()
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        for box, label, score in zip(xywh, labels, scores):
            if label == 0:
                continue
            if label_to_category is None:
                category = label
            elif label in label_to_category:
                category = int(label_to_category[label])
            else:
                raise QCompressError(
                    f"label {label} has no COCO category", "add it to label_to_category"
                )
            results.append({"image_id": image_id, "category_id": category, "bbox": box, "score": score})
    return results


def evaluate_coco_detections(
    annotations: Sequence[Any],
    detections: Sequence[Any],
    class_names: Sequence[str],
    image_sizes: Sequence[tuple[int, int]],
) -> CocoResult:
    """COCO metrics for any dataset's annotations (e.g. VOC), converted on the fly."""
    coco_gt = annotations_to_coco(annotations, class_names, image_sizes)
    return evaluate_coco(coco_gt, detections_to_coco(detections, list(range(len(annotations)))))


def _empty_results(coco_gt: COCO) -> COCO:
    """What ``loadRes`` would return for no detections, had it not crashed on an empty list."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": [dict(c) for c in coco_gt.dataset.get("categories", [])],
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt
