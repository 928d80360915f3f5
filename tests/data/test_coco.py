import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcompress.data.coco import CocoDataset
from qcompress.errors import QCompressError

# ../shared/assets beside the repository; absent on a user's machine.
ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets" / "coco_person_val2017"


def _instances():
    return {
        "images": [
            {"id": 42, "file_name": "b.jpg", "height": 20, "width": 30},
            {"id": 7, "file_name": "a.jpg", "height": 20, "width": 30},
            {"id": 99, "file_name": "c.jpg", "height": 20, "width": 30},
        ],
        "categories": [
            {"id": 18, "name": "dog"},
            {"id": 1, "name": "person"},
            {"id": 4, "name": "motorcycle"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "bbox": [1.5, 2.0, 10.0, 5.0],
                "iscrowd": 0,
                "area": 50,
            },
            {"id": 2, "image_id": 7, "category_id": 18, "bbox": [0, 0, 4, 4], "iscrowd": 1, "area": 16},
            {"id": 3, "image_id": 42, "category_id": 4, "bbox": [3, 3, 6, 7], "iscrowd": 0, "area": 42},
            {"id": 4, "image_id": 42, "category_id": 1, "bbox": [5, 5, 0, 3], "iscrowd": 0, "area": 0},
        ],
    }


@pytest.fixture()
def coco_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (30, 20), (200, 100, 0)).save(images / name)
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(_instances()))
    return images, ann


def test_contiguous_labels_in_category_id_order(coco_files, capsys):
    ds = CocoDataset(*coco_files)
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert ds.class_names == ("BACKGROUND", "person", "motorcycle", "dog")
    assert ds.category_id_to_label == {1: 1, 4: 2, 18: 3}
    assert ds.label_to_category_id == {1: 1, 2: 4, 3: 18}
    for cat_id, label in ds.category_id_to_label.items():
        assert ds.label_to_category_id[label] == cat_id
    assert len(ds) == 3
    assert [ds.image_id(i) for i in range(3)] == ["7", "42", "99"]
    assert [ds.coco_image_id(i) for i in range(3)] == [7, 42, 99]
    assert ds.coco.getAnnIds(imgIds=[7]) == [1, 2]


def test_boxes_xywh_to_xyxy_and_crowd_is_difficult(coco_files):
    ds = CocoDataset(*coco_files)
    ann = ds.annotation(0)
    np.testing.assert_allclose(ann.boxes, [[1.5, 2.0, 11.5, 7.0], [0, 0, 4, 4]])
    assert ann.boxes.dtype == np.float32 and ann.labels.dtype == np.int64
    np.testing.assert_array_equal(ann.labels, [1, 3])
    np.testing.assert_array_equal(ann.difficult, [False, True])
    second = ds.annotation(1)  # the zero-width box is dropped
    np.testing.assert_array_equal(second.boxes, [[3, 3, 9, 10]])
    np.testing.assert_array_equal(second.labels, [2])
    empty = ds.annotation(2)
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)
    assert ds.image_size(0) == (20, 30)
    image = ds.load_image(0)
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8


def test_model_class_names_map_by_name(coco_files):
    names = ("BACKGROUND", "aeroplane", "motorbike", "person", "cat")
    ds = CocoDataset(*coco_files, class_names=names)
    assert ds.class_names == names
    assert ds.category_id_to_label == {1: 3, 4: 2}  # VOC "motorbike" is COCO "motorcycle"
    assert ds.label_to_category_id == {3: 1, 2: 4}
    assert ds.absent_categories == ("dog",)
    assert ds.classes_not_in_coco == ("aeroplane", "cat")
    ann = ds.annotation(0)  # the dog is skipped
    np.testing.assert_array_equal(ann.labels, [3])


def test_malformed_json_names_file(tmp_path, coco_files):
    images, _ = coco_files
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(QCompressError, match="not valid JSON") as excinfo:
        CocoDataset(images, bad)
    assert str(bad) in str(excinfo.value) and "\n" not in excinfo.value.message


@pytest.mark.parametrize(
    "content, match",
    [
        ([], "no 'images' list"),
        ({"images": []}, "no 'categories'"),
        ({"images": [{"file_name": "a.jpg"}], "categories": [], "annotations": []}, "missing field 'id'"),
    ],
)
def test_not_an_instances_file(tmp_path, coco_files, content, match):
    images, _ = coco_files
    path = tmp_path / "weird.json"
    path.write_text(json.dumps(content))
    with pytest.raises(QCompressError, match=match) as excinfo:
        CocoDataset(images, path)
    assert str(path) in str(excinfo.value)


def test_missing_files(tmp_path, coco_files):
    images, ann = coco_files
    with pytest.raises(QCompressError, match="COCO annotation file not found"):
        CocoDataset(images, tmp_path / "nope.json")
    with pytest.raises(QCompressError, match="COCO image folder not found"):
        CocoDataset(tmp_path / "nope", ann)
    (images / "a.jpg").unlink()
    with pytest.raises(QCompressError, match="image not found: .*a.jpg"):
        CocoDataset(images, ann).load_image(0)


@pytest.mark.assets
@pytest.mark.skipif(not ASSETS.is_dir(), reason="shared COCO person assets absent")
def test_real_coco_person_subset():
    ann_file = ASSETS / "instances_person.json"
    ds = CocoDataset(ASSETS / "images", ann_file, class_names=("BACKGROUND", "person"))
    assert len(ds) == 250
    assert ds.category_id_to_label == {1: 1} and ds.absent_categories == ()
    raw = json.loads(ann_file.read_text())
    by_image = {a["image_id"]: a for a in raw["annotations"]}
    for i in (0, 100, 249):
        ann = ds.annotation(i)
        x, y, w, h = by_image[ds.coco_image_id(i)]["bbox"]
        np.testing.assert_allclose(ann.boxes, [[x, y, x + w, y + h]], rtol=1e-6)
        np.testing.assert_array_equal(ann.labels, [1])
    image = ds.load_image(0)
    assert image.shape[:2] == ds.image_size(0) and image.dtype == np.uint8
    plain = CocoDataset(ASSETS / "images", ann_file)
    assert plain.class_names == ("BACKGROUND", "person")
