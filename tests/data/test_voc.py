from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcompress.data.voc import VOCDataset
from qcompress.errors import QCompressError

CLASSES = ("BACKGROUND", "cat", "dog", "person")


def _xml(objects, size=(40, 60), filename="x.jpg"):
    h, w = size
    parts = [f"<annotation><filename>{filename}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>")
    for name, box, difficult in objects:
        xmin, ymin, xmax, ymax = box
        parts.append(
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
            f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
            "</bndbox></object>"
        )
    return "".join(parts) + "</annotation>"


def _write_year(root: Path, name: str, images: dict, splits: dict) -> Path:
    year = root / name
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year / sub).mkdir(parents=True, exist_ok=True)
    for stem, objects in images.items():
        Image.new("RGB", (60, 40), (10, 20, 30)).save(year / "JPEGImages" / f"{stem}.jpg")
        (year / "Annotations" / f"{stem}.xml").write_text(_xml(objects))
    for split, stems in splits.items():
        (year / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return year


@pytest.fixture()
def devkit(tmp_path):
    root = tmp_path / "VOCdevkit"
    _write_year(
        root,
        "VOC2007",
        {
            "000005": [("cat", (1, 1, 10, 20), 0), ("dog", (5, 6, 30, 40), 1)],
            "000007": [("person", (11, 2, 60, 40), 0)],
        },
        {"trainval": ["000005", "000007"], "test": ["000007"]},
    )
    _write_year(
        root,
        "VOC2012",
        {"2008_000001": [("dog", (2, 3, 4, 5), 0)]},
        {"trainval": ["2008_000001"]},
    )
    return root


def test_year_folder_reads_boxes_one_based_to_zero_based(devkit):
    ds = VOCDataset(devkit / "VOC2007", "trainval", CLASSES)
    assert len(ds) == 2
    assert ds.class_names == CLASSES
    assert ds.image_id(0) == "VOC2007/000005"
    ann = ds.annotation(0)
    np.testing.assert_array_equal(ann.boxes, np.array([[0, 0, 10, 20], [4, 5, 30, 40]], np.float32))
    assert ann.boxes.dtype == np.float32
    np.testing.assert_array_equal(ann.labels, [1, 2])
    assert ann.labels.dtype == np.int64
    np.testing.assert_array_equal(ann.difficult, [False, True])
    assert ds.image_size(0) == (40, 60)
    image = ds.load_image(1)
    assert image.shape == (40, 60, 3) and image.dtype == np.uint8


def test_keep_difficult_false_drops_difficult(devkit):
    ds = VOCDataset(devkit / "VOC2007", "trainval", CLASSES, keep_difficult=False)
    ann = ds.annotation(0)
    np.testing.assert_array_equal(ann.labels, [1])
    assert not ann.difficult.any()


def test_devkit_folder_combines_07_and_12(devkit):
    ds = VOCDataset(devkit, "trainval", CLASSES)
    assert [ds.image_id(i) for i in range(len(ds))] == [
        "VOC2007/000005",
        "VOC2007/000007",
        "VOC2012/2008_000001",
    ]
    np.testing.assert_array_equal(ds.annotation(2).boxes, [[1, 2, 4, 5]])
    # listing the year folders (and one twice) gives the same images
    same = VOCDataset([devkit / "VOC2007", devkit / "VOC2012", devkit / "VOC2007"], "trainval", CLASSES)
    assert [same.image_id(i) for i in range(len(same))] == [ds.image_id(i) for i in range(len(ds))]


def test_devkit_uses_only_year_folders_with_the_split(devkit):
    ds = VOCDataset(devkit, "test", CLASSES)
    assert [ds.image_id(i) for i in range(len(ds))] == ["VOC2007/000007"]


def test_image_size_falls_back_to_image_header(devkit):
    year = devkit / "VOC2007"
    (year / "Annotations" / "000007.xml").write_text(
        "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>3</xmax><ymax>3</ymax></bndbox></object></annotation>"
    )
    ds = VOCDataset(year, "test", CLASSES)
    assert ds.image_size(0) == (40, 60)
    assert not ds.annotation(0).difficult.any()  # absent <difficult> means 0


def _message(excinfo) -> str:
    return str(excinfo.value)


def test_missing_folder(tmp_path):
    with pytest.raises(QCompressError, match="VOC folder not found") as excinfo:
        VOCDataset(tmp_path / "nope", "trainval", CLASSES)
    assert excinfo.value.hint
    assert "\n" not in _message(excinfo)


def test_missing_split_file(devkit):
    with pytest.raises(QCompressError, match=r"split file not found: .*VOC2012.*test\.txt") as excinfo:
        VOCDataset(devkit / "VOC2012", "test", CLASSES)
    assert "trainval" in excinfo.value.hint
    with pytest.raises(QCompressError, match="no year folder"):
        VOCDataset(devkit, "val", CLASSES)


def test_not_a_voc_folder(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(QCompressError, match="not a VOC folder"):
        VOCDataset(tmp_path, "trainval", CLASSES)


def test_malformed_xml_names_file(devkit):
    bad = devkit / "VOC2007" / "Annotations" / "000007.xml"
    bad.write_text("<annotation><object><name>cat</name>")
    ds = VOCDataset(devkit / "VOC2007", "trainval", CLASSES)
    ds.annotation(0)  # the other file is fine
    with pytest.raises(QCompressError, match="malformed VOC XML") as excinfo:
        ds.annotation(1)
    assert str(bad) in _message(excinfo) and "\n" not in _message(excinfo)


def test_bad_bndbox_is_malformed(devkit):
    path = devkit / "VOC2007" / "Annotations" / "000007.xml"
    path.write_text(_xml([("cat", (10, 10, "oops", 20), 0)]))
    with pytest.raises(QCompressError, match="malformed VOC XML") as excinfo:
        VOCDataset(devkit / "VOC2007", "test", CLASSES).annotation(0)
    assert str(path) in _message(excinfo)


def test_unknown_class_names_class_file_and_labels_hint(devkit):
    ds = VOCDataset(devkit / "VOC2007", "trainval", ("BACKGROUND", "cat", "person"))
    with pytest.raises(QCompressError, match="'dog'") as excinfo:
        ds.annotation(0)
    assert "000005.xml" in _message(excinfo)
    assert "--labels" in excinfo.value.hint


def test_missing_and_corrupt_image(devkit):
    year = devkit / "VOC2007"
    ds = VOCDataset(year, "trainval", CLASSES)
    (year / "JPEGImages" / "000005.jpg").unlink()
    with pytest.raises(QCompressError, match="image not found: .*000005.jpg"):
        ds.load_image(0)
    (year / "JPEGImages" / "000007.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(QCompressError, match="cannot decode image .*000007.jpg") as excinfo:
        ds.load_image(1)
    assert "\n" not in _message(excinfo)


def test_missing_annotation_file(devkit):
    (devkit / "VOC2007" / "Annotations" / "000007.xml").unlink()
    with pytest.raises(QCompressError, match="annotation not found: .*000007.xml"):
        VOCDataset(devkit / "VOC2007", "test", CLASSES).annotation(0)


def test_empty_split_and_bad_split_name(devkit):
    (devkit / "VOC2007" / "ImageSets" / "Main" / "val.txt").write_text("\n")
    with pytest.raises(QCompressError, match="lists no images"):
        VOCDataset(devkit / "VOC2007", "val", CLASSES)
    with pytest.raises(QCompressError, match="invalid VOC split"):
        VOCDataset(devkit / "VOC2007", "../x", CLASSES)


def test_load_all_annotations_follows_the_split_order_and_every_file(tmp_path):
    # Timing lives in benchmarks/data_speed.py; here: 60 distinct files, listed out of order.
    stems = [f"{i:06d}" for i in range(60)]
    order = stems[::-1][::2] + stems[::-1][1::2]  # 59, 57, ..., 1, 58, 56, ..., 0
    year = tmp_path / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (year / sub).mkdir(parents=True)
    for i, stem in enumerate(stems):
        objects = [(CLASSES[1 + i % 3], (1 + i, 2, 30 + i, 40), i % 2)] + [("dog", (3, 4, 5 + i, 9), 0)] * (i % 3)
        (year / "Annotations" / f"{stem}.xml").write_text(_xml(objects))
    (year / "ImageSets" / "Main" / "train.txt").write_text("\n".join(order) + "\n")
    ds = VOCDataset(year, "train", CLASSES)
    annotations = ds.load_all_annotations()
    assert len(annotations) == 60
    for position, stem in enumerate(order):
        i = int(stem)
        ann = annotations[position]
        assert ds.image_id(position).endswith(stem)
        assert ann.labels.tolist() == [1 + i % 3] + [2] * (i % 3)
        np.testing.assert_array_equal(ann.boxes[0], [i, 1, 30 + i, 40])  # 1-based corners -> 0-based min
        assert ann.difficult.tolist() == [bool(i % 2)] + [False] * (i % 3)
        assert ds.annotation(position).boxes.tolist() == ann.boxes.tolist()
