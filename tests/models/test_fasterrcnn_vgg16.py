"""Faster R-CNN VGG16 (simple-faster-rcnn-pytorch layout): the reference state_dict loads strictly, anchors,
(dy, dx, dh, dw) decoding and the two-logit objectness by hand, a train step lowers the loss, eval-mode
detections in the Detector format, and eager int8 through the quantization pipeline (reloads, detects)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qcompress.cli.app import app
from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.errors import QCompressError
from qcompress.models import build_detector
from qcompress.models.fasterrcnn_vgg16 import (
    FasterRCNNVGG16,
    anchor_base,
    bbox2loc,
    conv_indices,
    decode_head,
    loc2bbox,
    rpn_objectness,
    rpn_outputs,
    shifted_anchors,
)
from qcompress.models.registry import compression_spec
from qcompress.quant.lowbit import select_convs

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "fasterrcnn_vgg16"
CLASSES = ("BACKGROUND", "a", "b")
TINY = {"input_size": 96, "width": 0.25, "fc": 32}


def reference_layout(n_class: int = 21, width: float = 1.0, fc: int = 4096) -> dict[str, tuple[int, ...]]:
    """simple-faster-rcnn-pytorch's ``FasterRCNNVGG16(n_fg_class=n_class - 1).state_dict()`` keys and shapes,
    written out from its structure: torchvision ``vgg16().features[:30]`` (13 convs at Sequential indices
    0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), ``RegionProposalNetwork(512, 512)`` with 9 anchors,
    ``VGG16RoIHead`` with the classifier minus dropout and the last fc (Linear 0 and 2)."""
    plan = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
            (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]

    def c(channels: int) -> int:
        return channels if channels == 3 else max(4, round(channels * width))

    keys: dict[str, tuple[int, ...]] = {}
    for index, cin, cout in plan:
        keys[f"extractor.{index}.weight"] = (c(cout), c(cin), 3, 3)
        keys[f"extractor.{index}.bias"] = (c(cout),)
    mid = c(512)
    for name, out, k in (("conv1", mid, 3), ("score", 9 * 2, 1), ("loc", 9 * 4, 1)):
        keys[f"rpn.{name}.weight"] = (out, mid, k, k)
        keys[f"rpn.{name}.bias"] = (out,)
    for name, out, cin in (("classifier.0", fc, mid * 7 * 7), ("classifier.2", fc, fc), ("cls_loc", n_class * 4, fc),
                           ("score", n_class, fc)):
        keys[f"head.{name}.weight"] = (out, cin)
        keys[f"head.{name}.bias"] = (out,)
    return keys


def test_full_width_layout_is_the_reference():
    with torch.device("meta"):  # 138 M parameters: shapes only, no memory
        model = FasterRCNNVGG16(21)
    layout = reference_layout()
    assert len(layout) == 26 + 6 + 8
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    assert layout["head.classifier.0.weight"] == (4096, 25088)
    assert conv_indices()["conv1_1"] == 0 and conv_indices()["conv5_3"] == 28


def test_reference_state_dict_loads_strictly(tmp_path):
    layout = reference_layout(n_class=21, width=0.25, fc=256)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.rand(shape, generator=generator) * 0.01 for k, shape in layout.items()}
    path = tmp_path / "fasterrcnn_vgg16.pth"
    torch.save({"model": state, "config": {"min_size": 600}}, path)  # the reference trainer's save format
    detector = load_detector(path, arch=ARCH, options={"width": 0.25, "fc": 256, "input_size": 96})
    assert len(detector.class_names) == 21  # from head.score.weight
    loaded = detector.model.state_dict()
    assert {k: tuple(v.shape) for k, v in loaded.items()} == layout
    assert all(torch.equal(loaded[k], state[k]) for k in layout)


def test_models_command_lists_it():
    result = CliRunner().invoke(app, ["models"], catch_exceptions=False)
    assert result.exit_code == 0 and ARCH in result.output


def test_anchors_by_hand():
    base = anchor_base()
    assert base.shape == (9, 4)
    # ratio 0.5 (h/w), scale 8: h = 16 * 8 * sqrt(0.5), w = 16 * 8 / sqrt(0.5), centred on (8, 8)
    h, w = 128 * math.sqrt(0.5), 128 / math.sqrt(0.5)
    assert base[0].tolist() == pytest.approx([8 - w / 2, 8 - h / 2, 8 + w / 2, 8 + h / 2])
    assert base[4].tolist() == pytest.approx([8 - 128, 8 - 128, 8 + 128, 8 + 128])  # ratio 1, scale 16
    anchors = shifted_anchors(base, 16, 2, 3)  # cell-major, row by row, 9 anchors per cell
    assert anchors.shape == (2 * 3 * 9, 4)
    assert (anchors[(1 * 3 + 2) * 9 + 4] - base[4]).tolist() == [32.0, 16.0, 32.0, 16.0]  # cell y=1, x=2


def test_dy_dx_dh_dw_decoding_by_hand():
    roi = torch.tensor([[10.0, 20.0, 50.0, 100.0]])  # xyxy: w 40, h 80, centre (30, 60)
    loc = torch.tensor([[0.1, 0.2, math.log(2.0), 0.0]])  # dy, dx, dh, dw
    box = loc2bbox(roi, loc)
    # centre y 60 + 0.1 * 80 = 68, x 30 + 0.2 * 40 = 38; h 160, w 40
    assert box[0].tolist() == pytest.approx([18.0, -12.0, 58.0, 148.0])
    assert bbox2loc(roi, box)[0].tolist() == pytest.approx(loc[0].tolist(), abs=1e-6)
    # the head's deltas are normalised by (0.1, 0.1, 0.2, 0.2), one (dy, dx, dh, dw) per class
    cls_loc = torch.zeros(1, 2 * 4)
    cls_loc[0, 4:] = torch.tensor([1.0, 2.0, math.log(2.0) / 0.2, 0.0])
    boxes = decode_head(cls_loc, roi, (200, 200))
    assert boxes[0, 0].tolist() == pytest.approx(roi[0].tolist())
    assert boxes[0, 1].tolist() == pytest.approx([18.0, 0.0, 58.0, 148.0])  # clipped at y = 0


def test_two_logit_objectness():
    anchors, height, width = 9, 2, 3
    scores = torch.zeros(1, anchors * 2, height, width)
    scores[0, 4 * 2 + 1, 1, 2] = math.log(3.0)  # anchor 4, class 1 (object), cell y=1, x=2
    loc = torch.zeros(1, anchors * 4, height, width)
    loc[0, 4 * 4 + 2, 1, 2] = 0.5  # anchor 4's dh at the same cell
    flat_loc, flat_scores = rpn_outputs(loc, scores)
    fg = rpn_objectness(flat_scores)
    index = (1 * width + 2) * anchors + 4
    assert fg[0, index].item() == pytest.approx(0.75)
    assert fg[0].sum().item() == pytest.approx(0.5 * (anchors * height * width - 1) + 0.75)
    assert flat_loc[0, index].tolist() == [0.0, 0.0, 0.5, 0.0]


def _image_and_target():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 96, 96, generator=generator)
    image[:, 20:70, 10:60] += 2.0  # an object the loss can find
    return [image], [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]


def test_a_few_train_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_detector(ARCH, CLASSES, **TINY).model.train()
    images, targets = _image_and_target()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same anchor / RoI samples each time
        losses = model(images, targets)
        assert set(losses) == {"rpn_box_reg", "rpn_objectness", "roi_box_reg", "roi_classifier"}
        assert all(torch.isfinite(v) for v in losses.values())
        return sum(losses.values())

    before = loss()
    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before


def test_eval_detects_in_the_detector_format():
    torch.manual_seed(0)
    detector = build_detector(ARCH, CLASSES, **TINY)
    with torch.no_grad():
        cls_loc, logits, rois, indices = detector.model(torch.randn(2, 3, 96, 96))
    assert cls_loc.shape == (600, 12) and logits.shape == (600, 3) and rois.shape == (600, 4)
    assert indices.tolist() == [0.0] * 300 + [1.0] * 300  # 300 proposals per image, padded
    images = [np.random.default_rng(i).integers(0, 255, (80, 120, 3), dtype=np.uint8) for i in range(2)]
    for dets in detector.detect(images):
        assert dets.boxes.shape[1] == 4 and len(dets) > 0
        assert dets.labels.min() >= 1 and dets.labels.max() <= 2 and dets.labels.dtype == torch.int64
        assert (dets.scores > 0).all() and (dets.scores <= 1).all()
        assert (dets.boxes[:, 0::2] <= 120).all() and (dets.boxes[:, 1::2] <= 80).all() and (dets.boxes >= 0).all()


def test_declared_scopes():
    detector = build_detector(ARCH, CLASSES, **TINY)
    spec = compression_spec(ARCH)
    backbone, kept = select_convs(detector.model, "backbone", spec=spec)
    assert len(backbone) == 12 and kept == ["extractor.0"]
    assert select_convs(detector.model, "conv3", spec=spec) == (["extractor.10", "extractor.12", "extractor.14"], [])
    _, kept_all = select_convs(detector.model, "all", spec=spec)
    assert kept_all == ["extractor.0", "rpn.score", "rpn.loc"]


def test_int8_quantize_reloads_and_detects(tmp_path):
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector
    from qcompress.quant.ptq import is_int8

    torch.manual_seed(0)
    detector = build_detector(ARCH, CLASSES, **TINY)
    batches = [torch.randn(2, 3, 96, 96)]
    qdet, record = quantize_detector(detector, batches, QuantizeOptions(observer="minmax"))
    assert sum(is_int8(m) for m in qdet.model.modules()) == 13 + 3 + 2  # VGG convs, RPN convs, fc6/fc7
    assert not is_int8(qdet.model.head.cls_loc) and not is_int8(qdet.model.head.score)
    sample = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        outputs = qdet.model(sample)
    assert [tuple(o.shape) for o in outputs] == [(300, 12), (300, 3), (300, 4), (300,)]
    path = save_detector(qdet, tmp_path / "int8.pth", quantization=record.recipe)
    again = load_detector(path)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outputs, again.model(sample)))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert len(again.detect([image])) == 1


def test_anchor_scales_option_sets_the_anchor_sizes_and_survives_a_reload(tmp_path):
    det = build_detector(ARCH, CLASSES, input_size=300, width=0.25, fc=32, anchor_scales=[4, 8, 16])
    base = det.model.anchor_base  # base 16 * 300 / 600 = 8 pixels: ratio-1 anchors 32, 64 and 128 wide
    assert (base[3:6, 2] - base[3:6, 0]).tolist() == pytest.approx([32.0, 64.0, 128.0])
    assert (base[0, 3] - base[0, 1]).item() == pytest.approx(32 * math.sqrt(0.5))  # ratio 0.5 (h/w), scale 4
    save_detector(det, tmp_path / "a.pth")
    assert torch.equal(load_detector(tmp_path / "a.pth").model.anchor_base, base)
    assert "anchor_scales" not in build_detector(ARCH, CLASSES, **TINY).spec.options  # reference sidecars unchanged


def test_bad_options_are_one_line_errors():
    with pytest.raises(QCompressError, match="anchor_scales"):
        build_detector(ARCH, CLASSES, anchor_scales=[8, 16])
    with pytest.raises(QCompressError, match="too small"):
        build_detector(ARCH, CLASSES, input_size=32)
    with pytest.raises(QCompressError, match="width"):
        build_detector(ARCH, CLASSES, width=0)
    with pytest.raises(QCompressError, match="background"):
        build_detector(ARCH, ("BACKGROUND",))


def test_quantize_command_on_a_tiny_checkpoint(tiny_voc, tmp_path):
    from qcompress.data.synthetic import SYNTH_CLASSES

    torch.manual_seed(0)
    path = save_detector(build_detector(ARCH, ("BACKGROUND", *SYNTH_CLASSES), **TINY), tmp_path / "tiny.pth",
                         command=["test"])
    args = ["quantize", "-m", path, "--data", tiny_voc, "--limit", 2, "--calib-images", 2, "--calib-split", "train",
            "--observer", "minmax", "--runs", 2, "--no-onnx-latency", "--out", tmp_path / "q.pth",
            "--out-dir", tmp_path, "--report-name", "quantize-report"]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "quantize-report.json").read_text())
    parts = {p["part"]: p["precision"] for p in report["parts"]}
    assert parts["extractor"] == parts["rpn"] == parts["head.classifier"] == "int8"
    assert load_detector(tmp_path / "q.pth").spec.options == TINY


def test_train_from_scratch_with_arch_options_records_them_and_is_seeded(tiny_voc, tmp_path):
    """``train --arch A --arch-options JSON`` builds A with those options (in the sidecar, so every later
    command rebuilds the same network) from a random initialisation that --seed fixes."""
    options = {**TINY, "anchor_scales": [4, 8, 16]}
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run / "frcnn.pth"
        args = ["train", "--arch", ARCH, "--arch-options", json.dumps(options), "--data", tiny_voc, "--epochs", 1,
                "--batch-size", 2, "--limit", 2, "--eval-limit", 1, "--workers", 0, "--out", out,
                "--out-dir", tmp_path / run]
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outs.append(load_detector(out))
    assert outs[0].spec.options == {**TINY, "anchor_scales": [4.0, 8.0, 16.0]}
    a, b = outs[0].model.state_dict(), outs[1].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same init and steps: same weights
    # --resume rebuilds the network from the run's own checkpoint: the options need not be repeated
    resume = ["train", "--resume", "--arch", ARCH, "--data", tiny_voc, "--epochs", 1, "--batch-size", 2, "--limit", 2,
              "--eval-limit", 1, "--workers", 0, "--out", tmp_path / "a" / "frcnn.pth", "--out-dir", tmp_path / "a"]
    result = CliRunner().invoke(app, [str(x) for x in resume], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    resumed = load_detector(tmp_path / "a" / "frcnn.pth").model.state_dict()  # no epoch left: the run's weights
    assert all(torch.equal(resumed[k], a[k]) for k in a)
