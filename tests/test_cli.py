"""The command line: help texts, end-to-end runs on tiny data, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qcompress.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("prune", "quantize", "qat", "eval", "bench", "train", "models", "compare", "detect"):
        assert name in result.output


@pytest.mark.parametrize("command", ["eval", "quantize", "train", "prune", "qat", "bench"])
def test_each_command_has_help_with_defaults(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "default" in result.output.lower()


def test_models_lists_archs():
    result = invoke("models")
    assert result.exit_code == 0 and "mb2-ssd-lite" in result.output


def test_eval_end_to_end_writes_reports(small_checkpoint, tiny_voc, tmp_path):
    result = invoke("eval", "-m", small_checkpoint, "--data", tiny_voc, "--split", "test", "--out-dir", tmp_path,
                    "--report-name", "r", "--metric", "voc")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["metric"] == "voc" and 0.0 <= data["mAP"] <= 1.0
    assert data["num_images"] >= 1 and len(data["model"]["sha256"]) == 64
    assert set(data["ap_per_class"]) <= {"circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow"}
    assert "| class | AP |" in (tmp_path / "r.md").read_text()


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, result.output


def test_missing_model_file(tmp_path):
    _assert_one_line_error(invoke("eval", "-m", tmp_path / "missing.pth", "--out-dir", tmp_path), "model file not found")
    assert not list(tmp_path.glob("*.json"))


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    _assert_one_line_error(invoke("eval", "-m", bad, "--out-dir", tmp_path), "cannot read model file")


def test_missing_dataset_folder(small_checkpoint, tmp_path):
    _assert_one_line_error(invoke("eval", "-m", small_checkpoint, "--data", tmp_path / "nowhere", "--out-dir", tmp_path))


def test_malformed_annotation_xml(small_checkpoint, tiny_voc, tmp_path):
    import shutil

    copy = tmp_path / "voc"
    shutil.copytree(tiny_voc, copy)
    first = sorted((copy / "Annotations").glob("*.xml"))
    test_ids = (copy / "ImageSets" / "Main" / "test.txt").read_text().split()
    (copy / "Annotations" / f"{test_ids[0]}.xml").write_text("<annotation><object>")
    assert first
    _assert_one_line_error(invoke("eval", "-m", small_checkpoint, "--data", copy, "--out-dir", tmp_path), ".xml")


def test_unreadable_image(small_checkpoint, tiny_voc, tmp_path):
    import shutil

    copy = tmp_path / "voc"
    shutil.copytree(tiny_voc, copy)
    test_ids = (copy / "ImageSets" / "Main" / "test.txt").read_text().split()
    (copy / "JPEGImages" / f"{test_ids[0]}.jpg").write_bytes(b"not a jpeg")
    _assert_one_line_error(invoke("eval", "-m", small_checkpoint, "--data", copy, "--out-dir", tmp_path), ".jpg")


def test_bad_metric(small_checkpoint, tiny_voc, tmp_path):
    _assert_one_line_error(
        invoke("eval", "-m", small_checkpoint, "--data", tiny_voc, "--metric", "f1", "--out-dir", tmp_path), "unknown metric"
    )


def test_debug_shows_traceback(tmp_path):
    from qcompress.errors import QCompressError

    result = runner.invoke(app, ["--debug", "eval", "-m", str(tmp_path / "missing.pth")])
    assert isinstance(result.exception, QCompressError)  # re-raised, so a traceback is printed
    assert result.exc_info is not None and result.exc_info[2] is not None
    quiet = runner.invoke(app, ["eval", "-m", str(tmp_path / "missing.pth")])
    assert quiet.exit_code == 2 and not isinstance(quiet.exception, QCompressError)
