"""The released Ultra-Light face detectors on real COCO images: strict loads, int8 fidelity bars, COCO eval.

Fidelity needs no face labels: the fp32 model's own detections (score >= 0.5) are the pseudo ground
truth for its int8 copies (qcompress.metrics.fidelity). Skips cleanly where ../shared/assets is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "ultralight_face"
COCO = ASSETS / "coco_person_val2017"
LABELS = WEIGHTS / "face-model-labels.txt"

pytestmark = [
    pytest.mark.assets,
    pytest.mark.skipif(not WEIGHTS.is_dir() or not COCO.is_dir(), reason="../shared/assets is absent"),
]

FIDELITY_IMAGES = 40  # the first N images
CALIB_FROM = 100  # calibration images are drawn from the images after the first 100: never a test image
CALIB_IMAGES = 16


@pytest.fixture(scope="module")
def quiet():
    from qcompress._warnings import install_filters

    install_filters()


@pytest.fixture(scope="module")
def fp32(quiet):
    from qcompress.core.checkpoints import load_detector

    return load_detector(WEIGHTS / "version-RFB-320.pth", arch="ultralight-rfb", labels=LABELS, options={"input_size": 320})


@pytest.fixture(scope="module")
def faces(fp32):
    from qcompress.data.coco import CocoDataset

    return CocoDataset(COCO / "images", COCO / "instances_person.json", fp32.class_names)


def _predict(detector, faces, count):
    from qcompress.core.inference import predict_dataset

    return predict_dataset(detector, faces, list(range(count)), num_workers=0)


@pytest.fixture(scope="module")
def reference(fp32, faces):
    return _predict(fp32, faces, FIDELITY_IMAGES)


@pytest.fixture(scope="module")
def calib(fp32, faces):
    from qcompress.data.calibration import calibration_indices

    # From the images after the largest fidelity set, so no test image is ever a calibration image.
    others = len(faces) - CALIB_FROM
    indices = [CALIB_FROM + i for i in calibration_indices(others, CALIB_IMAGES, seed=0)]
    return [torch.stack([fp32.preprocess(faces.load_image(i)) for i in indices])]


def _quantize(fp32, calib, **options):
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

    opts = QuantizeOptions(**options)
    return quantize_detector(fp32, [] if opts.data_free else calib, opts)[0]


@pytest.fixture(scope="module")
def data_free(fp32):
    # What `qcompress quantize --data-free --per-tensor` runs: CLE + high-bias absorption + analytic bias
    # correction, activation ranges from BN statistics; no image at all.
    return _quantize(fp32, None, per_channel=False, equalize=True, absorb_bias=True, bias_correction="analytic",
                     data_free=True)


def _fidelity(reference, detector, faces):
    from qcompress.metrics.fidelity import fidelity_scores

    dets = _predict(detector, faces, len(reference))
    return fidelity_scores(reference, dets, detector.class_names, score_threshold=0.5)


def _summary(f) -> str:
    return (f"AP50 {f['AP50']:.4f}, recall {f['recall']:.3f}, mean IoU {f['mean_iou']:.3f}, "
            f"|drift| {f['score_drift_abs']:.4f} on {f['num_pseudo_gt']} pseudo-gt boxes")


def test_all_four_released_checkpoints_load_strictly(quiet):
    from qcompress.core.checkpoints import load_detector

    for arch, name in (("ultralight-rfb", "RFB"), ("ultralight-slim", "slim")):
        for size in (320, 640):
            det = load_detector(WEIGHTS / f"version-{name}-{size}.pth", arch=arch, labels=LABELS,
                                options={"input_size": size})  # load_state_dict(strict=True) inside
            assert det.class_names == ("BACKGROUND", "face")
            assert det.spec.input_size == (size * 3 // 4, size)


def test_reference_is_non_trivial(reference):
    # The bars below mean something only if the fp32 model finds faces in these images.
    assert sum(int((d.scores >= 0.5).sum()) for d in reference) >= 15


def test_per_channel_int8_fidelity(fp32, faces, reference, calib):
    f = _fidelity(reference, _quantize(fp32, calib, per_channel=True), faces)
    assert f["AP50"] >= 0.95, _summary(f)
    assert f["mean_iou"] >= 0.85, _summary(f)


def test_equalization_and_absorption_keep_the_float_function(fp32, faces):
    """CLE is exact; high-bias absorption only approximates relu(p - c) = relu(p) - c for p < c. Absorbing
    into RFB-320's zero-padded 3x3 consumers also shifted every border tap (box outputs at 26 dB):
    those are now skipped, with the reason recorded."""
    import copy

    from qcompress.quant.equalize import absorb_high_bias, equalize, find_equalization_groups
    from qcompress.quant.fuse import fuse
    from qcompress.quant.graph import trace_graph
    from qcompress.quant.pipeline import bn_statistics
    from qcompress.quant.sqnr import sqnr_db

    model = copy.deepcopy(fp32.model).eval()
    nodes = trace_graph(model, torch.zeros(1, 3, *fp32.spec.input_size))
    stats = bn_statistics(model, nodes)
    fused, _ = fuse(model, inplace=True)
    groups = find_equalization_groups(nodes)
    equalize(fused, groups, stats=stats)
    images = torch.stack([fp32.preprocess(faces.load_image(i)) for i in range(8)])
    with torch.inference_mode():
        ref, equalized = fp32.model(images), fused(images)
        assert min(sqnr_db(r, e) for r, e in zip(ref, equalized)) > 90
        record = absorb_high_bias(fused, groups, stats)
        absorbed = fused(images)
    assert record.absorbed and record.border_exact and record.changes_function
    assert record.skipped and all("zero-pads" in reason for reason in record.skipped.values())
    confidences, locations = (sqnr_db(r, a) for r, a in zip(ref, absorbed))
    assert confidences > 45 and locations > 35, (confidences, locations)


@pytest.fixture(scope="module")
def naive_per_tensor(fp32, calib):
    return _quantize(fp32, calib, per_channel=False)


@pytest.fixture(scope="module")
def data_free_fidelity(faces, reference, data_free):
    return _fidelity(reference, data_free, faces)


def test_data_free_per_tensor_int8_fidelity(data_free_fidelity):
    assert data_free_fidelity["AP50"] >= 0.95, _summary(data_free_fidelity)


def test_data_free_beats_naive_per_tensor(fp32, faces, reference, data_free, naive_per_tensor, data_free_fidelity):
    """No image at all (CLE, exact high-bias absorption, analytic bias correction, BN-statistics ranges)
    tracks fp32 more closely than per-tensor int8 calibrated on 16 images: raw head outputs of the
    first 40 images (RFB-320: confidences 29.7 vs 28.5 dB, locations 15.8 vs 15.0 dB) and the score
    drift of matched boxes (0.014 vs 0.019)."""
    from qcompress.quant.sqnr import sqnr_db

    images = torch.stack([fp32.preprocess(faces.load_image(i)) for i in range(FIDELITY_IMAGES)])
    with torch.inference_mode():
        ref, free, naive = fp32.model(images), data_free.model(images), naive_per_tensor.model(images)
    for k, output in enumerate(("confidences", "locations")):
        free_db, naive_db = sqnr_db(ref[k], free[k]), sqnr_db(ref[k], naive[k])
        assert free_db > naive_db + 0.3, f"{output}: data-free {free_db:.2f} dB, naive {naive_db:.2f} dB"
    naive_fidelity = _fidelity(reference, naive_per_tensor, faces)
    summary = f"data-free {_summary(data_free_fidelity)}; naive {_summary(naive_fidelity)}"
    assert data_free_fidelity["AP50"] >= naive_fidelity["AP50"], summary
    assert data_free_fidelity["score_drift_abs"] < naive_fidelity["score_drift_abs"], summary


def test_coco_eval_on_face_model_reports_no_overlap_and_self_fidelity_is_one(quiet, tmp_path):
    from typer.testing import CliRunner

    from qcompress.cli.app import app

    model = WEIGHTS / "version-RFB-320.pth"
    args = ["eval", "-m", str(model), "--arch", "ultralight-rfb", "--labels", str(LABELS), "--dataset", "coco",
            "--data", str(COCO), "--limit", "8", "--out-dir", str(tmp_path), "--report-name", "face-coco",
            "--reference", str(model)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "no class overlap" in result.output
    report = json.loads((tmp_path / "face-coco.json").read_text())
    assert report["mAP"] is None and report["num_objects"] == 0  # NaN (nothing to score) is null in strict JSON
    assert report["class_overlap"] == {
        "matched": [], "dataset_categories_without_class": ["person"], "classes_not_in_dataset": ["face"]}
    fidelity = report["fidelity"]
    assert fidelity["num_pseudo_gt"] > 0
    assert fidelity["AP50"] == 1.0 and fidelity["mean_iou"] == 1.0 and fidelity["score_drift_abs"] == 0.0
    markdown = (tmp_path / "face-coco.md").read_text()
    assert "No class of the model is annotated" in markdown and "Fidelity vs reference" in markdown


def test_coco_eval_scores_person_and_leaves_other_classes_out(quiet, tmp_path):
    # A 21-class VOC model (untrained: only the plumbing is under test) on the person-only json: detections
    # of the 19 classes the json does not annotate used to abort the COCO conversion.
    from qcompress import api
    from qcompress.core.checkpoints import save_detector
    from qcompress.io_utils import read_labels
    from qcompress.models import build_detector

    torch.manual_seed(0)
    voc = read_labels(ASSETS / "labels" / "voc-model-labels.txt")
    path = save_detector(build_detector("mb2-ssd-lite", voc), tmp_path / "voc.pth", command=["test"])
    config = api.EvalConfig(api.ModelConfig(path), api.DataConfig("coco", COCO, limit=4), out_dir=tmp_path)
    result, _ = api.evaluate(config)
    assert result.extra["class_overlap"]["matched"] == ["person"]
    assert len(result.extra["class_overlap"]["classes_not_in_dataset"]) == 19
    assert list(result.ap_per_class) == ["person"] and result.num_objects == 4
    assert result.mAP == pytest.approx(_person_ap_by_pycocotools(path, 4), abs=1e-12)
    assert result.ap_per_class["person"] == pytest.approx(result.mAP, abs=1e-12)


def _person_ap_by_pycocotools(path: Path, count: int) -> float:
    """COCO AP of the model's person detections on the first ``count`` images, pycocotools run directly."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from qcompress.core.checkpoints import load_detector
    from qcompress.core.inference import predict_dataset
    from qcompress.data.coco import CocoDataset

    detector = load_detector(path)
    dataset = CocoDataset(COCO / "images", COCO / "instances_person.json", detector.class_names)
    person = detector.class_names.index("person")
    category = dataset.label_to_category_id[person]
    image_ids = [dataset.coco_image_id(i) for i in range(count)]
    results = []
    for image_id, dets in zip(image_ids, predict_dataset(detector, dataset, list(range(count)), num_workers=0)):
        for (x1, y1, x2, y2), label, score in zip(dets.boxes.tolist(), dets.labels.tolist(), dets.scores.tolist()):
            if label == person:
                results.append({"image_id": image_id, "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "score": score})
    if not results:
        return 0.0  # every annotated person missed
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(dataset.coco, dataset.coco.loadRes(results), iouType="bbox")
        evaluator.params.imgIds, evaluator.params.catIds = image_ids, [category]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def _cli(*args):
    from typer.testing import CliRunner

    from qcompress.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


FACE_ARGS = ("--arch", "ultralight-rfb", "--labels", LABELS, "--input-size", 320, "--dataset", "coco", "--data", COCO,
             "--limit", 50, "--pseudo-labels", 0.5)


@pytest.mark.slow  # ~20 s; the pseudo-label fine-tune path stays in CI through the QAT case above
def test_prune_fine_tunes_on_pseudo_labels_and_recovers_fidelity(quiet, tmp_path):
    # The first 50 images evaluate (fidelity AP vs the fp32 parent), the other 200 fine-tune.
    _cli("prune", "-m", WEIGHTS / "version-RFB-320.pth", *FACE_ARGS, "--method", "channels", "--amount", 0.2,
         "--finetune-epochs", 1, "--lr", 1e-4, "--runs", 3, "--out", tmp_path / "rfb-ch.pth",
         "--out-dir", tmp_path, "--report-name", "prune")
    report = json.loads((tmp_path / "prune.json").read_text())
    assert report["before"]["eval"]["mAP"] == pytest.approx(1.0)  # the parent on its own pseudo labels
    assert report["before"]["eval"]["num_objects"] > 20
    pruned, tuned = report["pruned"]["eval"]["mAP"], report["finetuned"]["mAP"]
    assert report["macs_ratio"] < 0.9 and tuned > pruned


def test_qat_on_pseudo_labels_keeps_fidelity(quiet, tmp_path):
    args = [*FACE_ARGS[:-4], "--limit", 24, *FACE_ARGS[-2:]]  # 24 evaluation images (CI time), 32 training
    _cli("qat", "-m", WEIGHTS / "version-RFB-320.pth", *args, "--epochs", 1, "--lr", 1e-5, "--train-limit", 32,
         "--calib-images", 16, "--no-ptq", "--runs", 2, "--out", tmp_path / "rfb-qat.pth", "--out-dir", tmp_path,
         "--report-name", "qat")
    steps = {s["step"]: s for s in json.loads((tmp_path / "qat.json").read_text())["steps"]}
    assert steps["fp32"]["mAP"] == pytest.approx(1.0)
    assert steps["qat-int8"]["mAP"] >= 0.95  # BN statistics frozen from the start (the --pseudo-labels default)
