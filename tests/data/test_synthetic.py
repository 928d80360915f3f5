import collections
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from qcompress.data import synthetic
from qcompress.data.synthetic import (
    SYNTH_CLASSES,
    default_dataset_dir,
    ensure_default_dataset,
    generate_voc_dataset,
    render_image,
)
from qcompress.data.voc import VOCDataset
from qcompress.errors import QCompressError
from qcompress.io_utils import read_labels


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def twenty(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "seed0"
    year = generate_voc_dataset(out, num_images=20, seed=0, workers=1)
    return out, year


def test_layout_and_labels(twenty):
    out, year = twenty
    assert year == out / "SYNTH"
    assert read_labels(out / "labels.txt") == SYNTH_CLASSES
    assert SYNTH_CLASSES[0] == "BACKGROUND" and len(SYNTH_CLASSES) == 9
    assert len(list((year / "JPEGImages").glob("*.jpg"))) == 20
    assert len(list((year / "Annotations").glob("*.xml"))) == 20
    main = year / "ImageSets" / "Main"
    split = {
        name: (main / f"{name}.txt").read_text().split() for name in ("train", "val", "trainval", "test")
    }
    assert [len(split[n]) for n in ("train", "val", "test")] == [16, 2, 2]
    assert sorted(split["train"] + split["val"] + split["test"]) == [f"{i:06d}" for i in range(20)]
    assert split["trainval"] == sorted(split["train"] + split["val"])


def test_same_seed_same_bytes_for_any_worker_count(twenty, tmp_path):
    out, _ = twenty
    again = tmp_path / "again"
    generate_voc_dataset(again, num_images=20, seed=0, workers=2)
    assert _files(again) == _files(out)


def test_different_seed_differs(twenty, tmp_path):
    out, _ = twenty
    other = tmp_path / "seed1"
    generate_voc_dataset(other, num_images=20, seed=1, workers=1)
    a, b = _files(out), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".jpg"))


def test_xml_is_voc_format_and_reads_back(twenty):
    _, year = twenty
    root = ET.parse(year / "Annotations" / "000003.xml").getroot()
    assert root.findtext("folder") == "SYNTH" and root.findtext("filename") == "000003.jpg"
    assert (root.findtext("size/width"), root.findtext("size/height"), root.findtext("size/depth")) == (
        "300",
        "300",
        "3",
    )
    for obj in root.iter("object"):
        assert obj.findtext("name") in SYNTH_CLASSES[1:]
        assert obj.findtext("difficult") in ("0", "1")
        corners = [int(obj.findtext(f"bndbox/{tag}")) for tag in ("xmin", "ymin", "xmax", "ymax")]
        assert 1 <= corners[0] <= corners[2] <= 300 and 1 <= corners[1] <= corners[3] <= 300

    ds = VOCDataset(year, "trainval", SYNTH_CLASSES)
    assert len(ds) == 18
    for i in range(len(ds)):
        index = int(ds.image_id(i).split("/")[1])
        pixels, objects = render_image(0, index)
        ann = ds.annotation(i)
        expected = np.array(
            [[x0 - 1, y0 - 1, x1, y1] for x0, y0, x1, y1 in (o.box for o in objects)], np.float32
        )
        np.testing.assert_array_equal(ann.boxes, expected.reshape(-1, 4))
        np.testing.assert_array_equal(ann.labels, [SYNTH_CLASSES.index(o.name) for o in objects])
        np.testing.assert_array_equal(ann.difficult, [o.difficult for o in objects])
        assert ds.image_size(i) == (300, 300)
        image = ds.load_image(i)
        assert image.shape == (300, 300, 3)
        assert np.abs(image.astype(int) - pixels).mean() < 4  # JPEG q95 of the rendered pixels


def test_boxes_are_tight_on_isolated_objects():
    # For lone, unoccluded objects every edge of the box holds a pixel that clearly differs from the
    # background just outside the box (the object's colour is >= 120 away, edge pixels >= 30% of it).
    checked = 0
    for index in range(300):
        pixels, objects = render_image(5, index)
        if len(objects) != 1 or objects[0].visible_fraction < 0.99 or objects[0].difficult:
            continue
        x0, y0, x1, y1 = (v - 1 for v in objects[0].box)  # 0-based inclusive
        if min(x0, y0) < 1 or max(x1, y1) > 298:
            continue
        image = pixels.astype(float)
        outside = np.concatenate(
            [
                image[y0 - 1, x0 : x1 + 1],
                image[y1 + 1, x0 : x1 + 1],
                image[y0 : y1 + 1, x0 - 1],
                image[y0 : y1 + 1, x1 + 1],
            ]
        )
        background = np.median(outside, axis=0)
        for edge in (
            image[y0, x0 : x1 + 1],
            image[y1, x0 : x1 + 1],
            image[y0 : y1 + 1, x0],
            image[y0 : y1 + 1, x1],
        ):
            assert np.linalg.norm(edge - background, axis=1).max() > 20, (index, objects[0])
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_rasterised_square_has_exact_extent():
    square = np.array([[10.0, 20.0], [50.0, 20.0], [50.0, 30.0], [10.0, 30.0]])
    x0, y0, alpha = synthetic._rasterise([square], 300, outline=0)
    rows, cols = np.nonzero(alpha >= synthetic._VISIBLE_WEIGHT)
    assert (x0 + cols.min(), x0 + cols.max() + 1, y0 + rows.min(), y0 + rows.max() + 1) == (10, 50, 20, 30)
    assert alpha.sum() == pytest.approx(400, rel=0.05)  # PIL fills edges inclusively: a hair more


