"""Time the metrics on 500 synthetic images' worth of detections (the "<5% of eval time" bar).

Usage: python benchmarks/metric_speed.py [--images 500] [--detections 200] [--classes 20] [--coco]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qcompress.data.dataset import Annotation
from qcompress.metrics.coco_ap import evaluate_coco_detections
from qcompress.metrics.voc_ap import evaluate_voc_detections


class _Detections:
    def __init__(self, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> None:
        self.boxes, self.labels, self.scores = boxes, labels, scores


def _synthetic(num_images: int, detections_per_image: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    annotations, detections = [], []
    for _ in range(num_images):
        k = int(rng.integers(1, 8))
        xy = rng.uniform(0, 400, size=(k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 200, size=(k, 2))], axis=1).astype(np.float32)
        labels = rng.integers(1, num_classes, size=k)
        annotations.append(Annotation(boxes, labels, rng.random(k) < 0.1))
        # A few near-copies of the ground truth, the rest anywhere (like NMS output at threshold 0.01).
        copies = boxes[rng.integers(0, k, size=2 * k)] + rng.normal(0, 5, size=(2 * k, 4))
        m = detections_per_image - len(copies)
        rxy = rng.uniform(0, 400, size=(m, 2))
        randoms = np.concatenate([rxy, rxy + rng.uniform(10, 200, size=(m, 2))], axis=1)
        d_labels = np.concatenate(
            [labels[rng.integers(0, k, size=2 * k)], rng.integers(1, num_classes, size=m)]
        )
        detections.append(
            _Detections(
                np.concatenate([copies, randoms]).astype(np.float32),
                d_labels,
                rng.random(detections_per_image),
            )
        )
    return annotations, detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--detections", type=int, default=200)
    parser.add_argument("--classes", type=int, default=21, help="including BACKGROUND")
    parser.add_argument("--coco", action="store_true", help="also time the pycocotools path")
    args = parser.parse_args()
    class_names = ["BACKGROUND"] + [f"class{i}" for i in range(1, args.classes)]
    annotations, detections = _synthetic(args.images, args.detections, args.classes, seed=0)
    print(f"{args.images} images x {args.detections} detections, {args.classes - 1} classes")
    for use_07 in (True, False):
        start = time.perf_counter()
        result = evaluate_voc_detections(annotations, detections, class_names, use_07_metric=use_07)
        elapsed = time.perf_counter() - start
        print(f"VOC {result.metric:5s}  mAP {result.mAP:.4f}  {elapsed:.3f} s")
    if args.coco:
        sizes = [(600, 600)] * len(annotations)
        start = time.perf_counter()
        result = evaluate_coco_detections(annotations, detections, class_names, sizes)
        elapsed = time.perf_counter() - start
        print(f"COCO (pycocotools)  AP {result.stats['AP']:.4f}  {elapsed:.3f} s")


if __name__ == "__main__":
    main()
