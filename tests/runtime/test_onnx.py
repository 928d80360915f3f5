"""ONNX export (float and QDQ int8 carrying our recipe) and the ONNX Runtime detector."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_bn
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

from qcompress.defaults import DEFAULT_MODEL
from qcompress.errors import QCompressError
from qcompress.io_utils import sha256_file
from qcompress.models import build_detector
from qcompress.models.detector import Detector, ModelSpec
from qcompress.quant.pipeline import QuantizeOptions, quantize_detector
from qcompress.quant.ptq import quantize_static
from qcompress.quant.qconfig import QuantScheme

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qcompress.runtime.onnx_export import (
    OnnxSidecar,
    export_onnx,
    onnx_sidecar_path,
    ort_session,
    read_onnx_sidecar,
)
from qcompress.runtime.onnxruntime import OnnxDetector, load_onnx_detector, openvino_available
from qcompress.runtime.qdq import quantized_engine

try:
    from qcompress.core.checkpoints import load_detector
except ImportError:  # before checkpoints moved into the core/ layer
    from qcompress.checkpoints import load_detector

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["BACKGROUND", "a", "b", "c"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 300, 300, generator=g) * 1.98 - 0.99


@pytest.fixture(scope="module")
def small() -> Detector:
    torch.manual_seed(0)
    detector = build_detector("mb2-ssd-lite", CLASSES)
    randomize_bn(detector.model)
    return detector


@pytest.fixture(scope="module")
def float_export(small_checkpoint, tmp_path_factory, images):
    detector = load_detector(small_checkpoint)
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    return detector, export_onnx(detector, path, images, output_names=("confidences", "locations"))


def _run(path: Path, batch: torch.Tensor) -> list[np.ndarray]:
    return ort_session(path).run(None, {"images": batch.numpy()})


def _sqnr(reference: torch.Tensor, test: np.ndarray) -> float:
    noise = (reference - torch.from_numpy(test)).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * np.log10(reference.pow(2).sum().item() / noise)


def _optimized_ops(path: Path, tmp_path: Path) -> Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def test_float_export_matches_torch_for_batches_of_one_and_three(float_export, images):
    detector, record = float_export
    assert record.precision == "float32" and record.output_names == ["confidences", "locations"]
    assert min(record.sqnr_db) > 50 and not record.int8_kernels
    with torch.no_grad():
        for batch in (images[:1], images):
            reference = detector.model(batch)
            outputs = _run(record.path, batch)
            assert [o.shape for o in outputs] == [tuple(r.shape) for r in reference]
            for ref, out in zip(reference, outputs):
                assert float((ref - torch.from_numpy(out)).abs().max()) <= 1e-4


def test_sidecar_round_trip(float_export, small_checkpoint):
    detector, record = float_export
    assert (
        record.sidecar_path == onnx_sidecar_path(record.path)
        and record.sidecar_path.name == "small.onnx.json"
    )
    sidecar = read_onnx_sidecar(record.path)
    assert sidecar.arch == detector.spec.arch and sidecar.class_names == detector.spec.class_names
    assert sidecar.input_size == (300, 300) and sidecar.mean == (127.0, 127.0, 127.0) and sidecar.std == 128.0
    assert sidecar.input_name == "images" and sidecar.input_layout == "NCHW"
    assert sidecar.output_names == ("confidences", "locations") and sidecar.precision == "float32"
    assert sidecar.onnx_sha256 == sha256_file(record.path)
    assert sidecar.parent_sha256 == sha256_file(small_checkpoint)
    assert {"torch", "onnx", "onnxruntime"} <= set(sidecar.versions)
    assert "(x - mean) / std" in sidecar.preprocessing["normalize"]
    again = OnnxSidecar.from_dict(json.loads(json.dumps(sidecar.to_dict())), record.sidecar_path)
    assert again == sidecar


def test_invalid_sidecar_is_refused(float_export, tmp_path):
    _, record = float_export
    data = json.loads(record.sidecar_path.read_text())
    for broken in (
        {**data, "format": "other/1"},
        {k: v for k, v in data.items() if k != "class_names"},
        {**data, "input_size": [300]},
        ["not", "an", "object"],
    ):
        with pytest.raises(QCompressError):
            OnnxSidecar.from_dict(broken, tmp_path / "x.onnx.json")


def test_corrupt_or_unexplained_onnx_is_refused(float_export, tmp_path):
    _, record = float_export
    corrupt = tmp_path / "corrupt.onnx"
    data = bytearray(record.path.read_bytes())
    corrupt.write_bytes(bytes(data[: len(data) // 3]))
    onnx_sidecar_path(corrupt).write_text(record.sidecar_path.read_text())
    with pytest.raises(QCompressError, match="sha256"):
        load_onnx_detector(corrupt)
    with pytest.raises(QCompressError, match="cannot load"):
        load_onnx_detector(corrupt, check_hash=False)
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(record.path.read_bytes())
    with pytest.raises(QCompressError, match="sidecar"):
        load_onnx_detector(bare)


def test_export_refuses_a_wrong_sample_and_a_failed_check(float_export, tmp_path, images):
    detector, _ = float_export
    with pytest.raises(QCompressError, match="sample"):
        export_onnx(detector, tmp_path / "x.onnx", images[:, :, :200])
    with pytest.raises(QCompressError, match="SQNR"):
        export_onnx(detector, tmp_path / "y.onnx", images[:1], min_sqnr_db=1e9)
    assert not (tmp_path / "y.onnx").exists() and not onnx_sidecar_path(tmp_path / "y.onnx").exists()


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_int8_export_carries_our_recipe_and_runs_on_int8_kernels(small, images, tmp_path, per_channel):
    options = QuantizeOptions(observer="minmax", per_channel=per_channel)
    qdet, record = quantize_detector(small, [images], options)
    exported = export_onnx(qdet, tmp_path / "int8.onnx", images, recipe=record.recipe)
    assert exported.precision == "int8-qdq" and exported.min_sqnr_db == 20
    assert min(exported.sqnr_db) >= 30  # ONNX Runtime int8 against our eager int8 model
    assert min(exported.recipe_sqnr_db) >= 35
    with quantized_engine("x86"), torch.no_grad():
        reference = qdet.model(images)
    for ref, out in zip(reference, _run(exported.path, images)):
        assert _sqnr(ref, out) >= 30

    # Every quantized conv of ours is an integer conv in ONNX Runtime's optimized graph; none is left float.
    convs = [m for m in qdet.model.modules() if isinstance(m, nnq.Conv2d)]
    ops = _optimized_ops(exported.path, tmp_path)
    assert ops["QLinearConv"] == len(convs) == exported.int8_kernels["QLinearConv"] == 86
    assert ops["QLinearAdd"] == 10 and ops["Conv"] == 0 and ops["FusedConv"] == 0

    # Our int8 weights, weight scales and calibrated input scale are in the file, not recomputed ones.
    graph = onnx.load(str(exported.path)).graph
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    first = qdet.model.base_net[0][0].weight()
    np.testing.assert_array_equal(initializers["base_net.0.0.weight.values"], first.int_repr().numpy())
    scales = first.q_per_channel_scales() if per_channel else torch.tensor(first.q_scale())
    np.testing.assert_allclose(initializers["base_net.0.0.weight.scale"], scales.float().numpy(), rtol=1e-7)
    quantize = next(n for n in graph.node if n.op_type == "QuantizeLinear")
    constants = {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant"
    }
    assert float(constants[quantize.input[1]]) == pytest.approx(float(qdet.model.quant.scale), rel=1e-7)
    assert exported.size_bytes < 0.35 * sum(p.numel() * 4 for p in small.model.parameters())
    sidecar = read_onnx_sidecar(exported.path)
    assert sidecar.quantization["recipe"]["per_channel"] is per_channel
    assert sidecar.quantization["weights"] == ["per-channel" if per_channel else "per-tensor"]


class _TinyNet(nn.Module):
    """Conv+BN+ReLU, depthwise conv+ReLU6, a residual add, a module ReLU, max-pool, concat, a float
    island and a linear layer: every generic path of the QDQ twin."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6())
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.add, self.cat = FloatFunctional(), FloatFunctional()
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)
        self.island = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(self.quant(x))
        y = self.relu(self.add.add(self.depthwise(x), self.pointwise(x)))
        z = self.island(self.pool(self.cat.cat([x, y], dim=1)))
        return self.dequant(self.fc(z.flatten(1))), self.dequant(z)


