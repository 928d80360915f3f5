from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models import detection
from torchvision.models.detection.ssd import SSD

from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.errors import QCompressError
from qcompress.models.detector import Detections, PostprocessConfig
from qcompress.models.registry import build_detector, get_arch, list_archs
from qcompress.models.torchvision_det import ARCHS as TORCHVISION_ARCHS
from qcompress.models.torchvision_det import torchvision_postprocess

pytestmark = pytest.mark.usefixtures("one_thread")

CLASS_NAMES = ("BACKGROUND", "cat", "dog")
# Small inputs keep the test file fast; ssd300_vgg16 only runs at 300.
TEST_SIZES = {
    "ssdlite320_mobilenet_v3_large": 128,
    "ssd300_vgg16": 300,
    "fasterrcnn_mobilenet_v3_large_320_fpn": 128,
    "retinanet_resnet50_fpn": 128,
    "fcos_resnet50_fpn": 128,
}
DEFAULT_SIZES = {
    "ssdlite320_mobilenet_v3_large": 320,
    "ssd300_vgg16": 300,
    "fasterrcnn_mobilenet_v3_large_320_fpn": 320,
    "retinanet_resnet50_fpn": 512,
    "fcos_resnet50_fpn": 512,
}
TORCHVISION_CLASSES = {
    "ssdlite320_mobilenet_v3_large": SSD,
    "ssd300_vgg16": SSD,
    "fasterrcnn_mobilenet_v3_large_320_fpn": detection.FasterRCNN,
    "retinanet_resnet50_fpn": detection.RetinaNet,
    "fcos_resnet50_fpn": detection.FCOS,
}
ARCHS = list(TEST_SIZES)
OTHER_CLASS_COUNT = 5


class _Lazy(dict):
    """Per-arch objects built on first use, dropped with the module's fixture (the models are large)."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, arch):
        self[arch] = self._make(arch)
        return self[arch]


def _build_test_detector(arch: str):
    torch.manual_seed(0)
    return build_detector(arch, CLASS_NAMES, input_size=TEST_SIZES[arch])


def _build_torchvision_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """What torchvision's own builder saves (the layout of its released files), for 5 classes."""
    torch.manual_seed(1)
    model = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=OTHER_CLASS_COUNT)
    return dict(model.state_dict())


@pytest.fixture(scope="module")
def detectors():
    return _Lazy(_build_test_detector)


@pytest.fixture(scope="module")
def torchvision_state_dicts():
    return _Lazy(_build_torchvision_state_dict)


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (97, 143, 3), dtype=np.uint8),
        rng.integers(0, 256, (180, 75, 3), dtype=np.uint8),
    ]