def test_distributions_are_plausible():
    classes = collections.Counter()
    per_image, extents, difficult, visible = [], [], [], []
    for index in range(120):
        _, objects = render_image(0, index)
        per_image.append(len(objects))
        for obj in objects:
            classes[obj.name] += 1
            x0, y0, x1, y1 = obj.box
            extents.append(max(x1 - x0 + 1, y1 - y0 + 1) / 300)
            difficult.append(obj.difficult)
            visible.append(obj.visible_fraction)
            if not obj.difficult:
                assert extents[-1] >= synthetic.TINY_FRACTION
                assert obj.visible_fraction >= 0.6
    assert set(classes) == set(SYNTH_CLASSES[1:])
    assert min(classes.values()) > 0.5 * max(classes.values())
    assert 1 <= min(per_image) and max(per_image) <= 6 and 2.5 < np.mean(per_image) < 4.5
    assert 0.02 < np.mean(difficult) < 0.3
    assert 0.035 <= min(extents) and max(extents) <= 0.72
    assert 0.15 < np.median(extents) < 0.35
    assert min(visible) >= 0.44  # nothing is more than ~55% hidden
    assert np.mean(np.array(visible) < 0.99) > 0.05  # but occlusion does happen


def test_image_size_and_split_fractions_are_honoured(tmp_path):
    # Timing lives in benchmarks/data_speed.py; here: what the arguments promise.
    from PIL import Image

    year = generate_voc_dataset(tmp_path / "small", num_images=10, seed=2, image_size=96, splits=(0.6, 0.2, 0.2),
                                workers=1)
    for path in sorted((year / "JPEGImages").glob("*.jpg")):
        with Image.open(path) as image:
            assert image.size == (96, 96), path.name
    main = year / "ImageSets" / "Main"
    split = {name: (main / f"{name}.txt").read_text().split() for name in ("train", "val", "trainval", "test")}
    assert [len(split[n]) for n in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(split["train"] + split["val"] + split["test"]) == [f"{i:06d}" for i in range(10)]
    ds = VOCDataset(year, "trainval", SYNTH_CLASSES)
    assert len(ds) == 8
    for i in range(len(ds)):
        assert ds.image_size(i) == (96, 96)
        boxes = ds.annotation(i).boxes
        assert len(boxes) and (boxes >= 0).all() and (boxes[:, 2:] <= 96).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()


def test_refuses_non_empty_folder_and_bad_arguments(twenty, tmp_path):
    out, _ = twenty
    with pytest.raises(QCompressError, match="not empty") as excinfo:
        generate_voc_dataset(out, num_images=5)
    assert excinfo.value.hint
    with pytest.raises(QCompressError, match="splits"):
        generate_voc_dataset(tmp_path / "a", num_images=5, splits=(0.5, 0.1, 0.1))
    with pytest.raises(QCompressError, match=">= 1"):
        generate_voc_dataset(tmp_path / "b", num_images=0)


def test_default_dataset_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPRESS_CACHE", str(tmp_path / "cache"))
    assert default_dataset_dir() == tmp_path / "cache" / "synth-v1"
    assert default_dataset_dir(12, 3) == tmp_path / "cache" / "synth-v1-n12-s3"
    monkeypatch.delenv("QCOMPRESS_CACHE")
    assert default_dataset_dir() == Path.home() / ".cache" / "qcompress" / "synth-v1"


def test_ensure_default_dataset_generates_once(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QCOMPRESS_CACHE", str(cache))
    year = ensure_default_dataset(num_images=6, seed=3)
    assert year == cache / "synth-v1-n6-s3" / "SYNTH"
    assert sorted(p.name for p in cache.iterdir()) == ["synth-v1-n6-s3"]  # no temp folder left
    stamp = (year / "Annotations" / "000000.xml").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "generate_voc_dataset", fail)
    assert ensure_default_dataset(num_images=6, seed=3) == year
    assert (year / "Annotations" / "000000.xml").stat().st_mtime_ns == stamp


def test_interrupted_generation_leaves_nothing(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QCOMPRESS_CACHE", str(cache))

    def interrupted(out_dir, **kwargs):
        (Path(out_dir) / "SYNTH").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_voc_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_dataset(num_images=6, seed=3)
    assert list(cache.iterdir()) == []
