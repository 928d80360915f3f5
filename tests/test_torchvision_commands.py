"""A torchvision detector (small SSDLite, random weights) through every command, and QAT int8 of
each torchvision family on a few generated images."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from typer.testing import CliRunner

from qcompress.cli.app import app
from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.data.synthetic import SYNTH_CLASSES
from qcompress.data.voc import VOCDataset
from qcompress.models.registry import build_detector
from qcompress.quant.parts import Int8Part
from qcompress.quant.ptq import is_int8
from qcompress.quant.qat import FreezeSchedule, convert_qat, prepare_qat_model, qat_recipe
from qcompress.training.loop import TrainConfig, train_detector

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
ARCH = "ssdlite320_mobilenet_v3_large"


def run(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def tv_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    detector = build_detector(ARCH, ("BACKGROUND", *SYNTH_CLASSES), input_size=128)
    randomize_bn(detector.model)
    path = tmp_path_factory.mktemp("tv") / "ssdlite.pth"
    save_detector(detector, path, command=["test"])
    return path


def _report(folder, name):
    return json.loads((folder / f"{name}.json").read_text())


def test_every_command_on_a_torchvision_detector(tv_checkpoint, tiny_voc, tmp_path):
    common = ["--data", tiny_voc, "--limit", 4, "--out-dir", tmp_path]
    run("eval", "-m", tv_checkpoint, *common, "--report-name", "fp32")
    fp32 = _report(tmp_path, "fp32")
    assert fp32["model"]["arch"] == ARCH and fp32["num_images"] >= 1

    q = tmp_path / "int8.pth"
    out = run("quantize", "-m", tv_checkpoint, *common, "--calib-images", 4, "--calib-split", "train",
              "--observer", "minmax", "--runs", 2, "--no-onnx-latency", "--out", q, "--report-name", "q").output
    assert "int8:" in out and "backbone" in out
    report = _report(tmp_path, "q")
    parts = {p["part"]: p["precision"] for p in report["parts"]}
    assert parts["backbone"] == "int8" and parts["head.classification_head.module_list.0"] == "int8"
    assert any(p.startswith("transform") and v == "float" for p, v in parts.items())
    assert "Which parts run in int8" in (tmp_path / "q.md").read_text()
    assert report["size_ratio"] < 0.35
    run("eval", "-m", q, *common, "--report-name", "q-again")
    assert _report(tmp_path, "q-again")["mAP"] == report["int8"]["mAP"]

    pruned = tmp_path / "channels.pth"
    run("prune", "-m", tv_checkpoint, *common, "--method", "channels", "--amount", 0.3, "--runs", 2, "--no-onnx-latency", "--out", pruned,
        "--report-name", "p")
    assert _report(tmp_path, "p")["macs_ratio"] < 0.95
    run("eval", "-m", pruned, *common, "--report-name", "p-again")
    assert _report(tmp_path, "p-again")["mAP"] == _report(tmp_path, "p")["pruned"]["eval"]["mAP"]
    run("prune", "-m", tv_checkpoint, *common, "--method", "l1-unstructured", "--amount", 0.5, "--runs", 2,
        "--no-onnx-latency", "--out", tmp_path / "l1.pth", "--report-name", "rep-l1")
    assert _report(tmp_path, "rep-l1")["pruned"]["nonzero_params"] < 0.6 * _report(tmp_path, "rep-l1")["before"]["params"]

    qat_out = tmp_path / "qat.pth"
    run("qat", "-m", tv_checkpoint, *common, "--epochs", 1, "--train-limit", 4, "--batch-size", 2, "--runs", 2,
        "--calib-images", 2, "--workers", 0, "--out", qat_out, "--report-name", "rep-qat")
    steps = _report(tmp_path, "rep-qat")["steps"]
    assert [s["step"] for s in steps] == ["fp32", "ptq-int8", "qat-int8"]
    assert 0 < steps[-1]["quantized_layers"] <= steps[-1]["total_conv_layers"]
    reloaded = load_detector(qat_out)
    assert isinstance(reloaded.model.backbone, Int8Part)

    run("bench", "-m", q, "--runs", 2, "--out-dir", tmp_path, "--report-name", "b")
    bench = _report(tmp_path, "b")["models"][0]
    assert bench["quantized"] and bench["latency"]["1"]["median_ms"] > 0
    assert bench["int8_macs_fraction"] == 1.0  # SSDLite: backbone, extras and every head conv run int8


FAMILIES = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": 128,
    "retinanet_resnet50_fpn": 128,
    "fcos_resnet18_fpn": 128,  # FCOS's family at ResNet-18 (ResNet-50's bottlenecks: the RetinaNet case)
    "ssd300_vgg16": 300,
}


class _First:
    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def __len__(self):
        return self.n

    def __getattr__(self, name):
        return getattr(self.dataset, name)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "ssd300_vgg16" else a
                                  for a in FAMILIES])  # ssd300_vgg16: ~17 s at its fixed 300 px (slow)
def test_qat_int8_trains_and_converts_each_family(arch, tiny_voc, tmp_path):
    torch.manual_seed(0)
    names = ("BACKGROUND", *SYNTH_CLASSES)
    detector = build_detector(arch, names, input_size=FAMILIES[arch])
    randomize_bn(detector.model)
    prepared, groups, parts = prepare_qat_model(detector.model, "x86", arch)
    assert parts and parts[0] == "backbone"
    before = {n: p.detach().clone() for n, p in prepared.named_parameters()}
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, warmup_epochs=0.0, num_workers=0, eval_every=1)
    history = []
    train_detector(detector, _First(VOCDataset(tiny_voc, "train", names), 2), config, model=prepared,
                   on_epoch=lambda e, rec: history.append(rec))
    losses = history[0]["regression_loss"] + history[0]["classification_loss"]
    assert losses > 0 and torch.isfinite(torch.tensor(losses))
    changed = [n for n, p in prepared.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("backbone.module.") for n in changed)
    quantized = convert_qat(prepared.eval())
    backbone = quantized.backbone
    assert isinstance(backbone, Int8Part) and sum(is_int8(m) for m in backbone.modules()) > 10
    assert not [n for n, m in backbone.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    # The converted model has the PTQ layout: it reloads from weights + sidecar to the same outputs.
    path = tmp_path / "qat.pth"
    save_detector(detector.with_model(quantized), path, quantization=qat_recipe("x86", len(groups), FreezeSchedule(), parts))
    x = torch.rand(1, 3, FAMILIES[arch], FAMILIES[arch])
    with torch.inference_mode():
        a, b = quantized(x), load_detector(path).model(x)
    assert torch.equal(a[0]["boxes"], b[0]["boxes"]) and torch.equal(a[0]["scores"], b[0]["scores"])
