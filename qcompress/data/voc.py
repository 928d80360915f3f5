"""Pascal VOC reader (VOCdevkit layout).

A *year folder* (``VOCdevkit/VOC2007``) holds ``JPEGImages/``, ``Annotations/<id>.xml`` and
``ImageSets/Main/<split>.txt``. A *devkit folder* (``VOCdevkit``) holds year folders; passing it
means every year folder inside that has the split file (VOC07+12 combined). Several roots combine.

Boxes follow the :mod:`qcompress.data.dataset` contract: VOC's 1-based inclusive corners become
``(xmin - 1, ymin - 1, xmax, ymax)``, as in pytorch-ssd.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompress.data.dataset import Annotation
from qcompress.data.images import decode_image, read_image_size
from qcompress.errors import QCompressError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "trainval", "test")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG", ".png", ".PNG")


@dataclass(frozen=True)
class _VOCRecord:
    """One parsed XML file: every object, difficult ones included."""

    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    size: tuple[int, int] | None  # (h, w) from <size>, when present and positive


def _is_year_folder(path: Path) -> bool:
    return (path / "ImageSets" / "Main").is_dir() or (path / "Annotations").is_dir()


def _resolve_year_folders(root: Path, split: str) -> list[Path]:
    if not root.is_dir():
        raise QCompressError(
            f"VOC folder not found: {root}", "pass a VOCdevkit or VOCdevkit/VOC2007-style folder"
        )
    if _is_year_folder(root):
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise QCompressError(
                f"VOC split file not found: {split_file}", f"choose a split that exists ({', '.join(SPLITS)})"
            )
        return [root]
    children = sorted(child for child in root.iterdir() if child.is_dir() and _is_year_folder(child))
    if not children:
        images = any(f.suffix.lower() in (".jpg", ".jpeg", ".png") for f in root.iterdir() if f.is_file())
        near_json = any(root.glob("*.json")) or any(root.parent.glob("*.json"))
        if images or near_json:
            raise QCompressError(
                f"not a VOC folder (no ImageSets/Main, no VOC20* year folders): {root} holds images"
                + (" and a COCO-style json" if near_json else ""),
                "for COCO data add --dataset coco (the annotation json beside the folder is found, or pass --ann)",
            )
        raise QCompressError(
            f"not a VOC folder (no ImageSets/Main, no VOC20* year folders): {root}",
            "pass a VOCdevkit or VOCdevkit/VOC2007-style folder, or --dataset coco for COCO images",
        )
    with_split = [child for child in children if (child / "ImageSets" / "Main" / f"{split}.txt").is_file()]
    if not with_split:
        names = ", ".join(child.name for child in children)
        raise QCompressError(
            f"no year folder in {root} has ImageSets/Main/{split}.txt (looked in {names})",
            f"choose a split that exists ({', '.join(SPLITS)})",
        )
    skipped = sorted(set(children) - set(with_split))
    if skipped:
        log.info(
            "VOC split %r absent from %s; using %s",
            split,
            [p.name for p in skipped],
            [p.name for p in with_split],
        )
    return with_split


def _read_split(split_file: Path) -> list[str]:
    try:
        lines = split_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QCompressError(
            f"cannot read VOC split file {split_file}: {exc}", "regenerate the split file"
        ) from None
    # Per-class split files carry a second column ("000005 -1"); the id is the first token.
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise QCompressError(f"VOC split file lists no images: {split_file}", "regenerate the split file")
    return ids


class VOCDataset:
    """Pascal VOC detection data; implements :class:`qcompress.data.dataset.DetectionDataset`.

    ``class_names`` come from a labels file, ``BACKGROUND`` first. XML files are parsed on first
    use and cached. ``keep_difficult=False`` drops objects marked ``<difficult>1</difficult>``
    (VOC AP ignores them anyway, so evaluation should keep them).
    """

    def __init__(
        self,
        roots: Path | str | Sequence[Path | str],
        split: str,
        class_names: Sequence[str],
        keep_difficult: bool = True,
    ) -> None:
        if isinstance(roots, (str, Path)):
            roots = [roots]
        if not roots:
            raise QCompressError("no VOC folder given", "pass at least one VOCdevkit or VOC2007-style folder")
        if not split or "/" in split or "\\" in split:
            raise QCompressError(f"invalid VOC split name {split!r}", f"use one of: {', '.join(SPLITS)}")
        self.class_names = tuple(class_names)
        if len(self.class_names) < 2:
            raise QCompressError(
                f"need BACKGROUND plus at least one class, got {list(self.class_names)}",
                "pass a labels file with one class name per line",
            )
        self.split = split
        self.keep_difficult = keep_difficult
        self._class_to_label = {name: label for label, name in enumerate(self.class_names) if label > 0}

        year_folders: list[Path] = []
        for root in roots:
            for folder in _resolve_year_folders(Path(root).expanduser(), split):
                resolved = folder.resolve()
                if resolved not in {f.resolve() for f in year_folders}:
                    year_folders.append(folder)
        self.year_folders: tuple[Path, ...] = tuple(year_folders)

        self._entries: list[tuple[Path, str]] = []
        for folder in self.year_folders:
            for sub in ("Annotations", "JPEGImages"):
                if not (folder / sub).is_dir():
                    raise QCompressError(
                        f"VOC folder has no {sub}/: {folder}", "check the dataset is fully extracted"
                    )
            self._entries.extend(
                (folder, image_id) for image_id in _read_split(folder / "ImageSets" / "Main" / f"{split}.txt")
            )
        self._records: dict[int, _VOCRecord] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        folders = ", ".join(str(f) for f in self.year_folders)
        return f"VOCDataset(split={self.split!r}, images={len(self)}, folders=[{folders}])"

    def _check_index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return index % len(self)

    def image_id(self, index: int) -> str:
        folder, stem = self._entries[self._check_index(index)]
        return f"{folder.name}/{stem}"

    def annotation_path(self, index: int) -> Path:
        folder, stem = self._entries[self._check_index(index)]
        return folder / "Annotations" / f"{stem}.xml"

    def image_path(self, index: int) -> Path:
        folder, stem = self._entries[self._check_index(index)]
        image_dir = folder / "JPEGImages"
        for suffix in _IMAGE_SUFFIXES:
            candidate = image_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
        return image_dir / f"{stem}.jpg"

    def load_image(self, index: int) -> np.ndarray:
        return decode_image(self.image_path(index))

    def image_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` from the XML ``<size>``, else from the image file header."""
        size = self._record(index).size
        return size if size is not None else read_image_size(self.image_path(index))

    def annotation(self, index: int) -> Annotation:
        record = self._record(index)
        keep = slice(None) if self.keep_difficult else ~record.difficult
        return Annotation(
            record.boxes[keep].copy(), record.labels[keep].copy(), record.difficult[keep].copy()
        )

    def load_all_annotations(self) -> list[Annotation]:
        """Every annotation, in index order (parses and validates all XML files)."""
        return [self.annotation(i) for i in range(len(self))]

    def _record(self, index: int) -> _VOCRecord:
        index = self._check_index(index)
        record = self._records.get(index)
        if record is None:
            record = self._parse(self.annotation_path(index))
            self._records[index] = record
        return record

    def _parse(self, path: Path) -> _VOCRecord:
        if not path.is_file():
            raise QCompressError(f"VOC annotation not found: {path}", "check the dataset is fully extracted")
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as exc:
            raise QCompressError(f"malformed VOC XML {path}: {exc}", "fix or re-download the file") from None
        boxes: list[tuple[float, float, float, float]] = []
        labels: list[int] = []
        difficult: list[bool] = []
        try:
            for obj in root.iter("object"):
                name = (obj.findtext("name") or "").strip()
                label = self._class_to_label.get(name)
                if label is None:
                    raise QCompressError(
                        f"object class {name!r} in {path} is not in the labels file",
                        "pass the right --labels for this dataset",
                    )
                bndbox = obj.find("bndbox")
                if bndbox is None:
                    raise ValueError("object without <bndbox>")
                xmin, ymin, xmax, ymax = (
                    float(bndbox.findtext(tag) or "nan") for tag in ("xmin", "ymin", "xmax", "ymax")
                )
                if not (np.isfinite([xmin, ymin, xmax, ymax]).all() and xmax >= xmin and ymax >= ymin):
                    raise ValueError(f"bad <bndbox> {xmin}, {ymin}, {xmax}, {ymax} for {name!r}")
                boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
                labels.append(label)
                difficult.append(int(float(obj.findtext("difficult") or 0)) != 0)
            size = None
            size_node = root.find("size")
            if size_node is not None:
                width = int(float(size_node.findtext("width") or 0))
                height = int(float(size_node.findtext("height") or 0))
                if width > 0 and height > 0:
                    size = (height, width)
        except ValueError as exc:
            raise QCompressError(f"malformed VOC XML {path}: {exc}", "fix or re-download the file") from None
        return _VOCRecord(
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            labels=np.asarray(labels, np.int64),
            difficult=np.asarray(difficult, bool),
            size=size,
        )