def test_int8_twin_keeps_float_islands_float_and_fuses_the_rest(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(_TinyNet())
    x = torch.randn(4, 3, 16, 16)
    quantized, _ = quantize_static(model, [x], QuantScheme(observer="minmax"), skip=["island"])
    detector = Detector(quantized, ModelSpec("tiny", ("bg", "a"), (16, 16)), lambda raw, sizes, config: [])
    record = export_onnx(detector, tmp_path / "tiny.onnx", x)
    assert min(record.sqnr_db) >= 30 and min(record.recipe_sqnr_db) >= 50
    assert record.twin["float_layers"] == ["island.module"] and record.twin["int8_linears"] == 1
    ops = _optimized_ops(record.path, tmp_path)
    # The --skip island stays a float conv (ONNX Runtime would otherwise give it int8 weights of its own).
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 1 and ops["QGemm"] == 1
    assert ops["QLinearAdd"] == 1 and ops["QLinearConcat"] == 1


def test_twin_refuses_layers_it_cannot_express():
    from qcompress.runtime.qdq import qdq_twin

    model = nn.Sequential(QuantStub(), nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), DeQuantStub()).eval()
    model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    with quantized_engine("x86"):
        prepared = torch.ao.quantization.prepare(model)
        prepared(torch.randn(2, 3, 8, 8))
        converted = torch.ao.quantization.convert(prepared)  # quantized GroupNorm: no float twin here
        with pytest.raises(QCompressError, match="GroupNorm"):
            qdq_twin(converted, torch.randn(1, 3, 8, 8))




