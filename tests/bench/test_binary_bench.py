"""`qcompress bench` on a binary-QAT checkpoint: it reloads, runs the bitpacked engine and reports per layer."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from qcompress.cli.app import app
from qcompress.core.checkpoints import save_detector
from qcompress.models import build_detector
from qcompress.models.registry import compression_spec
from qcompress.quant.lowbit import apply_lowbit, initialize_lowbit


def test_bench_times_the_binary_engine_per_layer(tmp_path):
    torch.manual_seed(0)
    detector = build_detector("ultralight-slim", ("BACKGROUND", "face"), input_size=320)
    record = apply_lowbit(detector.model, "binary", 1, 1, "backbone", spec=compression_spec("ultralight-slim"))
    initialize_lowbit(detector.model, [torch.randn(2, 3, 240, 320)])
    path = save_detector(detector, tmp_path / "binary.pth", quantization=record.recipe)
    result = CliRunner().invoke(app, ["bench", "-m", str(path), "--runs", "2", "--warmup", "1", "--threads", "1",
                                      "--no-memory", "--out-dir", str(tmp_path), "--report-name", "b"])
    assert result.exit_code == 0, result.output
    engine = json.loads((tmp_path / "b.json").read_text())["binary_engine"]
    assert engine["converted"] == record.layers  # every binarized (non-depthwise) conv runs on the engine
    assert len(engine["layers"]) == len(record.layers)
    first = engine["layers"][0]
    assert {"name", "kernel", "in_channels", "out_channels", "out_hw", "speedup_vs_fp32", "speedup_vs_int8"} <= set(first)
    assert engine["max_abs_diff"] <= 1e-5  # engine equals the fake-quant layer up to float rounding
    assert engine["model_engine_ms"] > 0 and "Binary engine" in (tmp_path / "b.md").read_text()
