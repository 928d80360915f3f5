"""Drawing detections: pixels change on the boxes and nowhere far from them; colours per class; panels."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from PIL import Image

from qcompress.models.detector import Detections
from qcompress.reports.draw import class_colour, draw_boxes, draw_detections, side_by_side

CLASSES = ("BACKGROUND", "circle", "square", "triangle")


def _image(h: int = 200, w: int = 240) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _detections(boxes, labels, scores) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels), torch.tensor(scores))


def test_box_is_drawn_in_class_colour_and_far_pixels_untouched():
    image = _image()
    box = (60.0, 80.0, 150.0, 170.0)
    drawn = np.asarray(draw_detections(image, _detections([box], [2], [0.9]), CLASSES))
    assert drawn.shape == image.shape
    # The outline: left/right/bottom edges carry exactly the class colour.
    colour = np.array(class_colour(2))
    assert (drawn[100:160, 60] == colour).all() and (drawn[100:160, 150] == colour).all()
    assert (drawn[170, 70:140] == colour).all()
    # Inside the box, away from the outline, the image is unchanged (boxes are not filled).
    assert (drawn[100:160, 70:140] == image[100:160, 70:140]).all()
    # The "square 0.90" tag sits above the box; nothing else changes far from it.
    tag = drawn[55:80, 60:140]
    assert (tag != image[55:80, 60:140]).any()
    far = np.ones(image.shape[:2], bool)
    far[50:175, 55:235] = False
    assert (drawn[far] == image[far]).all()


def test_score_threshold_filters_and_input_is_not_modified():
    image = _image()
    original = image.copy()
    dets = _detections([(10, 10, 50, 50), (100, 100, 180, 180)], [1, 3], [0.2, 0.8])
    drawn = np.asarray(draw_detections(image, dets, CLASSES, score_threshold=0.5))
    assert (image == original).all()
    assert (drawn[10:50, 10] == image[10:50, 10]).all()  # the 0.2 box is not drawn
    assert (drawn[120:170, 100] == np.array(class_colour(3))).all()
    nothing = np.asarray(draw_detections(image, dets, CLASSES, score_threshold=0.9))
    assert (nothing == image).all()


def test_label_tag_inside_when_box_touches_top_and_boxes_clipped():
    image = _image()
    drawn = np.asarray(draw_boxes(image, [(-20.0, 0.0, 80.0, 60.0)], [1], CLASSES))  # ground truth: no score
    assert (drawn[5:15, 0:40] != image[5:15, 0:40]).any()  # tag just inside the top edge
    assert (drawn[120:, 120:] == image[120:, 120:]).all()


def test_class_colours_are_distinct():
    colours = [class_colour(i) for i in range(1, 21)]
    for a, b in itertools.combinations(colours, 2):
        assert sum(abs(x - y) for x, y in zip(a, b)) > 30


def test_side_by_side_keeps_each_panel():
    left = Image.fromarray(_image(100, 120))
    right = Image.fromarray(_image(80, 90)[::-1].copy())
    sheet = side_by_side([left, right], ["fp32", "int8"], gap=8)
    assert sheet.width == 120 + 90 + 3 * 8
    array = np.asarray(sheet)
    top = sheet.height - 100 - 8  # panels are pasted under the title bar
    assert (array[top : top + 100, 8:128] == np.asarray(left)).all()
    assert (array[top : top + 80, 136:226] == np.asarray(right)).all()
    assert (array[:top, 8:128] != 255).any()  # a title was written
