"""SSD training augmentation (Liu et al. 2016 sec. 2.2 "data augmentation"), numpy only.

Photometric distortion, zoom-out ("expand"), IoU-constrained random crop, horizontal flip.
All functions take and return ``(image uint8 HxWx3, boxes float32 (K,4) pixels, labels (K,))``.
"""

from __future__ import annotations

import numpy as np

CROP_MIN_IOUS = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -1.0)  # None: keep the whole image; -1: any crop


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = image.astype(np.float32)
    if rng.random() < 0.5:
        x += rng.uniform(-32, 32)
    if rng.random() < 0.5:
        x *= rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        gray = x.mean(axis=2, keepdims=True)
        x = gray + (x - gray) * rng.uniform(0.5, 1.5)
    if rng.random() < 0.2:
        x = x[:, :, rng.permutation(3)]
    return np.clip(x, 0, 255).astype(np.uint8)


def expand(image, boxes, labels, rng: np.random.Generator, mean=(127, 127, 127), max_ratio: float = 3.0):
    if rng.random() < 0.5:
        return image, boxes, labels
    h, w, c = image.shape
    ratio = rng.uniform(1, max_ratio)
    left, top = int(rng.uniform(0, w * ratio - w)), int(rng.uniform(0, h * ratio - h))
    canvas = np.empty((int(h * ratio), int(w * ratio), c), dtype=image.dtype)
    canvas[:] = np.asarray(mean, dtype=image.dtype)
    canvas[top : top + h, left : left + w] = image
    return canvas, boxes + np.array([left, top, left, top], np.float32), labels


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def random_crop(image, boxes, labels, rng: np.random.Generator, tries: int = 50):
    h, w, _ = image.shape
    if len(boxes) == 0:
        return image, boxes, labels
    while True:
        min_iou = CROP_MIN_IOUS[rng.integers(len(CROP_MIN_IOUS))]
        if min_iou is None:
            return image, boxes, labels
        for _ in range(tries):
            cw, ch = rng.uniform(0.3 * w, w), rng.uniform(0.3 * h, h)
            if not 0.5 <= ch / cw <= 2:
                continue
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            rect = np.array([left, top, left + cw, top + ch], np.float32).round()
            if _iou_one_to_many(rect, boxes).max() < min_iou:
                continue
            centers = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = (centers > rect[:2]).all(axis=1) & (centers < rect[2:]).all(axis=1)
            if not inside.any():
                continue
            x1, y1, x2, y2 = rect.astype(int)
            cropped = boxes[inside].copy()
            cropped[:, :2] = np.maximum(cropped[:, :2], rect[:2]) - rect[:2]
            cropped[:, 2:] = np.minimum(cropped[:, 2:], rect[2:]) - rect[:2]
            return image[y1:y2, x1:x2], cropped, labels[inside]


def hflip(image, boxes, labels, rng: np.random.Generator):
    if rng.random() < 0.5:
        return image, boxes, labels
    w = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return image[:, ::-1], flipped, labels


def ssd_augment(image, boxes, labels, rng: np.random.Generator, mean=(127, 127, 127)):
    image = photometric(image, rng)
    image, boxes, labels = expand(image, boxes, labels, rng, mean)
    image, boxes, labels = random_crop(image, boxes, labels, rng)
    image, boxes, labels = hflip(image, boxes, labels, rng)
    return np.ascontiguousarray(image), boxes, labels
