"""Evaluation shared by the jobs: mAP (VOC / COCO), fidelity to a reference model, model summaries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompress.core.checkpoints import load_detector
from qcompress.core.inference import predict_dataset
from qcompress.core.loading import ModelConfig, Progress, limited_indices, no_progress
from qcompress.data.dataset import DetectionDataset
from qcompress.errors import QCompressError
from qcompress.models.detector import Detections, Detector
from qcompress.reports import Report, md_table

METRICS = ("voc07", "voc", "coco")


@dataclass
class EvalResult:
    metric: str
    mAP: float
    ap_per_class: dict[str, float]
    num_images: int
    num_objects: int
    seconds: float
    metric_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("nan")


def score_detections(
    dataset: DetectionDataset,
    indices: Sequence[int],
    detections: Sequence[Detections],
    metric: str,
    annotations: Sequence[Any] | None = None,
) -> tuple[float, dict[str, float], int, dict[str, Any]]:
    """(mAP, per-class AP, number of objects, extra stats) for detections of ``dataset[indices]``."""
    if annotations is None:
        annotations = [dataset.annotation(i) for i in indices]
    num_objects = int(sum((~a.difficult).sum() for a in annotations))
    if metric in ("voc07", "voc"):
        from qcompress.metrics.voc_ap import evaluate_voc_detections

        res = evaluate_voc_detections(annotations, detections, dataset.class_names, use_07_metric=metric == "voc07")
        return res.mAP, res.ap_per_class, num_objects, {}
    from qcompress.metrics.coco_ap import annotations_to_coco, detections_to_coco, evaluate_coco

    coco_gt = getattr(dataset, "coco", None)
    if coco_gt is not None:
        image_ids = [dataset.coco_image_id(i) for i in indices]
        label_map = dataset.label_to_category_id
        if not label_map:  # no COCO category is one of the model's classes: nothing to score, not AP 0
            return float("nan"), {}, num_objects, {"class_overlap": class_overlap(dataset)}
        # Detections of classes the json does not annotate can be neither right nor wrong: left out.
        results = detections_to_coco(_only_labels(detections, label_map), image_ids, label_map)
        # Only the categories the model can predict: others would count as AP 0 against it.
        res = evaluate_coco(coco_gt, results, image_ids=image_ids, category_ids=sorted(label_map.values()),
                            category_names={cat: dataset.class_names[label] for label, cat in label_map.items()})
    else:
        sizes = [dataset.image_size(i) for i in indices]
        coco_gt = annotations_to_coco(annotations, dataset.class_names, sizes)
        results = detections_to_coco(detections, list(range(len(indices))))
        res = evaluate_coco(coco_gt, results)
    return res.stats["AP"], res.ap_per_class, num_objects, {"coco": res.stats}


def evaluate_detector(
    detector: Detector,
    dataset: DetectionDataset,
    metric: str = "voc07",
    limit: int | None = None,
    batch_size: int = 16,
    progress: Progress = no_progress,
    description: str = "eval",
) -> tuple[EvalResult, list[Detections]]:
    if metric not in METRICS:
        raise QCompressError(f"unknown metric {metric!r}", f"use one of: {', '.join(METRICS)}")
    indices = limited_indices(dataset, limit)
    started = time.perf_counter()
    annotations = [dataset.annotation(i) for i in indices]  # bad annotations fail before inference
    advance = progress(description, len(indices))
    detections = predict_dataset(detector, dataset, indices, batch_size=batch_size, on_batch=advance)
    metric_started = time.perf_counter()
    mAP, per_class, num_objects, extra = score_detections(dataset, indices, detections, metric, annotations)
    done = time.perf_counter()
    result = EvalResult(metric, mAP, per_class, len(indices), num_objects, done - started, done - metric_started, extra)
    return result, detections


def class_overlap(dataset: DetectionDataset) -> dict[str, Any] | None:
    """Which of the model's classes a COCO json annotates (None for datasets without a category map)."""
    label_map = getattr(dataset, "label_to_category_id", None)
    if label_map is None:
        return None
    names = dataset.class_names
    return {
        "matched": [names[label] for label in sorted(label_map)],
        "dataset_categories_without_class": list(getattr(dataset, "absent_categories", ())),
        "classes_not_in_dataset": list(getattr(dataset, "classes_not_in_coco", ())),
    }


def _only_labels(detections: Sequence[Detections], labels: Any) -> list[Detections]:
    import torch

    wanted = torch.tensor(sorted(labels), dtype=torch.int64)
    kept = []
    for d in detections:
        keep = torch.isin(torch.as_tensor(d.labels), wanted)
        kept.append(Detections(d.boxes[keep], d.labels[keep], d.scores[keep]))
    return kept


def load_reference(path: Path, model: ModelConfig, detector: Detector) -> Detector:
    """The reference checkpoint of a fidelity evaluation; a plain file gets the model's arch, labels and
    builder options, a qcompress checkpoint its own sidecar."""
    from qcompress.core.checkpoints import sidecar_path

    path = Path(path)
    if sidecar_path(path).is_file():
        reference = load_detector(path, labels=model.labels)
    else:
        options = dict(detector.spec.options) or None
        reference = load_detector(path, arch=model.arch or detector.spec.arch, labels=model.labels, options=options)
    if len(reference.class_names) != len(detector.class_names):
        raise QCompressError(
            f"the reference {path.name} has {len(reference.class_names)} classes, the model {len(detector.class_names)}",
            "pass the float checkpoint the model was compressed from",
        )
    return reference


