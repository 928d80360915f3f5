"""COCO instances reader (pycocotools underneath, so COCO AP can use the same ``COCO`` object).

Category ids (sparse, 1..90 in COCO) map to contiguous labels. Without ``class_names`` the labels are
``1..K`` in category-id order; with a model's ``class_names`` each category maps to the class of the
same name (case, spaces and underscores ignored, plus the few VOC spellings of COCO names), and
categories without a class are skipped and listed in ``absent_categories``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcompress.data.dataset import Annotation
from qcompress.data.images import decode_image
from qcompress.errors import QCompressError
from qcompress.io_utils import BACKGROUND, read_json

log = logging.getLogger(__name__)

# VOC class spellings of the same COCO categories (normalised form -> normalised COCO name).
_ALIASES = {"aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch", "tvmonitor": "tv"}


def _normalise(name: str) -> str:
    key = re.sub(r"[\s_\-]+", "", name.strip().lower())
    return _ALIASES.get(key, key)


def _build_coco(data: dict[str, Any], ann_file: Path) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise QCompressError(
            f"not a COCO instances file (missing field {exc}): {ann_file}",
            "pass an instances_*.json annotation file",
        ) from None
    return coco


class CocoDataset:
    """COCO detection data; implements :class:`qcompress.data.dataset.DetectionDataset`.

    Images are every image in the file (with or without annotations), sorted by image id.
    ``iscrowd`` regions become ``difficult=True``; ``bbox`` ``[x, y, w, h]`` becomes ``x1, y1, x2, y2``.
    """

    def __init__(
        self,
        image_dir: Path | str,
        ann_file: Path | str,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.image_dir = Path(image_dir).expanduser()
        self.ann_file = Path(ann_file).expanduser()
        if not self.image_dir.is_dir():
            raise QCompressError(
                f"COCO image folder not found: {self.image_dir}", "pass the folder of the images"
            )
        data = read_json(self.ann_file, "COCO annotation file")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise QCompressError(
                f"not a COCO instances file (no 'images' list): {self.ann_file}",
                "pass an instances_*.json annotation file",
            )
        if not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations"), list):
            raise QCompressError(
                f"not a COCO instances file (no 'categories' / 'annotations' list): {self.ann_file}",
                "pass an instances_*.json annotation file, not a captions or image-info file",
            )
        self.coco = _build_coco(data, self.ann_file)
        categories = sorted(self.coco.cats.values(), key=lambda cat: cat["id"])

        if class_names is None:
            self.class_names: tuple[str, ...] = (BACKGROUND, *(str(cat["name"]) for cat in categories))
            self.category_id_to_label = {
                int(cat["id"]): label for label, cat in enumerate(categories, start=1)
            }
            self.absent_categories: tuple[str, ...] = ()
            self.classes_not_in_coco: tuple[str, ...] = ()
        else:
            self.class_names = tuple(class_names)
            by_name = {_normalise(name): label for label, name in enumerate(self.class_names) if label > 0}
            self.category_id_to_label = {}
            absent = []
            for cat in categories:
                label = by_name.get(_normalise(str(cat["name"])))
                if label is None:
                    absent.append(str(cat["name"]))
                else:
                    self.category_id_to_label[int(cat["id"])] = label
            matched = set(self.category_id_to_label.values())
            self.absent_categories = tuple(absent)
            self.classes_not_in_coco = tuple(
                name for label, name in enumerate(self.class_names) if label > 0 and label not in matched
            )
            if absent:
                log.warning(
                    "%d COCO categories have no class in the model and are skipped: %s",
                    len(absent),
                    ", ".join(absent),
                )
        self.label_to_category_id = {label: cat_id for cat_id, label in self.category_id_to_label.items()}
        self._image_ids: list[int] = sorted(int(image_id) for image_id in self.coco.imgs)

    def __len__(self) -> int:
        return len(self._image_ids)

    def __repr__(self) -> str:
        return (
            f"CocoDataset(images={len(self)}, classes={len(self.class_names) - 1}, ann_file={self.ann_file})"
        )

    def coco_image_id(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self._image_ids[index]

    def image_id(self, index: int) -> str:
        return str(self.coco_image_id(index))

    def image_info(self, index: int) -> dict[str, Any]:
        return self.coco.imgs[self.coco_image_id(index)]

    def image_path(self, index: int) -> Path:
        info = self.image_info(index)
        file_name = info.get("file_name")
        if not file_name:
            raise QCompressError(
                f"image {info.get('id')} has no file_name in {self.ann_file}", "fix the annotation file"
            )
        return self.image_dir / str(file_name)

    def image_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` as recorded in the annotation file."""
        info = self.image_info(index)
        return int(info["height"]), int(info["width"])

    def load_image(self, index: int) -> np.ndarray:
        return decode_image(self.image_path(index))

    def annotation(self, index: int) -> Annotation:
        boxes, labels, difficult = [], [], []
        for ann in self.coco.imgToAnns.get(self.coco_image_id(index), []):
            label = self.category_id_to_label.get(int(ann["category_id"]))
            if label is None:
                continue
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                raise QCompressError(
                    f"annotation {ann.get('id')} in {self.ann_file} has no valid bbox [x, y, w, h]",
                    "fix the annotation file",
                ) from None
            if w <= 0 or h <= 0:
                continue  # degenerate boxes exist in COCO; they can never be matched
            boxes.append((x, y, x + w, y + h))
            labels.append(label)
            difficult.append(bool(ann.get("iscrowd", 0)))
        if not boxes:
            return Annotation.empty()
        return Annotation(
            np.asarray(boxes, np.float32), np.asarray(labels, np.int64), np.asarray(difficult, bool)
        )
