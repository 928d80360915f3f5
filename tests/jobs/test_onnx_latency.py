"""ONNX Runtime latency beside eager latency in the quantize / prune reports (qcompress.jobs.onnx_latency)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qcompress.bench.latency import LatencyStats
from qcompress.jobs.onnx_latency import NOT_EXPORTABLE, eager_and_onnx_latency, latency_cells, onnx_rows
from qcompress.models import build_detector

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytestmark = pytest.mark.usefixtures("one_thread")


class _DictOutputs(nn.Module):
    """Raw outputs the exporter refuses (a dict, not tensors)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        scores, boxes = self.inner(images)
        return {"scores": scores, "boxes": boxes}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    detector = build_detector("ultralight-slim", ("BACKGROUND", "face"), input_size=320)
    detector.model.eval()
    detector.source = {"path": "small.pth", "sha256": "0" * 64}
    h, w = detector.spec.input_size
    return detector, torch.rand(2, 3, h, w)


def test_exportable_and_refused_models_are_timed_together(small):
    detector, sample = small
    refused = detector.with_model(_DictOutputs(detector.model))
    timing = eager_and_onnx_latency([detector, refused], sample, engines=[None, None], runs=2, threads=1,
                                    onnx_threads=1)
    assert len(timing.eager) == 2 and all(s.runs == 2 for s in timing.eager)
    assert isinstance(timing.onnx[0], LatencyStats) and timing.onnx[0].median_ms > 0
    assert isinstance(timing.onnx[1], str) and timing.onnx[1].startswith(f"{NOT_EXPORTABLE}: ")
    as_json = timing.onnx_json(0)
    assert as_json["intra_op_threads"] == 1 and as_json["export"]["precision"] == "float32"
    assert as_json["runtime"].startswith("onnxruntime ")
    assert timing.onnx_json(1) == timing.onnx[1]
    median, p90 = onnx_rows(timing)
    assert median[0] == "latency median ms, ONNX Runtime" and median[2] == timing.onnx[1] and math.isnan(median[3])
    assert p90[1] == timing.onnx[0].p90_ms
    assert latency_cells(median[1:])[2] == "–"
    assert "ONNX Runtime" in timing.describe() and "1 intra-op thread(s)" in timing.describe()


def test_switched_off_times_eager_only(small):
    detector, sample = small
    timing = eager_and_onnx_latency([detector, detector], sample, engines=[None, None], runs=1, threads=1, onnx=False)
    assert len(timing.eager) == 2 and timing.onnx == [None, None] and timing.onnx_threads is None
    assert onnx_rows(timing) == [] and timing.timed_onnx() == []
    assert "ONNX Runtime" not in timing.describe()
