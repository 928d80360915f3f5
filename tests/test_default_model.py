"""The embedded default checkpoint: loads, and reaches the mAP recorded in its sidecar."""

from __future__ import annotations

import json

import pytest

from qcompress.api import evaluate_detector
from qcompress.core.checkpoints import load_detector
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


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="embedded default checkpoint not built yet")
def test_default_model_int8_tracks_fp32():
    import torch

    from qcompress.api import calibration_batches
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector
    from qcompress.quant.sqnr import output_sqnr

    detector = load_detector(DEFAULT_MODEL)
    calib = calibration_batches(detector, RenderedSplit("train", 16), 16, seed=0)
    qdet, _ = quantize_detector(detector, calib, QuantizeOptions(observer="histogram"))
    test = RenderedSplit("test", 8)
    images = torch.stack([detector.preprocess(test.load_image(i)) for i in range(len(test))])
    with torch.no_grad():
        sqnr = output_sqnr(detector.model(images), qdet.model(images))
    assert min(sqnr) > 20.0, sqnr


FRCNN = DEFAULT_MODEL.with_name("fasterrcnn-vgg16-synth.pth")


@pytest.mark.skipif(not FRCNN.is_file(), reason="embedded Faster R-CNN example not shipped")
def test_embedded_fasterrcnn_vgg16_example_is_small_and_trained():
    """Issue 19's example: VGG16 structure at width 0.25, 320 px, <= 25 MB, and trained: it finds the
    generated test objects (labels from the generator, not from the model). The shipped example scores 0.83 on
    300 test images (0.88 on these 24); the first, undertrained one (0.59; 0.69 on these 24) fails this bar."""
    assert FRCNN.stat().st_size <= 25 * 2**20
    detector = load_detector(FRCNN)
    assert detector.spec.arch == "fasterrcnn_vgg16" and detector.spec.options["width"] == 0.25
    assert len([k for k in detector.model.state_dict() if k.startswith("extractor.")]) == 26  # 13 VGG16 convs
    result, _ = evaluate_detector(detector, RenderedSplit("test", 24), "voc07")
    assert result.mAP > 0.75
