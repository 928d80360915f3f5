"""``qcompress export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qcompress.cli.common import command, console, rich_progress
from qcompress.cli.options import (
    Ann,
    Arch,
    DataDir,
    DatasetKind,
    InputSize,
    Labels,
    ModelPath,
    OutDir,
    ReportName,
    Seed,
)


@command
def export_cmd(
    model_path: ModelPath = None,
    arch: Arch = None,
    labels: Labels = None,
    input_size: InputSize = None,
    out: Annotated[Path | None, typer.Option(help="The .onnx file to write. Default: the checkpoint's path with .onnx; trained_models/onnx/NAME.onnx for an embedded checkpoint.")] = None,
    dataset: DatasetKind = "voc",
    data: DataDir = None,
    ann: Ann = None,
    samples: Annotated[int, typer.Option(help="Images the export is verified on in ONNX Runtime.")] = 8,
    min_sqnr: Annotated[float | None, typer.Option(help="Refuse below this output SQNR (dB). Default: 50 float, 20 int8.")] = None,
    seed: Seed = 0,
    report_name: ReportName = None,
    out_dir: OutDir = Path("eval_results"),
) -> None:
    """Export a float, pruned, QAT or int8 checkpoint to ONNX and verify it in ONNX Runtime.

    An int8 checkpoint becomes a QDQ graph with exactly our weights, weight scales and calibrated
    activation ranges (ONNX Runtime fuses it into QLinearConv kernels). Only the network is exported
    (input `images`, NCHW float32, dynamic batch); decoding and NMS stay in qcompress, so
    `qcompress eval/bench/compare/detect -m model.onnx` measure the deployed file. Writes MODEL.onnx,
    MODEL.onnx.json (sidecar) and a report.
    """
    from qcompress import api

    config = api.ExportConfig(
        model=api.ModelConfig(model_path, arch, labels, input_size),
        data=api.DataConfig(dataset, data, "test", ann),
        out=out, samples=samples, min_sqnr_db=min_sqnr, seed=seed, report_name=report_name, out_dir=out_dir,
    )
    with rich_progress() as progress:
        record, report = api.export(config, progress=progress)
    console.print(
        f"{record.precision} ONNX: {record.path} ({record.size_bytes / 1e6:.2f} MB); output SQNR vs "
        f"{record.reference}: {', '.join(f'{v:.1f}' for v in record.sqnr_db)} dB on {record.verified_images} images; "
        f"int8 kernels: {sum(record.int8_kernels.values())}. Report: {out_dir / report.name}.md"
    )
