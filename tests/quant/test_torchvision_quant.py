"""torchvision detectors through eager int8: backbone/FPN/extras and per-level head convs in int8,
the rest float and named; outputs track fp32; the int8 checkpoint reloads from weights + sidecar."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import randomize_bn
from qcompress.checkpoints import load_detector, save_detector
from qcompress.models.registry import build_detector
from qcompress.quant.parts import INT8_PARTS, Int8Part
from qcompress.quant.pipeline import QuantizeOptions, quantize_detector
from qcompress.quant.ptq import is_int8
from qcompress.quant.sqnr import sqnr_db

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("BACKGROUND", "cat", "dog")
SIZES = {
    "ssdlite320_mobilenet_v3_large": 128,
    "ssd300_vgg16": 300,
    "fasterrcnn_mobilenet_v3_large_320_fpn": 128,
    "retinanet_resnet50_fpn": 128,
    "fcos_resnet50_fpn": 128,
}


def _detector(arch: str):
    torch.manual_seed(0)
    detector = build_detector(arch, CLASSES, input_size=SIZES[arch])
    randomize_bn(detector.model)
    return detector


def _images(size: int, n: int, seed: int) -> torch.Tensor:
    # Smooth random images in [0, 1] (what preprocess() gives torchvision models).
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _backbone_features(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        batch = model.transform(list(images))[0].tensors
        out = model.backbone(batch)
    return list(out.values()) if isinstance(out, dict) else list(out)


@pytest.mark.parametrize("arch", list(SIZES))
def test_int8_parts_are_int8_and_track_fp32(arch, tmp_path):
    detector = _detector(arch)
    size = SIZES[arch]
    calib = [_images(size, 2, seed) for seed in range(3)]
    qdet, record = quantize_detector(detector, calib, QuantizeOptions(observer="minmax"))
    parts = record.recipe["int8_parts"]
    assert parts and parts[0] == "backbone" and len(parts) >= len(INT8_PARTS[arch])
    # Every conv/linear inside an int8 part is a quantized module with int8 weights; none outside.
    for name in parts:
        part = qdet.model.get_submodule(name)
        assert isinstance(part, Int8Part)
        assert not [n for n, m in part.named_modules() if type(m) in (nn.Conv2d, nn.Linear)], name
        assert sum(is_int8(m) for m in part.modules()) >= 1
    float_convs = [n for n, m in qdet.model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert all(any(n.startswith(f) for f in record.recipe["float_parts"]) for n in float_convs)
    # The int8 backbone tracks the float one (SQNR over all feature maps).
    probe = _images(size, 2, 99)
    ref, test = _backbone_features(detector.model, probe), _backbone_features(qdet.model, probe)
    assert [r.shape for r in ref] == [t.shape for t in test]
    sqnr = sqnr_db(torch.cat([r.flatten() for r in ref]), torch.cat([t.flatten() for t in test]))
    assert sqnr > 15, sqnr
    # Detections come out in the common contract, and the checkpoint reloads to the same function.
    with torch.inference_mode():
        raw = qdet.model(probe)
    assert len(raw) == 2 and raw[0]["boxes"].shape[1] == 4
    path = tmp_path / "int8.pth"
    save_detector(qdet, path, quantization=record.recipe)
    loaded = load_detector(path)
    with torch.inference_mode():
        again = loaded.model(probe)
    for a, b in zip(raw, again):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


@pytest.mark.parametrize(
    "arch,data_free,min_sqnr",
    [("ssdlite320_mobilenet_v3_large", True, 8), ("ssd300_vgg16", True, 12), ("retinanet_resnet50_fpn", False, 15)],
)
def test_equalize_and_bias_correction_where_the_structure_allows(arch, data_free, min_sqnr):
    """Per-tensor int8 after CLE (+ analytic bias correction, data-free ranges where noted)."""
    detector = _detector(arch)
    size = SIZES[arch]
    options = QuantizeOptions(observer="minmax", per_channel=False, equalize=True, data_free=data_free,
                              bias_correction="analytic", data_free_batches=2)
    calib = [] if data_free else [_images(size, 2, seed) for seed in range(3)]
    qdet, record = quantize_detector(detector, calib, options)
    steps = {s["step"]: s for s in record.steps}
    assert steps["equalize"]["pairs"] > 0
    assert steps["equalize"]["mean_range_spread_after"] < steps["equalize"]["mean_range_spread_before"]
    # Analytic bias correction needs BN statistics; torchvision's SSD300 VGG has no BN.
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in detector.model.modules())
    assert (steps["bias_correction_analytic"]["layers"] > 0) == has_bn
    probe = _images(size, 2, 5)
    ref = _backbone_features(record.float_fused, probe)
    test = _backbone_features(qdet.model, probe)
    sqnr = sqnr_db(torch.cat([r.flatten() for r in ref]), torch.cat([t.flatten() for t in test]))
    assert math.isfinite(sqnr) and sqnr > min_sqnr, sqnr
