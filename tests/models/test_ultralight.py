import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qcompress.core.checkpoints import load_detector, read_state_dict, save_detector
from qcompress.errors import QCompressError
from qcompress.io_utils import read_labels
from qcompress.models.registry import build_detector, get_arch
from qcompress.models.ultralight import FACE_MIN_BOXES, feature_map_sizes, generate_face_priors

# ../shared/assets beside the repository; absent on a user's machine.
ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "ultralight_face"
COCO = ASSETS / "coco_person_val2017"
needs_assets = pytest.mark.skipif(
    not WEIGHTS.is_dir() or not COCO.is_dir(), reason="../shared/assets is absent"
)

FACE = ("BACKGROUND", "face")
ARCHS = ("ultralight-rfb", "ultralight-slim")
# file, arch, input size, state_dict entries (BN buffers and num_batches_tracked included), their numel
CHECKPOINTS = [
    ("version-RFB-320.pth", "ultralight-rfb", 320, 244, 281_135),
    ("version-RFB-640.pth", "ultralight-rfb", 640, 244, 281_135),
    ("version-slim-320.pth", "ultralight-slim", 320, 184, 264_757),
    ("version-slim-640.pth", "ultralight-slim", 640, 184, 264_757),
]


def _reference_priors(width: int, height: int, fm_w: list[int], fm_h: list[int]) -> torch.Tensor:
    """The project's loop, written out from its description: shrinkage = size / feature map."""
    priors = []
    for index, sizes in enumerate(FACE_MIN_BOXES):
        scale_w = width / (width / fm_w[index])
        scale_h = height / (height / fm_h[index])
        for j in range(fm_h[index]):
            for i in range(fm_w[index]):
                for size in sizes:
                    priors.append([(i + 0.5) / scale_w, (j + 0.5) / scale_h, size / width, size / height])
    return torch.tensor(priors).clamp(0.0, 1.0)


# The project's hard-coded table (fd_config.define_img_size): width -> ([fm widths], [fm heights]).
PROJECT_FEATURE_MAPS = {
    128: ([16, 8, 4, 2], [12, 6, 3, 2]),
    160: ([20, 10, 5, 3], [15, 8, 4, 2]),
    320: ([40, 20, 10, 5], [30, 15, 8, 4]),
    480: ([60, 30, 15, 8], [45, 23, 12, 6]),
    640: ([80, 40, 20, 10], [60, 30, 15, 8]),
    1280: ([160, 80, 40, 20], [120, 60, 30, 15]),
}


