"""The embedded default checkpoint: loads, and reaches the mAP recorded in its sidecar."""

from __future__ import annotations

import json

import pytest

from qcompress.api import evaluate_detector
from qcompress.checkpoints import load_detector
from qcompress.data.synthetic import RenderedSplit
from qcompress.defaults import DEFAULT_MODEL


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="embedded default checkpoint not built yet")
def test_default_checkpoint_reaches_its_recorded_map():
    sidecar = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    check = sidecar["check"]
    detector = load_detector(DEFAULT_MODEL)
    assert detector.spec.arch == "mb2-ssd-lite" and detector.spec.input_size == (300, 300)
    subset = RenderedSplit(check["split"], check["images"])
    result, _ = evaluate_detector(detector, subset, "voc07")
    assert result.mAP == pytest.approx(check["voc07"], abs=0.01)
    assert result.mAP > 0.5  # a trained model, not a placeholder
