"""``qcompress models`` and ``qcompress eval``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qcompress.cli.common import command, console, rich_progress
from qcompress.cli.options import (
    Ann,
    Arch,
    DataDir,
    DatasetKind,
    InputSize,
    Labels,
    Limit,
    ModelPath,
    OutDir,
    ReportName,
    Runtime,
    Seed,
    Split,
    Threads,
)


@command
def models_cmd() -> None:
    """List the architectures qcompress can build, load and compress."""
    from qcompress.models.registry import list_archs

    table = Table(title="architectures")
    table.add_column("name", style="bold")
    table.add_column("description")
    for info in list_archs():
        table.add_row(info.name, info.description)
    console.print(table)
    from qcompress.defaults import EMBEDDED_PREFIX, embedded_models

    console.print("embedded checkpoints (--model-path): " + ", ".join(EMBEDDED_PREFIX + n for n in embedded_models()))


@command
def eval_cmd(
    model_path: ModelPath = None,
    arch: Arch = None,
    labels: Labels = None,
    input_size: InputSize = None,
    runtime: Runtime = None,
    threads: Threads = None,
    dataset: DatasetKind = "voc",
    data: DataDir = None,
    split: Split = "test",
    ann: Ann = None,
    metric: Annotated[str | None, typer.Option(help="voc07 (11-point), voc (area), or coco. Default: voc07 for VOC, coco for COCO.")] = None,
    limit: Limit = None,
    batch_size: Annotated[int, typer.Option(help="Images per inference batch.")] = 16,
    seed: Seed = 0,
    report_name: ReportName = None,
    out_dir: OutDir = Path("eval_results"),
    reference: Annotated[Path | None, typer.Option(help="Float checkpoint to compare with: its own detections (score >= --reference-score) are the ground truth, so no labels are needed.")] = None,
    reference_score: Annotated[float, typer.Option(help="Score threshold that makes a reference detection pseudo ground truth.")] = 0.5,
) -> None:
    """Measure mAP of a checkpoint on Pascal VOC (07 11-point or area AP) or COCO (pycocotools), per class.

    Writes eval_results/<name>.json and .md with the per-class table, mAP, image/object counts,
    model sha256 and sidecar, timing, seed and library versions.
    """
    from qcompress import api

    config = api.EvalConfig(
        api.ModelConfig(model_path, arch, labels, input_size, runtime, threads),
        api.DataConfig(dataset, data, split, ann, limit),
        metric,
        batch_size,
        seed,
        report_name,
        out_dir,
        reference,
        reference_score,
    )
    with rich_progress() as progress:
        result, report = api.evaluate(config, progress=progress)
    overlap = result.extra.get("class_overlap")
    if overlap is not None and not overlap["matched"]:
        console.print(
            f"[bold yellow]no class overlap:[/] the dataset annotates {', '.join(overlap['dataset_categories_without_class']) or 'nothing'}, "
            f"the model detects {', '.join(overlap['classes_not_in_dataset'])}: mAP is not applicable"
            + ("." if reference else " (use --reference FP32.pth for fidelity to the float model).")
        )
    else:
        table = Table(title=f"{result.metric} AP — {report.name}")
        table.add_column("class")
        table.add_column("AP", justify="right")
        for name, ap in sorted(result.ap_per_class.items()):
            table.add_row(name, "– (no objects of this class in these images)" if math.isnan(ap) else f"{ap:.4f}")
        table.add_row("[bold]mAP", f"[bold]{result.mAP:.4f}")
        console.print(table)
    fidelity = result.extra.get("fidelity")
    if fidelity is not None:
        table = Table(title=f"fidelity vs {reference.name} (score >= {reference_score})")
        table.add_column("")
        table.add_column("value", justify="right")
        for label, key in (("AP50", "AP50"), ("AP .50:.95", "AP50_95"), ("recall @ threshold", "recall"), ("mean IoU (matched)", "mean_iou"),
                           ("score drift |test - ref|", "score_drift_abs"), ("score drift (test - ref)", "score_drift_signed")):
            table.add_row(label, f"{fidelity[key]:+.4f}" if key == "score_drift_signed" else f"{fidelity[key]:.4f}")
        table.add_row("pseudo gt / matched", f"{fidelity['num_pseudo_gt']} / {fidelity['num_matched']}")
        console.print(table)
    console.print(
        f"{result.num_images} images, {result.num_objects} objects, {result.seconds:.1f} s "
        f"({result.images_per_second:.1f} images/s). Report: {out_dir / report.name}.json/.md"
    )
