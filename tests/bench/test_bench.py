"""bench / compare / detect: counts against hand formulas, ratio arithmetic, reports that parse, drawn pictures."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from qcompress._warnings import quiet_torch_ao
from qcompress.bench.size import (
    conv_macs,
    count_macs,
    count_parameters,
    equivalent_flops,
    peak_forward_memory,
    state_dict_bytes,
)
from qcompress.cli.app import app
from qcompress.jobs.bench import gallery_indices, model_labels, ratio, ratios_to_first

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------- counts and maths
def test_conv_and_linear_macs_equal_the_hand_formula():
    conv = nn.Conv2d(8, 16, kernel_size=(3, 5), stride=2, padding=(1, 2), groups=2)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(16 * 10 * 10, 7))
    cost = count_macs(model, (1, 8, 20, 20))
    conv_macs = (16 * 10 * 10) * (8 // 2) * 3 * 5  # output elements * in/groups * kH * kW
    linear_macs = 7 * 1600
    assert [layer.macs for layer in cost.layers] == [conv_macs, linear_macs]
    assert cost.macs == conv_macs + linear_macs
    assert cost.bops == cost.macs * 32 * 32
    # Per image: a batch of 3 counts the same.
    assert count_macs(model, (3, 8, 20, 20)).macs == cost.macs


def _int8_conv_linear():
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            self.fc = nn.Linear(6 * 8 * 8, 5)

        def forward(self, x):
            x = self.conv(self.quant(x))
            return self.dequant(self.fc(x.flatten(1)))

    torch.manual_seed(0)
    float_model = Net().eval()
    torch.backends.quantized.engine = "x86"
    with quiet_torch_ao():
        prepared = Net().eval()
        prepared.load_state_dict(float_model.state_dict())
        prepared.qconfig = get_default_qconfig("x86")
        prepare(prepared, inplace=True)
        prepared(torch.randn(4, 4, 8, 8))
        return float_model, convert(prepared, inplace=False)


def test_equivalent_flops_divide_binary_macs_by_64_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 4, 1))
    macs = conv_macs(model, (1, 3, 10, 10))
    assert macs == {"0": 3 * 8 * 9 * 100, "1": 8 * 16 * 9 * 100, "2": 16 * 4 * 100}
    assert equivalent_flops(macs, []) == 21600 + 115200 + 6400
    assert equivalent_flops(macs, ["1"]) == 21600 + 115200 / 64 + 6400 == 29800


def test_int8_bops_are_macs_times_64_and_quantized_linear_is_counted():
    float_model, int8_model = _int8_conv_linear()
    with quiet_torch_ao():
        fp = count_macs(float_model, (1, 4, 8, 8))
        q = count_macs(int8_model, (1, 4, 8, 8))
    conv_macs = 6 * 8 * 8 * 4 * 9
    assert [(l.name, l.macs) for l in q.layers] == [("conv", conv_macs), ("fc", 5 * 384)]
    for layer in q.layers:
        assert (layer.weight_bits, layer.activation_bits) == (8, 8)
        assert layer.bops == layer.macs * 64
    assert q.macs == fp.macs and q.bops == fp.bops // 16
    assert q.int8_macs_fraction == 1.0 and fp.int8_macs_fraction == 0.0
    # Packed int8 weights are still parameters; they take a quarter of the bytes.
    assert count_parameters(int8_model) == count_parameters(float_model) == sum(p.numel() for p in float_model.parameters())
    assert state_dict_bytes(int8_model) < state_dict_bytes(float_model) / 2


def test_lowbit_wrappers_are_counted_once_at_their_bits():
    """A low-bit wrapper calls its conv's function itself (the conv's hooks never fire): the wrapper is
    counted, under the conv's name, with the MACs of the float layer and its own bits."""
    from qcompress.quant.lowbit import LowBitConv2d, LowBitLinear, make_quantizers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 5))
    fp = count_macs(model, (1, 3, 6, 6))
    model[1] = LowBitConv2d(model[1], *make_quantizers("binary", 1, 1, model[1]))
    model[3] = LowBitLinear(model[3], *make_quantizers("dorefa", 2, 4, model[3]))
    model(torch.rand(2, 3, 6, 6))  # the quantizers initialise on a first batch
    q = count_macs(model, (1, 3, 6, 6))
    assert [(l.name, l.kind, l.macs) for l in q.layers] == [(l.name, l.kind, l.macs) for l in fp.layers]
    assert [(l.weight_bits, l.activation_bits) for l in q.layers] == [(32, 32), (1, 1), (2, 4)]
    first, conv, fc = (l.macs for l in fp.layers)
    assert q.bops == first * 32 * 32 + conv + fc * 8


