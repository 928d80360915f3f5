"""``qcompress eval``: mAP of one checkpoint on one dataset, with a JSON + Markdown report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qcompress.core import (
    DataConfig,
    EvalResult,
    ModelConfig,
    Progress,
    add_overlap_and_fidelity_sections,
    class_overlap,
    evaluate_detector,
    evaluate_fidelity,
    load_dataset,
    load_model,
    load_reference,
    model_summary,
    no_progress,
)
from qcompress.core.checkpoints import versions
from qcompress.core.context import restores_torch_state
from qcompress.defaults import DEFAULT_REPORTS
from qcompress.errors import QCompressError
from qcompress.io_utils import check_writable
from qcompress.models.detector import Detector
from qcompress.reports import Report, md_table, write_report


@dataclass(frozen=True)
class EvalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metric: str | None = None  # default: voc07 for VOC data, coco for COCO data
    batch_size: int = 16
    seed: int = 0
    report_name: str | None = None
    out_dir: Path = DEFAULT_REPORTS
    reference: Path | None = None  # fp32 checkpoint whose detections (score >= reference_score) are pseudo labels
    reference_score: float = 0.5


@restores_torch_state
def evaluate(config: EvalConfig, progress: Progress = no_progress) -> tuple[EvalResult, Report]:
    """``qcompress eval``: mAP of one checkpoint on one dataset, with a JSON + Markdown report."""
    if config.batch_size < 1:
        raise QCompressError(f"--batch-size must be positive, got {config.batch_size}", "e.g. --batch-size 16")
    if not 0.0 <= config.reference_score <= 1.0:
        raise QCompressError(f"--reference-score must be in [0, 1], got {config.reference_score}", "e.g. 0.5")
    check_writable(config.out_dir, "--out-dir", is_dir=True)
    if config.model.threads is not None:
        if config.model.threads < 1:
            raise QCompressError(f"--threads must be positive, got {config.model.threads}", "e.g. --threads 1")
        torch.set_num_threads(config.model.threads)  # restored by @restores_torch_state
    detector = load_model(config.model)
    dataset = load_dataset(config.data, detector.class_names)
    metric = config.metric or ("coco" if config.data.dataset == "coco" else "voc07")
    result, detections = evaluate_detector(detector, dataset, metric, config.data.limit, config.batch_size, progress)
    overlap = class_overlap(dataset)
    if overlap is not None:
        result.extra["class_overlap"] = overlap
    if config.reference is not None:
        reference = load_reference(config.reference, config.model, detector)
        _, fidelity = evaluate_fidelity(
            detector, reference, dataset, config.data.limit, config.batch_size, progress, config.reference_score,
            detections=detections,
        )
        result.extra["fidelity"] = fidelity
    name = config.report_name or f"eval-{Path(detector.source['path']).stem}"
    report = eval_report(name, detector, result, config)
    add_overlap_and_fidelity_sections(report, result.extra)
    write_report(report, config.out_dir)
    return result, report


def eval_report(name: str, detector: Detector, result: EvalResult, config: EvalConfig) -> Report:
    report = Report(name, f"Evaluation of {Path(detector.source['path']).name}")
    report.data.update(
        {
            "command": "eval",
            "model": model_summary(detector),
            "data": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config.data).items()},
            "metric": result.metric,
            "mAP": result.mAP,
            "ap_per_class": result.ap_per_class,
            "num_images": result.num_images,
            "num_objects": result.num_objects,
            "seconds": result.seconds,
            "metric_seconds": result.metric_seconds,
            "images_per_second": result.images_per_second,
            "seed": config.seed,
            "versions": versions(),
            **result.extra,
        }
    )
    report.add(
        "Summary",
        md_table(
            ["metric", "mAP", "images", "objects", "seconds", "images/s"],
            [[result.metric, result.mAP, result.num_images, result.num_objects, result.seconds, result.images_per_second]],
        ),
    )
    if result.ap_per_class:
        report.add("Per class", md_table(["class", "AP"], sorted(result.ap_per_class.items())))
    if "coco" in result.extra:
        report.add("COCO", md_table(list(result.extra["coco"]), [list(result.extra["coco"].values())]))
    report.add("Model", md_table(["field", "value"], [[k, v] for k, v in model_summary(detector).items() if k != "classes"]))
    return report
