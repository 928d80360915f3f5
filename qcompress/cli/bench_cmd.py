"""``qcompress bench``, ``qcompress compare`` and ``qcompress detect``."""

from __future__ import annotations

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
    Seed,
    Split,
)

ModelPaths = Annotated[
    list[Path] | None,
    typer.Option(
        "--model-path", "-m",
        help="Checkpoint (.pth); repeat to compare several, ratios are to the first. Default: the embedded default model.",
    ),
]
Runs = Annotated[int, typer.Option(help="Timed forward passes per measurement (after the warm-up).")]
Warmup = Annotated[int, typer.Option(help="Untimed forward passes before timing.")]
Threads = Annotated[int | None, typer.Option(help="Torch intra-op threads while timing (default: torch's).")]
ScoreThreshold = Annotated[float, typer.Option(help="Draw detections scoring at least this.")]


def _comparison_table(title: str, labels: list[str], values: list[dict[str, float]]) -> Table:
    from qcompress.jobs.bench import comparison_rows

    headers, rows = comparison_rows(labels, values)
    table = Table(title=title)
    for i, header in enumerate(headers):
        is_ratio = i >= 2 and (i - 1) % 2 == 0
        table.add_column(header, justify="left" if i == 0 else "right", style="cyan" if is_ratio else None)
    for row in rows:
        table.add_row(*row)
    return table


@command
def bench_cmd(
    model_path: ModelPaths = None,
    arch: Arch = None,
    labels: Labels = None,
    input_size: InputSize = None,
    batch_size: Annotated[
        list[int] | None, typer.Option(help="Extra batch sizes to time (repeatable); batch 1 is always timed.")
    ] = None,
    runs: Runs = 50,
    warmup: Warmup = 10,
    threads: Threads = None,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Measure peak memory of a forward pass.")] = True,
    seed: Seed = 0,
    report_name: ReportName = None,
    out_dir: OutDir = Path("eval_results"),
) -> None:
    """Latency (median, p90, min, images/s), peak memory, size on disk, parameters, MACs and BOPs of
    one or more checkpoints, with ratios to the first.

    Times the network's forward pass (no NMS) on random input after a warm-up. Quantized models
    run on the backend they were built for. Writes eval_results/<name>.json and .md.
    """
    from qcompress.jobs.bench import BenchConfig, bench

    config = BenchConfig(
        model_paths=tuple(model_path or (None,)), arch=arch, labels=labels, input_size=input_size,
        batch_sizes=tuple(batch_size or ()), runs=runs, warmup=warmup, threads=threads, seed=seed, memory=memory,
        report_name=report_name, out_dir=out_dir,
    )
    config.validate()  # option errors print before any progress display
    with rich_progress() as progress:
        result, report = bench(config, progress=progress)
    console.print(_comparison_table(f"benchmark (ratios to {result.labels[0]})", result.labels, result.values))
    table = Table(title="latency per batch size")
    for col in ("model", "batch", "median ms", "p90 ms", "min ms", "ms / image", "images/s", "peak MB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in result.models:
        for b, s in m.latency.items():
            peak = m.memory.get(b)
            table.add_row(m.label, str(b), f"{s.median_ms:.2f}", f"{s.p90_ms:.2f}", f"{s.min_ms:.2f}",
                          f"{s.median_ms / b:.2f}", f"{s.images_per_second:.1f}",
                          f"{peak.peak_bytes / 1e6:.1f}" if peak else "–")
    console.print(table)
    first = result.models[0].latency[1]
    precision = ", ".join(f"{m.label}: int8 ({m.backend})" if m.quantized else f"{m.label}: float32" for m in result.models)
    console.print(
        f"{first.runs} timed runs after {first.warmup} warm-up, {first.threads} threads, input "
        f"{'x'.join(map(str, result.models[0].input_size))}; {precision}. Report: {out_dir / report.name}.json/.md"
    )


@command
def compare_cmd(
    model_path: ModelPaths = None,
    arch: Arch = None,
    labels: Labels = None,
    input_size: InputSize = None,
    dataset: DatasetKind = "voc",
    data: DataDir = None,
    split: Split = "test",
    ann: Ann = None,
    metric: Annotated[str | None, typer.Option(help="voc07, voc or coco. Default: voc07 for VOC, coco for COCO.")] = None,
    limit: Limit = None,
    batch_size: Annotated[int, typer.Option(help="Images per inference batch for the accuracy pass.")] = 16,
    images: Annotated[int, typer.Option(help="Gallery images (spread over the evaluated ones) drawn side by side.")] = 6,
    score_threshold: ScoreThreshold = 0.4,
    ground_truth: Annotated[bool, typer.Option("--ground-truth/--no-ground-truth", help="Show a ground-truth panel first.")] = True,
    runs: Runs = 50,
    warmup: Warmup = 10,
    threads: Threads = None,
    seed: Seed = 0,
    report_name: ReportName = None,
    out_dir: OutDir = Path("eval_results"),
) -> None:
    """mAP, latency and size of several checkpoints on the same images, in one report, with a gallery
    of those images showing each model's detections side by side.

    Writes eval_results/<name>.json and .md, and the gallery pictures in eval_results/<name>_images/
    (linked from the Markdown).
    """
    from qcompress import api
    from qcompress.jobs.bench import CompareConfig, compare

    config = CompareConfig(
        model_paths=tuple(model_path or (None,)), arch=arch, labels=labels, input_size=input_size,
        data=api.DataConfig(dataset, data, split, ann, limit), metric=metric, batch_size=batch_size, gallery=images,
        score_threshold=score_threshold, ground_truth=ground_truth, runs=runs, warmup=warmup, threads=threads,
        seed=seed, report_name=report_name, out_dir=out_dir,
    )
    config.validate()
    with rich_progress() as progress:
        result, report = compare(config, progress=progress)
    console.print(_comparison_table(f"comparison (ratios to {result.labels[0]})", result.labels, result.values))
    first = result.accuracy[0]
    console.print(
        f"{first.metric} on {first.num_images} images ({first.num_objects} objects). "
        f"{len(result.gallery)} gallery images in {out_dir / (report.name + '_images')}. "
        f"Report: {out_dir / report.name}.json/.md"
    )


@command
def detect_cmd(
    image: Annotated[Path, typer.Option(help="Image file to run the detector on.")],
    model_path: ModelPath = None,
    arch: Arch = None,
    labels: Labels = None,
    input_size: InputSize = None,
    out: Annotated[Path | None, typer.Option(help="Picture with the detections drawn (.jpg/.png). Default: eval_results/<image>-detections.jpg")] = None,
    score_threshold: ScoreThreshold = 0.4,
) -> None:
    """Detect objects in one image: print them and save the picture with boxes, class names and scores."""
    from qcompress import api
    from qcompress.errors import QCompressError
    from qcompress.jobs.bench import detect_image

    if not image.is_file():  # before loading the model: fail fast
        raise QCompressError(f"image not found: {image}", "pass --image to an existing image file")
    out = out or Path("eval_results") / f"{image.stem}-detections.jpg"
    detector = api.load_model(api.ModelConfig(model_path, arch, labels, input_size))
    detections = detect_image(detector, image, out, score_threshold)
    table = Table(title=f"{len(detections)} detections (score >= {score_threshold}) — {image.name}")
    for col in ("class", "score", "x1", "y1", "x2", "y2"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for box, label, score in zip(detections.boxes.tolist(), detections.labels.tolist(), detections.scores.tolist()):
        table.add_row(detector.class_names[label], f"{score:.3f}", *(f"{v:.1f}" for v in box))
    console.print(table)
    console.print(f"saved {out}")