def test_ratio_math():
    values = [{"size_bytes": 200.0, "mAP": 0.0, "latency_median_ms": 10.0},
              {"size_bytes": 50.0, "mAP": 0.3, "latency_median_ms": 25.0}]
    ratios = ratios_to_first(values)
    assert ratios[0]["size_bytes"] == 1.0 and ratios[0]["latency_median_ms"] == 1.0
    assert ratios[1]["size_bytes"] == 0.25 and ratios[1]["latency_median_ms"] == 2.5
    assert math.isnan(ratios[1]["mAP"])  # ratio to 0 is undefined, not infinite
    assert math.isnan(ratio(1.0, float("nan")))
    assert ratios_to_first([]) == []


def test_gallery_indices_and_labels():
    assert gallery_indices(10, 6) == [0, 2, 4, 5, 7, 9]
    assert gallery_indices(3, 6) == [0, 1, 2]
    assert gallery_indices(5, 1) == [0] and gallery_indices(0, 6) == [] and gallery_indices(5, 0) == []
    assert model_labels([Path("a/m.pth"), Path("b/q.pth")]) == ["m", "q"]
    assert model_labels([Path("a/m.pth"), Path("b/m.pth")]) == ["a/m", "b/m"]
    assert model_labels([Path("a/m.pth"), Path("a/m.pth")]) == ["m#1", "m#2"]


def test_peak_memory_sees_the_activations():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1)).eval()
    peak = peak_forward_memory(model, (1, 3, 256, 256), threads=1)
    output_bytes = 64 * 256 * 256 * 4
    assert peak.batch_size == 1 and peak.resident_bytes > 0
    if peak.method != "vmhwm":
        pytest.skip("no peak-RSS reset here (/proc/self/clear_refs): only a lower bound is measured")
    assert output_bytes * 0.9 <= peak.peak_bytes < output_bytes * 20


def test_peak_memory_fallback_is_the_growth_of_the_lifetime_peak(monkeypatch):
    from qcompress.bench import size

    monkeypatch.setattr(size, "_reset_peak_rss", lambda: False)
    readings = iter([40_000_000, 45_000_000])  # ru_maxrss before and after the forward pass
    monkeypatch.setattr(size, "_maxrss_bytes", lambda: next(readings))
    peak = peak_forward_memory(nn.Sequential(nn.Conv2d(3, 4, 1)).eval(), (2, 3, 8, 8), threads=1)
    assert (peak.method, peak.batch_size, peak.peak_bytes) == ("ru_maxrss", 2, 5_000_000)


