"""What tripped a first-time user (issue 25): each test names the defect it guards against."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qcompress.cli.app import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _strict_json(path: Path):
    def refuse(constant: str):
        raise ValueError(f"bare {constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_wrong_architecture_hint_names_the_matching_one(tmp_path):
    from qcompress.models import build_detector

    face = build_detector("ultralight-rfb", ("BACKGROUND", "face"))
    path = tmp_path / "face.pth"  # no sidecar: taken for the default architecture
    torch.save(face.model.state_dict(), path)
    result = invoke("eval", "-m", path, "--out-dir", tmp_path)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "--arch ultralight-rfb" in text and "--num-classes" not in text


def test_reports_are_strict_json_with_null_for_absent_classes(small_checkpoint, tiny_voc, tmp_path):
    result = invoke("eval", "-m", small_checkpoint, "--data", tiny_voc, "--limit", "1", "--out-dir", tmp_path,
                    "--report-name", "one")
    assert result.exit_code == 0, result.output
    data = _strict_json(tmp_path / "one.json")  # raises on NaN
    absent = [c for c, ap in data["ap_per_class"].items() if ap is None]
    assert absent, "one image cannot hold all 8 classes"
    assert "no objects of this class" in result.output
    assert "not applicable" in (tmp_path / "one.md").read_text()


def test_json_safe_writes_null_for_non_finite(tmp_path):
    from qcompress.io_utils import write_json_atomic

    write_json_atomic(tmp_path / "x.json", {"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}})
    assert _strict_json(tmp_path / "x.json") == {"a": None, "b": [1.0, None], "c": {"d": None}}


def test_interleaved_latency_alternates_models():
    from qcompress.bench.latency import interleaved_latency

    calls: list[str] = []

    class Recorder(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    a, b = interleaved_latency([Recorder("a"), Recorder("b")], (1, 3, 4, 4), runs=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up each, then A B A B A B
    assert a.runs == b.runs == 3 and a.spread >= 0


def test_recipe_table_names_each_recipe_with_k_of_n(monkeypatch):
    from qcompress.jobs import recipes

    monkeypatch.setattr(recipes, "quantize_detector", lambda det, calib, options: (det, None))

    class Fake:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU6())

        def with_model(self, model):
            return self

    seen: list[str] = []
    recipes.run_recipes(Fake(), [], lambda det: 0.5, on_recipe=seen.append)
    total = len(recipes.RECIPES) + 2
    assert seen[0] == f"fp32 (1/{total})" and seen[-1].endswith(f"({total}/{total})")
    assert seen[2].startswith(recipes.RECIPES[0][0])


def test_help_has_no_python_type_placeholders():
    for command in ("quantize", "prune", "qat", "bench", "eval"):
        text = invoke(command, "--help").output
        assert "<bool>" not in text and "list[" not in text, command


def test_prune_has_train_limit_and_qat_bits_are_checked():
    assert "--train-limit" in invoke("prune", "--help").output


def test_markdown_tables_show_values_not_python_reprs():
    from qcompress.reports import md_table

    table = md_table(["field", "value"], [["amounts", {"base_net.1": 0.3, "extras.0": 0.6}], ["skip", []]])
    assert "base_net.1=0.3000, extras.0=0.6000" in table and "{" not in table


def test_raw_outputs_are_named_by_the_architecture():
    from qcompress.core import output_names
    from qcompress.models import build_detector

    assert output_names(build_detector("mb2-ssd-lite", ("BACKGROUND", "a")), 2) == ["class scores", "box offsets"]


def test_resume_with_other_settings_is_refused_before_training(small_checkpoint, tiny_voc, tmp_path):
    from qcompress.core.checkpoints import load_detector, save_detector

    out = tmp_path / "m.pth"
    run_dir = tmp_path / "m-run"
    save_detector(load_detector(small_checkpoint), run_dir / "last.pth")
    torch.save({"optimizer": {}, "epoch": 0, "history": [], "settings": {"lr": 0.003, "bf16": False}},
               run_dir / "last.state.pt")
    result = invoke("train", "--resume", "--out", out, "--data", tiny_voc, "--lr", "0.01", "--out-dir", tmp_path)
    assert result.exit_code == 2
    assert "lr 0.003 -> 0.01" in " ".join(result.output.split())
    assert not out.exists()


def test_coco_image_folder_finds_the_json_beside_it(tmp_path):
    from qcompress.core import DataConfig, load_dataset

    images = tmp_path / "coco" / "images"
    images.mkdir(parents=True)
    ann = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    (tmp_path / "coco" / "instances.json").write_text(json.dumps(ann))
    dataset = load_dataset(DataConfig("coco", images), ("BACKGROUND", "person"))
    assert len(dataset) == 0


def test_face_benchmark_without_assets_exits_non_zero(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "face_recipes.py"), "--assets", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--assets" in done.stderr


@pytest.mark.parametrize("bad", [["--bits-w", "2"], ["--bits-a", "3", "--method", "binary"]])
def test_bits_that_do_not_apply_are_an_error(small_checkpoint, bad):
    result = invoke("qat", "-m", small_checkpoint, *bad)
    assert result.exit_code == 2 and "do not apply" in result.output


def test_embedded_checkpoints_are_named_by_models_and_load_by_name():
    """Shipped checkpoints other than the default live inside the package (site-packages after a wheel
    install): ``--model-path embedded:NAME`` must reach them, and ``qcompress models`` must name them."""
    from qcompress.core.loading import ModelConfig, resolve_model_path
    from qcompress.defaults import DEFAULT_MODEL, embedded_models

    listed = invoke("models").output
    for name in embedded_models():
        assert f"embedded:{name}" in listed
        path = resolve_model_path(ModelConfig(f"embedded:{name}"))
        assert path.is_file() and path.parent == DEFAULT_MODEL.parent and path.stem == name
    assert resolve_model_path(ModelConfig("embedded:" + DEFAULT_MODEL.stem)) == DEFAULT_MODEL
