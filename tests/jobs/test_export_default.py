"""Where `qcompress export` writes when no --out is given: beside a user's checkpoint, never into the package."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qcompress import api
from qcompress.defaults import DEFAULT_MODEL, WEIGHTS
from qcompress.jobs import export as export_job

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_embedded_checkpoints_export_under_trained_models() -> None:
    assert export_job.default_onnx_path(DEFAULT_MODEL) == Path("trained_models/onnx/mb2-ssd-lite-synth.onnx")
    assert WEIGHTS.resolve() not in export_job.default_onnx_path(DEFAULT_MODEL).resolve().parents


def test_user_checkpoints_export_beside_themselves(tmp_path: Path) -> None:
    assert export_job.default_onnx_path(tmp_path / "m.pth") == tmp_path / "m.onnx"


def _export(model: Path, tiny_voc: Path, out_dir: Path):
    config = api.ExportConfig(model=api.ModelConfig(model), data=api.DataConfig("voc", tiny_voc, "test"),
                              samples=2, out_dir=out_dir)
    return api.export(config)[0]


def test_export_of_a_packaged_checkpoint_leaves_the_package_untouched(
    small_checkpoint: Path, tiny_voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site-packages" / "weights"  # stands in for the installed package's folder
    package.mkdir(parents=True)
    shutil.copy(small_checkpoint, package / "small.pth")
    shutil.copy(small_checkpoint.with_suffix(".json"), package / "small.json")
    monkeypatch.setattr(export_job, "WEIGHTS", package)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    record = _export(package / "small.pth", tiny_voc, work / "eval_results")
    assert Path(record.path).resolve() == (work / "trained_models" / "onnx" / "small.onnx").resolve()
    assert (work / "trained_models" / "onnx" / "small.onnx").is_file()
    assert sorted(p.name for p in package.iterdir()) == ["small.json", "small.pth"]