@pytest.mark.parametrize("width", sorted(PROJECT_FEATURE_MAPS))
def test_feature_maps_match_the_project_table(width):
    fm_w, fm_h = PROJECT_FEATURE_MAPS[width]
    assert feature_map_sizes(width * 3 // 4, width) == list(zip(fm_h, fm_w))


@pytest.mark.parametrize(("width", "count"), [(320, 4420), (640, 17640)])
def test_priors_match_the_project_layout(width, count):
    height = width * 3 // 4
    fm_w, fm_h = PROJECT_FEATURE_MAPS[width]
    priors = generate_face_priors((height, width))
    assert priors.shape == (count, 4)
    torch.testing.assert_close(priors, _reference_priors(width, height, fm_w, fm_h))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("input_size", [320, 640])
def test_random_init_outputs_match_priors(arch, input_size):
    torch.manual_seed(0)
    detector = build_detector(arch, ("BACKGROUND", "face", "mask"), input_size=input_size)
    height, width = detector.spec.input_size
    assert (width, height) == (input_size, input_size * 3 // 4)
    assert detector.spec.options == {"input_size": input_size}
    assert (detector.spec.mean, detector.spec.std) == ((127.0, 127.0, 127.0), 128.0)
    num_priors = generate_face_priors((height, width)).shape[0]
    with torch.inference_mode():
        confidences, locations = detector.model.eval()(torch.randn(1, 3, height, width))
    assert confidences.shape == (1, num_priors, 3)
    assert locations.shape == (1, num_priors, 4)
    assert get_arch(arch).infer_num_classes(detector.model.state_dict()) == 3


def test_rfb_block_routes_concat_and_add_through_float_functional():
    detector = build_detector("ultralight-rfb", FACE)
    rfb = detector.model.base_net[7]
    kinds = {type(m).__name__ for m in rfb.modules()}
    assert "FloatFunctional" in kinds and "ReLU" in kinds
    names = {name for name, _ in detector.model.named_modules()}
    assert {"quant", "dequant", "base_net.7.concat", "base_net.7.shortcut_add", "base_net.7.relu"} <= names


@pytest.mark.parametrize("arch", ARCHS)
def test_fusion_preserves_the_function(arch):
    from qcompress.quant.fuse import fuse

    torch.manual_seed(0)
    model = build_detector(arch, FACE).model.eval()
    for module in model.modules():  # non-trivial BN statistics, so folding has something to fold
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 3, 240, 320)
    with torch.inference_mode():
        reference = model(x)
        fused, record = fuse(model)
        out = fused(x)
    assert any(group[0].startswith("base_net.7.") for group in record.groups)
    for a, b in zip(reference, out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("input_size", [0, 321, 320.0, "640", True])
def test_invalid_input_size_is_a_user_error(input_size):
    with pytest.raises(QCompressError):
        build_detector("ultralight-slim", FACE, input_size=input_size)


def test_sidecar_rebuilds_the_input_size(tmp_path):
    torch.manual_seed(0)
    detector = build_detector("ultralight-slim", FACE, input_size=640)
    path = save_detector(detector, tmp_path / "face.pth", command=["test"])
    assert json.loads(path.with_suffix(".json").read_text())["options"] == {"input_size": 640}
    loaded = load_detector(path)
    assert loaded.spec.input_size == (480, 640)
    x = torch.randn(1, 3, 480, 640)
    with torch.inference_mode():
        for a, b in zip(detector.model.eval()(x), loaded.model(x)):
            torch.testing.assert_close(a, b)


@pytest.mark.assets
@needs_assets
@pytest.mark.parametrize(("filename", "arch", "input_size", "tensors", "numel"), CHECKPOINTS)
def test_released_checkpoints_load_strictly(filename, arch, input_size, tensors, numel):
    labels = read_labels(WEIGHTS / "face-model-labels.txt")
    state_dict = read_state_dict(WEIGHTS / filename)
    assert len(state_dict) == tensors and sum(t.numel() for t in state_dict.values()) == numel
    assert get_arch(arch).infer_num_classes(state_dict) == len(labels) == 2
    detector = build_detector(arch, labels, input_size=input_size)
    detector.model.load_state_dict(state_dict, strict=True)
    assert len(detector.model.state_dict()) == tensors
    if input_size == 320:  # the builder's default, so the plain loader path works as is
        loaded = load_detector(WEIGHTS / filename, arch=arch, labels=WEIGHTS / "face-model-labels.txt")
        assert loaded.spec.input_size == (240, 320) and loaded.class_names == FACE


def _people_images(count: int) -> list[np.ndarray]:
    """The ``count`` images whose annotated person fills most of the frame (faces likely visible)."""
    instances = json.loads((COCO / "instances_person.json").read_text())
    images = {image["id"]: image for image in instances["images"]}

    def fill(annotation) -> float:
        image = images[annotation["image_id"]]
        return annotation["area"] / (image["width"] * image["height"])

    people = [a for a in instances["annotations"] if not a["iscrowd"]]
    chosen = sorted(people, key=lambda a: (-fill(a), a["id"]))
    files = [images[a["image_id"]]["file_name"] for a in chosen[:count]]
    return [np.array(Image.open(COCO / "images" / name).convert("RGB")) for name in files]


@pytest.fixture(scope="module")
def people_images():
    return _people_images(20)


@pytest.mark.assets
@needs_assets
@pytest.mark.parametrize(("filename", "arch", "input_size"), [c[:3] for c in CHECKPOINTS])
def test_released_checkpoints_find_faces_on_coco_people(people_images, filename, arch, input_size):
    detector = build_detector(arch, FACE, input_size=input_size)
    detector.model.load_state_dict(read_state_dict(WEIGHTS / filename), strict=True)
    with_face = 0
    for image, found in zip(people_images, detector.detect(people_images)):
        height, width = image.shape[:2]
        boxes = found.boxes
        assert torch.all(boxes[:, 0] >= 0) and torch.all(boxes[:, 1] >= 0)
        assert torch.all(boxes[:, 2] <= width) and torch.all(boxes[:, 3] <= height)
        assert torch.all(boxes[:, 2] >= boxes[:, 0]) and torch.all(boxes[:, 3] >= boxes[:, 1])
        assert torch.all(found.labels == 1)
        confident = found.scores >= 0.7
        if confident.any():
            with_face += 1
            # a face is a smallish, roughly upright box, not the whole frame
            sides = boxes[confident, 2:] - boxes[confident, :2]
            assert torch.all(sides[:, 0] < 0.9 * width) and torch.all(sides[:, 1] < 0.9 * height)
            aspect = sides[:, 1] / sides[:, 0].clamp(min=1)
            assert torch.all(aspect < 3) and torch.all(aspect > 1 / 3)
    assert with_face >= math.ceil(0.3 * len(people_images))
