import numpy as np
import pytest

from qcompress.data.calibration import CalibrationSubset, calibration_indices
from qcompress.data.dataset import Annotation
from qcompress.errors import QCompressError


def test_deterministic_sorted_unique():
    first = calibration_indices(1000, 50, seed=3)
    assert first == calibration_indices(1000, 50, seed=3)
    assert first == sorted(first) and len(set(first)) == 50
    assert all(0 <= i < 1000 for i in first)
    assert first != calibration_indices(1000, 50, seed=4)


def test_smaller_subset_is_contained_in_larger():
    assert set(calibration_indices(500, 20, 0)) <= set(calibration_indices(500, 100, 0))


def test_count_at_least_num_items_gives_all():
    assert calibration_indices(7, 7, 0) == list(range(7))
    assert calibration_indices(7, 100, 1) == list(range(7))


@pytest.mark.parametrize("count", [0, -3, 2.5, True])
def test_bad_count(count):
    with pytest.raises(QCompressError, match="positive integer") as excinfo:
        calibration_indices(10, count, 0)
    assert excinfo.value.hint


def test_empty_dataset():
    with pytest.raises(QCompressError, match="no images"):
        calibration_indices(0, 5, 0)


class _Fake:
    class_names = ("BACKGROUND", "thing")

    def __len__(self):
        return 30

    def image_id(self, index):
        return f"img{index}"

    def load_image(self, index):
        return np.full((2, 2, 3), index, np.uint8)

    def annotation(self, index):
        return Annotation(np.array([[0, 0, index + 1, 1]], np.float32), np.array([1]), np.array([False]))


def test_subset_delegates():
    subset = CalibrationSubset(_Fake(), 5, seed=11)
    assert len(subset) == 5
    assert subset.class_names == _Fake.class_names
    assert list(subset.indices) == calibration_indices(30, 5, 11)
    source = subset.source_index(2)
    assert subset.image_id(2) == f"img{source}"
    assert subset.load_image(2)[0, 0, 0] == source
    assert subset.annotation(2).boxes[0, 2] == source + 1
    assert subset.image_ids() == [f"img{i}" for i in subset.indices]
