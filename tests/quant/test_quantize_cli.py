"""`qcompress quantize` end to end on a tiny generated dataset: report, checkpoint, reload."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from qcompress.cli.app import app
from qcompress.core.checkpoints import load_detector

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_quantize_then_eval_reproduces_the_int8_map(small_checkpoint, tiny_voc, tmp_path):
    out = tmp_path / "q.pth"
    result = run("quantize", "-m", small_checkpoint, "--data", tiny_voc, "--calib-images", 4, "--calib-split", "train",
                 "--observer", "minmax", "--runs", 2, "--out", out, "--out-dir", tmp_path, "--report-name", "rq")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rq.json").read_text())
    assert report["recipe"]["per_channel"] is True and report["recipe"]["calib_images"] == 4
    assert report["int8_bytes"] == out.stat().st_size and report["size_ratio"] < 0.3
    assert report["fp32_latency"]["median_ms"] > 0 and report["int8_latency"]["runs"] == 2
    # one SQNR per quantized layer of the saved model, and one per raw head output (confidences, locations)
    int8_layers = {n for n, m in load_detector(out).model.named_modules() if hasattr(m, "scale") and not list(m.children())}
    assert set(report["layer_sqnr_db"]) == int8_layers
    assert len(report["output_sqnr_db"]) == 2 and min(report["output_sqnr_db"]) > 20
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["quantization"]["backend"] == "x86" and len(sidecar["parent_sha256"]) == 64

    again = run("eval", "-m", out, "--data", tiny_voc, "--out-dir", tmp_path, "--report-name", "e")
    assert again.exit_code == 0, again.output
    reloaded = json.loads((tmp_path / "e.json").read_text())
    assert reloaded["mAP"] == report["int8"]["mAP"]
    assert reloaded["model"]["quantization"]["backend"] == "x86"


def test_quantize_refuses_a_quantized_input(small_checkpoint, tiny_voc, tmp_path):
    out = tmp_path / "q.pth"
    run("quantize", "-m", small_checkpoint, "--data", tiny_voc, "--calib-images", 2, "--observer", "minmax",
        "--no-eval", "--runs", 1, "--no-onnx-latency", "--out", out, "--out-dir", tmp_path)
    result = run("quantize", "-m", out, "--data", tiny_voc, "--out-dir", tmp_path, "--out", tmp_path / "qq.pth")
    assert result.exit_code == 2 and "already quantized" in result.output
    assert not (tmp_path / "qq.pth").exists()


def test_bad_observer_writes_nothing(small_checkpoint, tiny_voc, tmp_path):
    out = tmp_path / "q.pth"
    result = run("quantize", "-m", small_checkpoint, "--data", tiny_voc, "--observer", "kl", "--calib-images", 2,
                 "--out", out, "--out-dir", tmp_path)
    assert result.exit_code == 2 and "unknown observer" in result.output
    assert not out.exists() and not list(tmp_path.glob("*.json"))


def test_report_never_overwrites_a_sidecar(small_checkpoint, tiny_voc, tmp_path):
    """A report named like another checkpoint already in --out-dir is refused before any work: that checkpoint's
    sidecar is intact and nothing is written (the job's own checkpoint: tests/test_bad_inputs.py)."""
    shutil.copy(small_checkpoint, tmp_path / "other.pth")
    shutil.copy(small_checkpoint.with_suffix(".json"), tmp_path / "other.json")
    before = (tmp_path / "other.json").read_bytes()
    out = tmp_path / "q.pth"
    result = run("quantize", "-m", small_checkpoint, "--data", tiny_voc, "--calib-images", 2, "--observer", "minmax",
                 "--no-eval", "--runs", 1, "--out", out, "--out-dir", tmp_path, "--report-name", "other")
    assert result.exit_code == 2 and "would overwrite the sidecar" in result.output
    assert (tmp_path / "other.json").read_bytes() == before and not out.exists()