@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="embedded default checkpoint not built yet")
def test_onnx_detector_gives_the_torch_detections(tmp_path):
    from qcompress.data.synthetic import RenderedSplit

    torch_detector = load_detector(DEFAULT_MODEL)
    test = RenderedSplit("test", 4)
    pictures = [test.load_image(i) for i in range(len(test))]
    sample = torch.stack([torch_detector.preprocess(p) for p in pictures])
    export_onnx(torch_detector, tmp_path / "default.onnx", sample[:2])
    detector = load_onnx_detector(tmp_path / "default.onnx", threads=1)
    assert isinstance(detector, OnnxDetector) and detector.precision == "float32"
    assert detector.class_names == torch_detector.class_names
    assert detector.postprocess_config == torch_detector.postprocess_config
    torch.testing.assert_close(detector.preprocess(pictures[0]), torch_detector.preprocess(pictures[0]))
    theirs, ours = torch_detector.detect(pictures), detector.detect(pictures)
    confident = 0
    for a, b in zip(theirs, ours):
        keep_a, keep_b = a.scores > 0.3, b.scores > 0.3
        assert torch.equal(a.labels[keep_a], b.labels[keep_b])
        torch.testing.assert_close(b.boxes[keep_b], a.boxes[keep_a], atol=1e-2, rtol=0)
        torch.testing.assert_close(b.scores[keep_b], a.scores[keep_a], atol=1e-4, rtol=0)
        confident += int(keep_a.sum())
    assert confident >= 4  # a trained model: the comparison is about real detections


@pytest.mark.skipif(
    not openvino_available(), reason="openvino not installed (pip install 'qcompress[openvino]')"
)
def test_openvino_runtime_reads_the_same_file(float_export, images):
    detector, record = float_export
    ov_detector = load_onnx_detector(record.path, runtime="openvino", threads=1)
    with torch.no_grad():
        for ref, out in zip(detector.model(images), ov_detector.model(images)):
            assert float((ref - out).abs().max()) <= 1e-3
