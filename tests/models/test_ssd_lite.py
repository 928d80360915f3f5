"""mb2-ssd-lite: the state_dict layout must equal pytorch-ssd's, and priors/decoding its conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcompress.models import build_detector
from qcompress.models.box_coder import decode, encode, generate_priors
from qcompress.models.ssd_lite import SSD300_PRIOR_SPECS


def reference_keys(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape, written out from pytorch-ssd's mobilenet_v2.py / mobilenet_v2_ssd_lite.py rules
    (conv_bn, InvertedResidual with expand_ratio==1 special case, conv_1x1_bn, SeperableConv2d)."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix, c):
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                     f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    def inverted(prefix, inp, oup, t):
        hidden = round(inp * t)
        i = 0
        if t != 1:
            keys[f"{prefix}.conv.0.weight"] = (hidden, inp, 1, 1)
            bn(f"{prefix}.conv.1", hidden)
            i = 3
        keys[f"{prefix}.conv.{i}.weight"] = (hidden, 1, 3, 3)
        bn(f"{prefix}.conv.{i + 1}", hidden)
        keys[f"{prefix}.conv.{i + 3}.weight"] = (oup, hidden, 1, 1)
        bn(f"{prefix}.conv.{i + 4}", oup)

    keys["base_net.0.0.weight"] = (32, 3, 3, 3)
    bn("base_net.0.1", 32)
    index, inp = 1, 32
    for t, c, n, _ in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]:
        for _ in range(n):
            inverted(f"base_net.{index}", inp, c, t)
            index, inp = index + 1, c
    keys["base_net.18.0.weight"] = (1280, 320, 1, 1)
    bn("base_net.18.1", 1280)
    for i, (a, b, t) in enumerate([(1280, 512, 0.2), (512, 256, 0.25), (256, 256, 0.5), (256, 64, 0.25)]):
        inverted(f"extras.{i}", a, b, t)
    for head, per_box in (("classification_headers", num_classes), ("regression_headers", 4)):
        for i, c in enumerate([576, 1280, 512, 256, 256]):
            keys[f"{head}.{i}.0.weight"] = (c, 1, 3, 3)
            keys[f"{head}.{i}.0.bias"] = (c,)
            bn(f"{head}.{i}.1", c)
            keys[f"{head}.{i}.3.weight"] = (6 * per_box, c, 1, 1)
            keys[f"{head}.{i}.3.bias"] = (6 * per_box,)
        keys[f"{head}.5.weight"] = (6 * per_box, 64, 1, 1)
        keys[f"{head}.5.bias"] = (6 * per_box,)
    return keys


@pytest.mark.parametrize("num_classes", [21, 3])
def test_state_dict_layout_matches_pytorch_ssd(num_classes):
    detector = build_detector("mb2-ssd-lite", ["BACKGROUND"] + [f"c{i}" for i in range(num_classes - 1)])
    ours = {k: tuple(v.shape) for k, v in detector.model.state_dict().items()}
    assert ours == reference_keys(num_classes)


def test_a_pytorch_ssd_layout_state_dict_loads_strictly():
    shapes = reference_keys(21)
    state = {k: torch.randn(s) if s else torch.tensor(0) for k, s in shapes.items()}
    for k, value in state.items():
        if k.endswith("running_var"):
            state[k] = value.abs() + 0.1
    detector = build_detector("mb2-ssd-lite", ["BACKGROUND"] + [f"c{i}" for i in range(20)])
    detector.model.load_state_dict(state, strict=True)


def test_priors_follow_pytorch_ssd_config():
    priors = generate_priors(SSD300_PRIOR_SPECS, 300)
    assert priors.shape == (3000, 4)
    # first cell of the 19x19 map: small square 60/300, big square sqrt(60*105)/300, then ratio 2 boxes
    cx = 0.5 / (300 / 16)
    assert priors[0].tolist() == pytest.approx([cx, cx, 0.2, 0.2])
    big = math.sqrt(60 * 105) / 300
    assert priors[1].tolist() == pytest.approx([cx, cx, big, big])
    assert priors[2].tolist() == pytest.approx([cx, cx, 0.2 * math.sqrt(2), 0.2 / math.sqrt(2)])
    assert float(priors.min()) >= 0 and float(priors.max()) <= 1


def test_head_outputs_match_prior_count():
    detector = build_detector("mb2-ssd-lite", ["BACKGROUND", "a", "b"]).model.eval()
    with torch.no_grad():
        conf, loc = detector(torch.zeros(2, 3, 300, 300))
    assert conf.shape == (2, 3000, 3) and loc.shape == (2, 3000, 4)


def test_encode_decode_round_trip():
    priors = generate_priors(SSD300_PRIOR_SPECS, 300)[:50]
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(50, 2, generator=g) * 0.3], dim=1)
    assert torch.allclose(decode(encode(boxes, priors, 0.1, 0.2), priors, 0.1, 0.2), boxes, atol=1e-5)


def test_detect_returns_pixel_boxes_inside_each_image():
    torch.manual_seed(0)
    detector = build_detector("mb2-ssd-lite", ["BACKGROUND", "a", "b"])
    images = [np.full((120, 200, 3), 90, np.uint8), np.full((300, 160, 3), 200, np.uint8)]
    for image, det in zip(images, detector.detect(images)):
        assert len(det) > 0
        h, w = image.shape[:2]
        assert float(det.boxes[:, 0::2].max()) <= w and float(det.boxes[:, 1::2].max()) <= h
        assert float(det.boxes.min()) >= 0
        assert int(det.labels.min()) >= 1
        assert torch.all(det.scores[:-1] >= det.scores[1:])