def _assert_same(a: list[Detections], b: list[Detections]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (
            torch.equal(x.boxes, y.boxes)
            and torch.equal(x.labels, y.labels)
            and torch.equal(x.scores, y.scores)
        )


def test_all_registered():
    names = {info.name for info in list_archs()}
    assert {a.name for a in TORCHVISION_ARCHS} == set(ARCHS) and set(ARCHS) <= names


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_torchvision_model(arch, detectors):
    detector = detectors[arch]
    size = TEST_SIZES[arch]
    assert type(detector.model) is TORCHVISION_CLASSES[arch]
    assert detector.spec.input_size == (size, size)
    assert detector.spec.options == {"input_size": size}
    assert detector.spec.mean == (0.0, 0.0, 0.0) and detector.spec.std == 255.0
    assert get_arch(arch).infer_num_classes(detector.model.state_dict()) == len(CLASS_NAMES)
    x = detector.preprocess(_images()[0])
    assert x.shape == (3, size, size) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # The model's transform must not resize the (already input-size) batch again.
    images, _ = detector.model.transform(list(torch.stack([x, x])))
    assert images.image_sizes == [(size, size)] * 2
    assert torch.equal(images.tensors[0, :, :size, :size], detector.model.transform.normalize(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_and_detect(arch, detectors, tmp_path):
    detector = detectors[arch]
    path = save_detector(detector, tmp_path / "model.pth", command=["test"])
    loaded = load_detector(path)
    assert loaded.spec == detector.spec
    config = PostprocessConfig(score_threshold=0.0, max_detections=50)
    detector.postprocess_config = loaded.postprocess_config = config

    images = _images()
    before, after = detector.detect(images), loaded.detect(images)
    _assert_same(before, after)
    for detections, image in zip(after, images):
        height, width = image.shape[:2]
        assert 0 < len(detections) <= config.max_detections
        assert detections.boxes.dtype == torch.float32 and detections.boxes.shape == (len(detections), 4)
        assert bool((detections.boxes >= 0).all())
        assert bool((detections.boxes[:, [0, 2]] <= width).all()) and bool(
            (detections.boxes[:, [1, 3]] <= height).all()
        )
        assert bool((detections.boxes[:, 2:] >= detections.boxes[:, :2]).all())
        assert bool((detections.labels >= 1).all()) and bool((detections.labels < len(CLASS_NAMES)).all())
        assert bool((detections.scores[:-1] >= detections.scores[1:]).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_layout_loads_strictly(arch, torchvision_state_dicts, tmp_path):
    state_dict = torchvision_state_dicts[arch]
    assert get_arch(arch).infer_num_classes(state_dict) == OTHER_CLASS_COUNT
    torch.save(state_dict, tmp_path / "torchvision.pth")
    loaded = load_detector(tmp_path / "torchvision.pth", arch=arch)  # no sidecar, default input size
    assert len(loaded.class_names) == OTHER_CLASS_COUNT
    assert loaded.spec.input_size == (DEFAULT_SIZES[arch],) * 2
    assert loaded.spec.options == {"input_size": DEFAULT_SIZES[arch]}
    reloaded = loaded.model.state_dict()
    assert list(reloaded) == list(state_dict)
    head_key = next(a.class_weight_key for a in TORCHVISION_ARCHS if a.name == arch)
    for key in (head_key, next(iter(state_dict)), next(reversed(state_dict))):
        assert torch.equal(reloaded[key], state_dict[key]), key
    # Released Faster R-CNN / RetinaNet / FCOS files come from FrozenBatchNorm2d: no num_batches_tracked.
    # read_state_dict hands load_state_dict a plain dict like this one.
    frozen_bn_layout = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    loaded.model.load_state_dict(frozen_bn_layout, strict=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_class_count_is_reported(arch, torchvision_state_dicts, tmp_path):
    torch.save(torchvision_state_dicts[arch], tmp_path / "model.pth")
    (tmp_path / "labels.txt").write_text("cat\ndog\n")  # 3 classes with the background
    with pytest.raises(QCompressError, match=f"{OTHER_CLASS_COUNT} classes"):
        load_detector(tmp_path / "model.pth", arch=arch, labels=tmp_path / "labels.txt")


def test_infer_num_classes_unknown_layout():
    for arch in ARCHS:
        assert get_arch(arch).infer_num_classes({"other.weight": torch.zeros(3, 3)}) is None


def test_ssd300_rejects_other_sizes():
    with pytest.raises(QCompressError, match="300"):
        build_detector("ssd300_vgg16", CLASS_NAMES, input_size=256)


def test_postprocess_rescales_filters_and_caps():
    raw = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 100.0, 100.0], [5.0, 5.0, 6.0, 6.0]]),
            "scores": torch.tensor([0.3, 0.9, 0.05]),
            "labels": torch.tensor([1, 0, 2]),  # label 0 (background column of a sigmoid head) is dropped
        }
    ]
    (result,) = torchvision_postprocess((100, 100), raw, [(200, 50)], PostprocessConfig(score_threshold=0.1))
    assert torch.equal(result.labels, torch.tensor([1]))
    assert torch.allclose(result.boxes, torch.tensor([[5.0, 40.0, 25.0, 120.0]]))
    (capped,) = torchvision_postprocess(
        (100, 100), raw, [(100, 100)], PostprocessConfig(0.0, max_detections=1)
    )
    assert torch.equal(capped.scores, torch.tensor([0.3]))
