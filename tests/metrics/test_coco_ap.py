"""COCO AP: our wrapper against pycocotools run directly, and the VOC-to-COCO conversion."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from qcompress.data.dataset import Annotation
from qcompress.errors import QCompressError
from qcompress.metrics.coco_ap import (
    STAT_NAMES,
    annotations_to_coco,
    detections_to_coco,
    evaluate_coco,
    evaluate_coco_detections,
)
from qcompress.models.detector import Detections

CLASSES = ("BACKGROUND", "cat", "dog", "bird")


def _random_dataset(seed: int) -> tuple[dict, list[dict]]:
    """A COCO ground truth dict (boxes of all three area ranges, some crowd) and results for it."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    categories = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "bird"}]
    for image_id in range(101, 101 + int(rng.integers(3, 12))):
        images.append({"id": image_id, "height": 480, "width": 640})
        for _ in range(int(rng.integers(0, 8))):
            side = rng.choice([rng.uniform(8, 30), rng.uniform(35, 90), rng.uniform(100, 300)])
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            category = int(rng.choice([3, 7]))  # bird never has ground truth
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.1),
                }
            )
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.15 * side, size=4)
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": category if rng.random() < 0.85 else int(rng.choice([3, 7, 9])),
                        "bbox": [
                            x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)
                        ],
                        "score": float(rng.random()),
                    }
                )
        for _ in range(int(rng.integers(0, 4))):
            w, h = rng.uniform(5, 200, size=2)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice([3, 7, 9])),
                    "bbox": [rng.uniform(0, 400), rng.uniform(0, 300), w, h],
                    "score": float(rng.random()),
                }
            )
    return {"images": images, "categories": categories, "annotations": annotations}, results


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _pycocotools_stats(dataset: dict, results: list[dict], category_ids=None) -> np.ndarray:
    gt = _coco(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iouType="bbox")
        if category_ids is not None:
            evaluator.params.catIds = category_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("seed", range(8))
def test_matches_pycocotools_run_directly(seed):
    dataset, results = _random_dataset(seed)
    ours = evaluate_coco(_coco(dataset), results)
    expected = _pycocotools_stats(dataset, results)
    assert list(ours.stats) == list(STAT_NAMES)
    np.testing.assert_array_equal(np.array([ours.stats[k] for k in STAT_NAMES]), expected)
    # Per class: pycocotools' summary restricted to that one category.
    for category in dataset["categories"]:
        single = _pycocotools_stats(dataset, results, [category["id"]])[0]
        value = ours.ap_per_class[category["name"]]
        if single == -1:
            assert math.isnan(value), category["name"]
        else:
            assert value == pytest.approx(single, abs=1e-12), category["name"]
    assert math.isnan(ours.ap_per_class["bird"])


def test_random_datasets_cover_all_area_ranges():
    # Guard on the generator: the comparison above must see real small/medium/large numbers.
    stats = np.array([_pycocotools_stats(*_random_dataset(seed)) for seed in range(8)])
    assert np.all(stats[:, 3:6].max(axis=0) > 0)
    assert np.all((stats[:, 0] > 0) & (stats[:, 0] < 1))


def test_prints_nothing_and_leaves_results_unchanged(capsys):
    dataset, results = _random_dataset(0)
    saved = copy.deepcopy(results)
    evaluate_coco(_coco(dataset), results)
    assert capsys.readouterr().out == ""
    assert results == saved


def test_empty_results_give_zero_where_there_is_ground_truth(capsys):
    # One medium cat, nothing small or large, no detections: AP 0 where there is ground truth,
    # -1 (pycocotools' "no ground truth") for the small and large ranges.
    dataset = {
        "images": [{"id": 1, "height": 100, "width": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500,
                         "iscrowd": 0}],
    }
    result = evaluate_coco(_coco(dataset), [])
    assert capsys.readouterr().out == ""
    expected = dict.fromkeys(STAT_NAMES, 0.0) | {"APs": -1.0, "APl": -1.0, "ARs": -1.0, "ARl": -1.0}
    assert result.stats == expected
    assert result.ap_per_class["cat"] == 0.0
    assert math.isnan(result.ap_per_class["dog"])