def evaluate_fidelity(
    detector: Detector,
    reference_detector: Detector,
    dataset: DetectionDataset,
    limit: int | None = None,
    batch_size: int = 16,
    progress: Progress = no_progress,
    score_threshold: float = 0.5,
    *,
    detections: Sequence[Detections] | None = None,
    reference_detections: Sequence[Detections] | None = None,
    iou: float = 0.5,
) -> tuple[EvalResult, dict[str, Any]]:
    """``detector`` scored against ``reference_detector``'s own detections (``score >= score_threshold``)
    on the first ``limit`` images of ``dataset``: no labels needed. Returns an :class:`EvalResult` whose
    mAP is the fidelity AP50 and the full :func:`qcompress.metrics.fidelity.fidelity_scores` dict.
    ``detections`` / ``reference_detections``, when given, are reused instead of running a model."""
    from qcompress.metrics.fidelity import fidelity_scores

    if len(reference_detector.class_names) != len(detector.class_names):
        raise QCompressError(
            f"reference has {len(reference_detector.class_names)} classes, the model {len(detector.class_names)}",
            "compare a compressed model with the float model it came from",
        )
    indices = limited_indices(dataset, limit)
    started = time.perf_counter()
    if detections is None:
        detections = predict_dataset(detector, dataset, indices, batch_size=batch_size,
                                     on_batch=progress("model", len(indices)))
    if reference_detections is None:
        reference_detections = predict_dataset(reference_detector, dataset, indices, batch_size=batch_size,
                                               on_batch=progress("reference", len(indices)))
    if not len(detections) == len(reference_detections) == len(indices):
        raise QCompressError(
            f"{len(detections)} model and {len(reference_detections)} reference results for {len(indices)} images",
            "pass detections for the same first images of the dataset",
        )
    metric_started = time.perf_counter()
    scores = fidelity_scores(reference_detections, detections, detector.class_names, score_threshold, iou)
    done = time.perf_counter()
    scores["reference"] = {"path": reference_detector.source.get("path"), "sha256": reference_detector.source.get("sha256")}
    result = EvalResult("fidelity-AP50", scores["AP50"], scores["ap_per_class"], len(indices), scores["num_pseudo_gt"],
                        done - started, done - metric_started, {"fidelity": scores})
    return result, scores


def model_summary(detector: Detector) -> dict[str, Any]:
    source = getattr(detector, "source", {}) or {}
    sidecar = source.get("sidecar") or {}
    return {
        "path": source.get("path"),
        "sha256": source.get("sha256"),
        "arch": detector.spec.arch,
        "classes": list(detector.class_names),
        "input_size": list(detector.spec.input_size),
        "quantization": sidecar.get("quantization"),
        "compression": sidecar.get("compression", []),
    }


def add_overlap_and_fidelity_sections(report: Report, extra: dict[str, Any], heading: str = "Fidelity vs reference") -> None:
    """Report sections, right after the summary: the class-overlap note and the fidelity table."""
    sections = []
    overlap = extra.get("class_overlap")
    if overlap is not None and not overlap["matched"]:
        sections.append(("Class overlap", (
            "**No class of the model is annotated in this dataset**: mAP is not applicable (null in the JSON). "
            f"Model classes: {', '.join(overlap['classes_not_in_dataset']) or '-'}; dataset categories: "
            f"{', '.join(overlap['dataset_categories_without_class']) or '-'}. "
            + ("Fidelity to the reference model is below." if extra.get("fidelity") is not None
               else "Use `--reference FP32.pth` to measure fidelity to the float model instead."))))
    elif overlap is not None and overlap["classes_not_in_dataset"]:
        sections.append(("Class overlap", (
            f"Scored classes: {', '.join(overlap['matched'])}. Not annotated in this dataset (detections left out): "
            f"{', '.join(overlap['classes_not_in_dataset'])}.")))
    fidelity = extra.get("fidelity")
    if fidelity is not None:
        ref = (fidelity.get("reference") or {}).get("path")
        rows = [
            ["AP50 (VOC area, vs pseudo ground truth)", fidelity["AP50"]],
            ["AP .50:.95 (COCO, pycocotools)", fidelity.get("AP50_95", float("nan"))],
            ["recall of pseudo ground truth (test score >= threshold)", fidelity["recall"]],
            ["recall, any test score", fidelity["recall_any_score"]],
            ["precision (test score >= threshold)", fidelity["precision"]],
            ["mean IoU of matched boxes", fidelity["mean_iou"]],
            ["score drift, mean abs(test - ref)", fidelity["score_drift_abs"]],
            ["score drift, mean (test - ref)", fidelity["score_drift_signed"]],
            ["pseudo ground-truth boxes", fidelity["num_pseudo_gt"]],
            ["matched pairs", fidelity["num_matched"]],
            ["images", fidelity["num_images"]],
        ]
        body = md_table(["", "value"], rows) + (
            f"\n\nPseudo ground truth: the reference's detections with score >= {fidelity['score_threshold']}"
            + (f" ({Path(ref).name})" if ref else "") + f"; matches at IoU >= {fidelity['iou_threshold']}. "
            "1.0 / 1.0 / 0 means the detections are unchanged.")
        if len(fidelity["ap_per_class"]) > 1:
            body += "\n\n" + md_table(["class", "fidelity AP50", "pseudo gt"], [
                [c, ap, fidelity["num_pseudo_gt_per_class"].get(c, 0)] for c, ap in sorted(fidelity["ap_per_class"].items())])
        sections.append((heading, body))
    at = 1 if report.sections else 0
    report.sections[at:at] = sections


def output_names(detector: Detector, count: int) -> list[str]:
    """Names of the network's raw outputs as the architecture declares them (``output 0, 1 ...`` otherwise)."""
    from qcompress.models.registry import compression_spec

    names = list(compression_spec(detector.spec.arch).output_names)
    return names[:count] if len(names) >= count else [f"output {i}" for i in range(count)]
