"""`compare` on real images without labels for the models' classes: fidelity to the first model, no empty
ground-truth panel, gallery images that show something."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qcompress.cli.app import app
from qcompress.jobs.bench import _gallery_picks
from qcompress.models.detector import Detections

ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "ultralight_face"
COCO = ASSETS / "coco_person_val2017"


def _dets(scores):
    n = len(scores)
    return Detections(torch.zeros(n, 4), torch.ones(n, dtype=torch.int64), torch.tensor(scores, dtype=torch.float32))


def test_gallery_picks_busiest_and_most_disagreeing_images():
    reference = [_dets([]), _dets([0.9, 0.8, 0.7]), _dets([0.9]), _dets([0.9, 0.9])]
    other = [_dets([]), _dets([0.9, 0.8, 0.7]), _dets([0.9, 0.9, 0.9, 0.9]), _dets([0.9, 0.9])]
    # busiest: image 1 (3 faces); most disagreement: image 2 (1 vs 4); then image 3; never the empty image 0
    assert _gallery_picks([reference, other], 3, 0.5) == [1, 2, 3]


@pytest.mark.assets
@pytest.mark.skipif(not WEIGHTS.is_dir() or not COCO.is_dir(), reason="../shared/assets is absent")
def test_compare_face_models_on_unlabelled_images(tmp_path):
    args = ["compare", "-m", str(WEIGHTS / "version-RFB-320.pth"), "-m", str(WEIGHTS / "version-RFB-640.pth"),
            "--labels", str(WEIGHTS / "face-model-labels.txt"), "--arch", "ultralight-rfb", "--input-size", "320",
            "--dataset", "coco", "--data", str(COCO), "--limit", "12", "--images", "2", "--runs", "2",
            "--warmup", "1", "--out-dir", str(tmp_path), "--report-name", "c"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["metric"] == "fidelity-AP50"
    first, second = (m["accuracy"] for m in data["models"])
    assert first["mAP"] == 1.0 and 0.0 <= second["mAP"] < 1.0  # the reference against itself, another model
    markdown = (tmp_path / "c.md").read_text()
    assert "ground truth" not in markdown.split("Detections on the same images")[1].split("\n")[2]
