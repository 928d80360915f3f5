"""Detection metrics: VOC AP (11-point and area, numpy) and COCO AP (pycocotools)."""

from qcompress.metrics.coco_ap import (
    CocoResult,
    annotations_to_coco,
    detections_to_coco,
    evaluate_coco,
    evaluate_coco_detections,
)
from qcompress.metrics.voc_ap import VocResult, average_precision, evaluate_voc, evaluate_voc_detections

__all__ = [
    "CocoResult",
    "VocResult",
    "annotations_to_coco",
    "average_precision",
    "detections_to_coco",
    "evaluate_coco",
    "evaluate_coco_detections",
    "evaluate_voc",
    "evaluate_voc_detections",
]