# ------------------------------------------------------------------------------ end to end (CLI)
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An untrained slim mb2-ssd-lite (float), an identical copy elsewhere, and its int8 version."""
    from qcompress.core.checkpoints import save_detector
    from qcompress.data.synthetic import SYNTH_CLASSES
    from qcompress.models import build_detector
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

    root = tmp_path_factory.mktemp("bench_models")
    torch.manual_seed(0)
    detector = build_detector("mb2-ssd-lite", SYNTH_CLASSES, width_mult=0.5)
    fp32 = save_detector(detector, root / "a" / "fp.pth", command=["test"])
    copy = root / "b" / "fp.pth"
    copy.parent.mkdir()
    shutil.copy(fp32, copy)
    shutil.copy(fp32.with_suffix(".json"), copy.with_suffix(".json"))
    calib = [torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(1))]
    with quiet_torch_ao():
        qdet, record = quantize_detector(detector, calib, QuantizeOptions(observer="minmax"))
    int8 = save_detector(qdet, root / "a" / "int8.pth", parent=fp32, quantization=record.recipe, command=["test"])
    return fp32, copy, int8


def test_bench_report_ratios_and_numbers(models, tmp_path):
    fp32, copy, int8 = models
    result = invoke("bench", "-m", fp32, "-m", copy, "-m", int8, "--runs", 2, "--warmup", 1, "--batch-size", 2,
                    "--threads", 1, "--out-dir", tmp_path, "--report-name", "b")
    assert result.exit_code == 0, result.output
    assert "int8 (x86)" in result.output and "a/fp" in result.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"command", "config", "reference", "models", "values", "ratios", "versions", "peak_memory_method"} <= set(data)
    assert data["command"] == "bench" and data["reference"] == "a/fp" and data["batch_sizes"] == [1, 2]
    a, b, q = data["models"]
    for m in (a, b, q):
        for batch in ("1", "2"):
            lat = m["latency"][batch]
            assert lat["runs"] == 2 and lat["warmup"] == 1 and lat["threads"] == 1 and lat["batch_size"] == int(batch)
            assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"]
            assert lat["images_per_second"] == pytest.approx(1000 * int(batch) / lat["median_ms"])
            assert m["peak_memory"][batch]["peak_bytes"] > 0
        assert m["params"] > 0 and m["macs"] > 0 and m["file_bytes"] > 0 and m["input_size"] == [300, 300]
    assert (a["quantized"], a["backend"], q["quantized"], q["backend"]) == (False, None, True, "x86")
    ratios = data["ratios"]
    # The identical file: exactly the same size, parameters and MACs; the int8 file: the byte ratio.
    assert ratios["b/fp"]["size_bytes"] == 1.0 and ratios["b/fp"]["params"] == 1.0 and ratios["b/fp"]["macs"] == 1.0
    assert ratios["int8"]["size_bytes"] == int8.stat().st_size / fp32.stat().st_size == q["file_bytes"] / a["file_bytes"]
    assert ratios["int8"]["macs"] == 1.0 and ratios["int8"]["bops"] == 1 / 16  # every conv int8: 8x8 vs 32x32
    assert ratios["int8"]["latency_median_ms"] == pytest.approx(q["latency"]["1"]["median_ms"] / a["latency"]["1"]["median_ms"])
    md = (tmp_path / "b.md").read_text()
    assert "| metric | a/fp | b/fp | b/fp / a/fp | int8 | int8 / a/fp |" in md
    assert f"| size on disk MB | {fp32.stat().st_size / 1e6:,.3f} |" in md


def test_compare_report_and_gallery(models, tmp_path):
    from qcompress.data.synthetic import generate_voc_dataset

    fp32, _, int8 = models
    data_dir = generate_voc_dataset(tmp_path / "voc", num_images=12, workers=1)
    out = tmp_path / "reports"
    result = invoke("compare", "-m", fp32, "-m", int8, "--data", data_dir, "--split", "trainval", "--limit", 4,
                    "--images", 3, "--score-threshold", 0.0, "--runs", 2, "--warmup", 1, "--threads", 1, "--out-dir", out,
                    "--report-name", "c")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "c.json").read_text())
    assert data["command"] == "compare" and data["metric"] == "voc07"
    fp, q = data["models"]
    # The reported mAP is VOC07 AP of each model on the first 4 trainval images, computed here directly.
    from qcompress.core.checkpoints import load_detector
    from qcompress.core.inference import predict_dataset
    from qcompress.data.voc import VOCDataset
    from qcompress.metrics.voc_ap import evaluate_voc_detections

    for m, path in ((fp, fp32), (q, int8)):
        detector = load_detector(path)
        dataset = VOCDataset(data_dir, "trainval", detector.class_names)
        detections = predict_dataset(detector, dataset, [0, 1, 2, 3], num_workers=0)
        expected = evaluate_voc_detections([dataset.annotation(i) for i in range(4)], detections,
                                           detector.class_names, use_07_metric=True)
        assert m["accuracy"]["num_images"] == 4
        assert m["accuracy"]["mAP"] == pytest.approx(expected.mAP, abs=1e-9, nan_ok=True)
        assert m["latency"]["1"]["median_ms"] > 0
    assert data["ratios"]["int8"]["size_bytes"] == int8.stat().st_size / fp32.stat().st_size
    assert data["values"]["int8"]["mAP"] == q["accuracy"]["mAP"]
    md = (out / "c.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(data["gallery"]) == 3
    for link, entry in zip(links, data["gallery"]):
        assert link == entry["file"] and link.startswith("c_images/")  # relative to the report
        with Image.open(out / link) as picture:
            # ground truth | fp | int8, each panel the 300 px image side by side
            assert picture.width >= 3 * 300 and picture.height > 300


def test_detect_draws_boxes_where_detections_are(models, tmp_path):
    from qcompress.core.checkpoints import load_detector
    from qcompress.data.synthetic import render_image
    from qcompress.jobs.bench import detect_image
    from qcompress.models.detector import Detections

    fp32, _, _ = models
    image, _ = render_image(seed=0, index=2)
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    detector = load_detector(fp32)
    # One real detection of this (untrained) network, a small one so most of the picture is far from it.
    real = detector.detect([image])[0]
    areas = (real.boxes[:, 2] - real.boxes[:, 0]) * (real.boxes[:, 3] - real.boxes[:, 1])
    i = int(torch.where(areas >= 400, areas, torch.full_like(areas, float("inf"))).argmin())
    one = Detections(real.boxes[i : i + 1], real.labels[i : i + 1], real.scores[i : i + 1])
    detector.detect = lambda images: [one]
    kept = detect_image(detector, path, tmp_path / "out.png", score_threshold=0.0)
    assert len(kept) == 1 and torch.equal(kept.boxes, one.boxes)
    drawn = np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).astype(int)
    x1, y1, x2, y2 = (round(v) for v in kept.boxes[0].tolist())
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, image.shape[1] - 1), min(y2, image.shape[0] - 1)
    edge = np.abs(drawn[y1 + 1 : y2, x1 : x1 + 2] - image[y1 + 1 : y2, x1 : x1 + 2]).sum()
    assert edge > 0  # the left edge of the box is drawn
    far = np.ones(image.shape[:2], bool)
    for box in kept.boxes.tolist():
        bx1, by1, bx2, by2 = (round(v) for v in box)
        far[max(0, by1 - 30) : by2 + 6, max(0, bx1 - 90) : bx2 + 90] = False  # box, its tag above, margins
    assert far.any()
    assert (drawn[far] == image[far]).all()


def test_detect_cli_and_missing_image(models, tmp_path):
    from qcompress.data.synthetic import render_image

    fp32, _, _ = models
    missing = invoke("detect", "-m", fp32, "--image", tmp_path / "nope.jpg")
    assert missing.exit_code == 2
    lines = [line for line in missing.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.jpg" in lines[0]

    image, _ = render_image(seed=0, index=1)
    Image.fromarray(image).save(tmp_path / "in.jpg")
    ok = invoke("detect", "-m", fp32, "--image", tmp_path / "in.jpg", "--out", tmp_path / "out.jpg", "--score-threshold", 0.0)
    assert ok.exit_code == 0, ok.output
    with Image.open(tmp_path / "out.jpg") as picture:
        assert picture.size == (image.shape[1], image.shape[0])


def test_bench_rejects_bad_options(models, tmp_path):
    fp32, _, _ = models
    result = invoke("bench", "-m", fp32, "--runs", 0, "--out-dir", tmp_path)
    assert result.exit_code == 2 and result.output.startswith("error:") and "--runs" in result.output
    result = invoke("bench", "-m", tmp_path / "missing.pth", "--out-dir", tmp_path)
    assert result.exit_code == 2 and "model file not found" in result.output
    assert not list(tmp_path.glob("*.json"))