def test_per_class_ap_is_keyed_by_the_models_class_names():
    # COCO says "motorcycle" where a VOC model says "motorbike": reports name the model's classes.
    dataset = {
        "images": [{"id": 1, "height": 100, "width": 100}],
        "categories": [{"id": 2, "name": "bicycle"}, {"id": 4, "name": "motorcycle"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
        ],
    }
    results = [{"image_id": 1, "category_id": 4, "bbox": [10, 10, 50, 50], "score": 0.9}]
    named = evaluate_coco(_coco(dataset), results, category_names={4: "motorbike", 2: "bicycle"})
    assert named.ap_per_class == {"bicycle": 0.0, "motorbike": pytest.approx(1.0)}
    assert evaluate_coco(_coco(dataset), results).ap_per_class == {"bicycle": 0.0, "motorcycle": pytest.approx(1.0)}


def test_unknown_image_id_raises():
    dataset, results = _random_dataset(1)
    results = results + [{"image_id": 999999, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(QCompressError, match="not in the ground truth"):
        evaluate_coco(_coco(dataset), results)


# ----------------------------------------------------------------------------- VOC data converted on the fly
def _voc_like(seed: int = 0):
    rng = np.random.default_rng(seed)
    annotations, sizes = [], []
    for _ in range(6):
        k = int(rng.integers(1, 6))
        xy = rng.uniform(0, 300, size=(k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 150, size=(k, 2))], axis=1).astype(np.float32)
        annotations.append(Annotation(boxes, rng.integers(1, 3, size=k), np.zeros(k, bool)))
        sizes.append((480, 500))
    return annotations, sizes


def _perfect(annotations):
    return [
        Detections(
            torch.from_numpy(a.boxes), torch.from_numpy(a.labels), torch.linspace(0.9, 0.5, len(a.labels))
        )
        for a in annotations
    ]


def test_perfect_detections_on_converted_voc_give_one():
    annotations, sizes = _voc_like()
    result = evaluate_coco_detections(annotations, _perfect(annotations), CLASSES, sizes)
    assert result.stats["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert result.stats["AP"] == pytest.approx(1.0, abs=1e-12)
    expected_per_class = {"cat": 1.0, "dog": 1.0, "bird": math.nan}
    assert result.ap_per_class == pytest.approx(expected_per_class, abs=1e-12, nan_ok=True)


def test_missing_detections_lower_ap_on_converted_voc():
    annotations, sizes = _voc_like()
    detections = _perfect(annotations)
    detections[0] = Detections(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), torch.zeros((0,)))
    result = evaluate_coco_detections(annotations, detections, CLASSES, sizes)
    assert result.stats["AP50"] < 1.0


def test_converted_ground_truth_layout():
    annotations = [
        Annotation(
            np.array([[10, 20, 50, 80], [0, 0, 5, 5]], np.float32), np.array([2, 1]), np.array([False, True])
        ),
        Annotation.empty(),
    ]
    coco = annotations_to_coco(annotations, CLASSES, [(100, 200), (50, 60)], image_ids=[5, 9])
    assert coco.dataset["categories"] == [
        {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}
    ]
    assert coco.dataset["images"] == [
        {"id": 5, "height": 100, "width": 200}, {"id": 9, "height": 50, "width": 60}
    ]
    first, second = coco.dataset["annotations"]
    assert first == {
        "id": 1, "image_id": 5, "category_id": 2, "bbox": [10.0, 20.0, 40.0, 60.0], "area": 2400.0,
        "iscrowd": 0,
    }
    assert second["iscrowd"] == 1 and second["id"] == 2


def test_difficult_boxes_are_neither_needed_nor_false_positives():
    regular, difficult = [10, 10, 110, 110], [200, 200, 300, 300]
    boxes = np.array([regular, difficult], np.float32)
    annotation = Annotation(boxes, np.array([1, 1]), np.array([False, True]))

    def coco_ap(annotation, boxes, scores):
        detections = Detections(
            torch.tensor(boxes, dtype=torch.float32),
            torch.ones(len(boxes), dtype=torch.int64),
            torch.tensor(scores),
        )
        return evaluate_coco_detections([annotation], [detections], CLASSES, [(400, 400)]).stats["AP"]

    # Only the regular box found: the missed difficult box costs no recall.
    assert coco_ap(annotation, [regular], [0.5]) == pytest.approx(1.0, abs=1e-12)
    # A higher scoring detection on the difficult box is ignored, not a false positive.
    assert coco_ap(annotation, [difficult, regular], [0.9, 0.5]) == pytest.approx(1.0, abs=1e-12)
    # Control: the same box as a regular false positive does lower AP.
    plain = Annotation(boxes[:1], np.array([1]), np.array([False]))
    assert coco_ap(plain, [difficult, regular], [0.9, 0.5]) < 0.9


def test_detections_to_coco_converts_boxes_and_maps_labels():
    detections = [
        Detections(torch.tensor([[10.0, 20.0, 50.0, 80.0], [1.0, 1.0, 2.0, 2.0]]), torch.tensor([2, 0]),
                   torch.tensor([0.75, 0.5])),
        SimpleNamespace(
            boxes=np.array([[0.0, 0.0, 4.0, 2.0]]), labels=np.array([1]), scores=np.array([0.25])
        ),
    ]
    results = detections_to_coco(detections, [7, 8], label_to_category={1: 18, 2: 44})
    assert results == [
        {"image_id": 7, "category_id": 44, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.75},
        {"image_id": 8, "category_id": 18, "bbox": [0.0, 0.0, 4.0, 2.0], "score": 0.25},
    ]  # the background detection (label 0) is dropped
    with pytest.raises(QCompressError, match="label 2"):
        detections_to_coco(detections, [7, 8], label_to_category={1: 18})


def test_conversion_checks_lengths_and_labels():
    annotations, sizes = _voc_like()
    with pytest.raises(QCompressError):
        annotations_to_coco(annotations, CLASSES, sizes[:-1])
    bad = [Annotation(np.zeros((1, 4), np.float32), np.array([0]), np.zeros(1, bool))]
    with pytest.raises(QCompressError, match="labels"):
        annotations_to_coco(bad, CLASSES, [(10, 10)])
