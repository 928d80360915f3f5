"""`qcompress quantize --max-drop` on the embedded default: the saved model meets the target when
`qcompress eval` scores it, and bad values fail with one line before any work."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qcompress.cli.app import app
from qcompress.defaults import DEFAULT_MODEL

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="embedded default checkpoint not built yet")
def test_max_drop_on_the_default_meets_its_target_when_evaluated_again(tmp_path):
    out, drop = tmp_path / "q.pth", 5.0
    result = run("quantize", "--per-tensor", "--weight-bits", 4, "--max-drop", drop, "--limit", 6,
                 "--calib-images", 2, "--observer", "minmax", "--runs", 1, "--no-onnx-latency",
                 "--out", out, "--out-dir", tmp_path, "--report-name", "md")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "md.json").read_text())
    search = report["max_drop"]
    # the independent reference: `qcompress eval` of fp32 and of the saved int8 checkpoint, same images
    for model, name in ((DEFAULT_MODEL, "fp32"), (out, "int8")):
        again = run("eval", "-m", model, "--limit", 6, "--out-dir", tmp_path, "--report-name", name)
        assert again.exit_code == 0, again.output
    fp32 = json.loads((tmp_path / "fp32.json").read_text())["mAP"]
    int8 = json.loads((tmp_path / "int8.json").read_text())["mAP"]
    assert search["reference"] == pytest.approx(fp32, abs=1e-9)
    assert int8 >= fp32 - drop / 100
    assert int8 == pytest.approx(report["int8"]["mAP"], abs=1e-9)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sorted(sidecar["quantization"]["kept_float"]) == sorted(search["float_layers"])
    # the search: all int8 is enough, or the widest split comes first, then all int8; the chosen split is
    # the smallest evaluated k that met the target, and every smaller evaluated k missed it
    trials = search["trials"]
    if not (trials[0]["float_layers"] == 0 and trials[0]["meets"]):
        assert trials[0]["float_layers"] == len(search["ranked"]) - 1 and trials[1]["float_layers"] == 0
    chosen = len(search["float_layers"])
    assert all(t["meets"] == (t["score"] >= search["target"]) for t in trials)
    assert any(t["float_layers"] == chosen and t["meets"] for t in trials)
    assert not any(t["meets"] for t in trials if t["float_layers"] < chosen)
    assert search["float_layers"] == [row["layer"] for row in search["ranked"][:chosen]]
    assert "--max-drop" in (tmp_path / "md.md").read_text()


@pytest.mark.parametrize("value", ["-0.5", "nan", "inf"])
def test_bad_max_drop_is_one_line_and_writes_nothing(tmp_path, value):
    result = run("quantize", "--max-drop", value, "--out", tmp_path / "q.pth", "--out-dir", tmp_path)
    assert result.exit_code == 2
    assert "--max-drop must be a finite number of points >= 0" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_max_drop_needs_the_evaluation(tmp_path):
    result = run("quantize", "--max-drop", "0.5", "--no-eval", "--out", tmp_path / "q.pth", "--out-dir", tmp_path)
    assert result.exit_code == 2 and "--max-drop needs the evaluation" in result.output


def test_unknown_ranking_is_refused(tmp_path):
    result = run("quantize", "--max-drop", "0.5", "--max-drop-ranking", "random", "--out", tmp_path / "q.pth",
                 "--out-dir", tmp_path)
    assert result.exit_code == 2 and "unknown --max-drop-ranking 'random'" in result.output
