"""``qcompress export``: a float, pruned, QAT or int8 checkpoint as an ONNX file that carries its recipe,
verified in ONNX Runtime against the torch model before anything is written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from qcompress.core import (
    DataConfig,
    ModelConfig,
    Progress,
    calibration_batches,
    calibration_dataset,
    load_model,
    model_summary,
    no_progress,
    resolve_model_path,
)
from qcompress.core.context import restores_torch_state
from qcompress.defaults import DEFAULT_REPORTS, TRAINED_MODELS, WEIGHTS
from qcompress.errors import QCompressError
from qcompress.io_utils import check_writable, versions
from qcompress.reports import Report, md_table, write_report


@dataclass(frozen=True)
class ExportConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # where the verification images come from
    out: Path | None = None  # default: default_onnx_path(checkpoint)
    samples: int = 8  # images the export is verified on
    sample_split: str = "test"
    min_sqnr_db: float | None = None  # default: 50 dB float, 20 dB int8 (against our eager int8)
    opset: int = 17
    seed: int = 0
    report_name: str | None = None
    out_dir: Path = DEFAULT_REPORTS


def default_onnx_path(parent: Path) -> Path:
    """Beside the checkpoint (``model.pth`` -> ``model.onnx``), except for a checkpoint shipped in the
    package: its ONNX goes under ``trained_models/onnx/`` like every derived file, never into the
    installed package."""
    if parent.resolve().parent == WEIGHTS.resolve():
        return TRAINED_MODELS / "onnx" / f"{parent.stem}.onnx"
    return parent.with_suffix(".onnx")


@restores_torch_state
def export(config: ExportConfig, progress: Progress = no_progress):
    """Export, verify (output SQNR in ONNX Runtime against our torch model) and report; returns
    ``(ExportRecord, Report)``."""
    from qcompress.runtime.onnx_export import export_onnx

    if config.samples < 1:
        raise QCompressError(f"--samples must be positive, got {config.samples}", "e.g. 8")
    if config.min_sqnr_db is not None and not math.isfinite(config.min_sqnr_db):
        raise QCompressError(f"--min-sqnr must be a number of dB, got {config.min_sqnr_db}",
                             "e.g. --min-sqnr 30 (omit it for 50 dB float, 20 dB int8)")
    parent = resolve_model_path(config.model)
    out = Path(config.out) if config.out is not None else default_onnx_path(parent)
    if out.suffix.lower() != ".onnx":
        raise QCompressError(f"--out {out} should end in .onnx", "e.g. --out model.onnx")
    check_writable(out, "--out")
    check_writable(config.out_dir, "--out-dir", is_dir=True)
    if parent.suffix.lower() == ".onnx":  # before loading it into ONNX Runtime for nothing
        raise QCompressError(f"{parent} is already an ONNX model", "export a .pth checkpoint")
    detector = load_model(config.model)
    dataset = calibration_dataset(config.data, detector.class_names, config.sample_split)
    advance = progress("verification images", config.samples)
    batches = calibration_batches(detector, dataset, config.samples, config.seed, batch_size=config.samples)
    advance(config.samples)
    record = export_onnx(detector, out, batches[0], opset=config.opset, min_sqnr_db=config.min_sqnr_db)
    report = Report(config.report_name or f"export-{out.stem}", f"ONNX export of {parent.name}")
    rows = [["file", str(record.path)], ["precision", record.precision], ["size bytes", record.size_bytes],
            ["verified on", f"{record.verified_images} images vs {record.reference}"],
            ["output SQNR dB", ", ".join(f"{v:.1f}" for v in record.sqnr_db)],
            ["integer kernels in ONNX Runtime's graph", ", ".join(f"{k} {v}" for k, v in record.int8_kernels.items())
             or "none"],
            ["float convolutions / matmuls left", ", ".join(f"{k} {v}" for k, v in record.float_kernels.items())
             or "none"]]
    if record.recipe_sqnr_db is not None:
        rows.insert(5, ["output SQNR dB vs our recipe in float arithmetic",
                        ", ".join(f"{v:.1f}" for v in record.recipe_sqnr_db)])
    report.add("Export", md_table(["", "value"], rows)
               + f"\n\nInput `{record.input_name}`: NCHW float32, normalised as the sidecar "
               f"`{record.sidecar_path.name}` states; outputs {', '.join(record.output_names)} are the raw head "
               "outputs (decoding and NMS stay in qcompress: `qcompress eval -m model.onnx`).")
    report.data.update({"command": "export", "model": model_summary(detector), "export": record.as_dict(),
                        "seed": config.seed, "versions": versions()})
    write_report(report, config.out_dir)
    return record, report
