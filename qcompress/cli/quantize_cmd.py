"""``qcompress quantize``."""

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


@command
def quantize_cmd(
    model_path: ModelPath = None,
    arch: Arch = None,
    labels: Labels = None,
    input_size: InputSize = None,
    dataset: DatasetKind = "voc",
    data: DataDir = None,
    split: Split = "test",
    ann: Ann = None,
    limit: Limit = None,
    backend: Annotated[str, typer.Option(help="x86 (fbgemm/onednn kernels) or qnnpack (ARM-style).")] = "x86",
    observer: Annotated[str, typer.Option(help="Activation observer: minmax, moving-avg, histogram or percentile.")] = "histogram",
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel or per tensor.")] = True,
    calib_images: Annotated[int, typer.Option(help="Calibration images (deterministic subset of the train split).")] = 200,
    calib_split: Annotated[str, typer.Option(help="VOC image set calibration images come from.")] = "train",
    skip: Annotated[list[str] | None, typer.Option(help="Keep layers matching this glob in float (repeatable).")] = None,
    equalize: Annotated[bool, typer.Option(help="Cross-layer equalization (replaces ReLU6 by ReLU; recorded).")] = False,
    absorb_bias: Annotated[bool, typer.Option(help="High-bias absorption from BN statistics.")] = False,
    bias_correction: Annotated[str | None, typer.Option(help="analytic (BN statistics) or empirical (calibration images).")] = None,
    data_free: Annotated[bool, typer.Option(help="No images at all: CLE + absorption + analytic bias correction + ranges from BN.")] = False,
    adaround: Annotated[bool, typer.Option(help="AdaRound: learn each weight's rounding (up/down) from the calibration images, layer by layer.")] = False,
    adaround_iters: Annotated[int, typer.Option(help="AdaRound optimisation steps per layer.")] = 500,
    weight_bits: Annotated[int, typer.Option(help="Weight bits: 8 (W8A8) or 4 (W4A8: 16 levels inside the int8 kernels).")] = 8,
    max_drop: Annotated[float | None, typer.Option(help="Accuracy target: keep the fewest layers float (ranked by sensitivity) so that mAP drops at most this many points below fp32 (0.5 = 0.005 mAP); on data without labels for the classes, points of fidelity AP50. Searched on the evaluation images (--limit).")] = None,
    max_drop_ranking: Annotated[str, typer.Option(help="How --max-drop ranks layers: sqnr (one forward pass per layer on 8 calibration images: head-output SQNR gain of keeping it float) or measured (one evaluation per layer: the mAP/fidelity gain itself).")] = "sqnr",
    recipe_table: Annotated[bool, typer.Option(help="Instead of one model: evaluate the data-free recipe ladder (naive per-tensor, +CLE, +absorption, +bias correction, data-free, per-channel, calibrated).")] = False,
    out: Annotated[Path | None, typer.Option(help="Output checkpoint. Default: trained_models/quantized/<model>-<recipe>.pth")] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate fp32 and int8 on --split.")] = True,
    runs: Annotated[int, typer.Option(help="Timed latency runs (after warm-up).")] = 20,
    threads: Annotated[int | None, typer.Option(help="Torch threads for latency (default: torch's).")] = None,
    onnx_latency: Annotated[bool, typer.Option("--onnx-latency/--no-onnx-latency", help="Also export fp32 and int8 to ONNX and time them in ONNX Runtime (--threads intra-op threads, default 1).")] = True,
    seed: Seed = 0,
    report_name: ReportName = None,
    out_dir: OutDir = Path("eval_results"),
) -> None:
    """Quantize a float checkpoint to int8 with PyTorch eager mode and compare it with its parent.

    Fuses Conv+BN(+ReLU/ReLU6), attaches observers, calibrates on real images (or, with --data-free,
    on BN statistics), converts to torch.ao.nn.quantized modules and saves a checkpoint that
    `qcompress eval` reloads. The report has fp32 vs int8 mAP per class, latency, size, the recipe
    and the layers with the lowest SQNR.
    """
    from qcompress import api
    from qcompress.jobs.onnx_latency import latency_cells, onnx_rows

    config = api.QuantizeJobConfig(
        model=api.ModelConfig(model_path, arch, labels, input_size),
        data=api.DataConfig(dataset, data, split, ann, limit),
        backend=backend, observer=observer, per_channel=per_channel, calib_images=calib_images,
        calib_split=calib_split, skip=tuple(skip or ()), equalize=equalize, absorb_bias=absorb_bias,
        bias_correction=bias_correction, data_free=data_free, seed=seed, out=out, evaluate=evaluate,
        latency_runs=runs, threads=threads, report_name=report_name, out_dir=out_dir, onnx_latency=onnx_latency,
        adaround=adaround, adaround_iters=adaround_iters, weight_bits=weight_bits, max_drop=max_drop,
        max_drop_ranking=max_drop_ranking,
    )
    if recipe_table:
        with rich_progress() as progress:
            fp32, rows, report = api.recipe_table(config, progress=progress)
        table = Table(title=f"int8 recipes — {report.name}")
        for col in ("recipe", "mAP", "of fp32"):
            table.add_column(col, justify="left" if col == "recipe" else "right")
        table.add_row("fp32", f"{fp32:.4f}", "1.000")
        for row in rows:
            table.add_row(row.name, f"{row.score:.4f}", f"{row.relative:.3f}")
        console.print(table)
        console.print(f"report {out_dir / report.name}.md")
        return
    with rich_progress() as progress:
        result, report = api.quantize(config, progress=progress)
    table = Table(title=f"fp32 vs int8 — {result.out.name}")
    for col in ("", "fp32", "int8", "int8/fp32"):
        table.add_column(col, justify="right" if col else "left")
    if result.fp32 and result.int8 and result.fp32.num_objects:
        table.add_row(f"mAP ({result.fp32.metric})", f"{result.fp32.mAP:.4f}", f"{result.int8.mAP:.4f}",
                      f"{result.int8.mAP / result.fp32.mAP:.3f}" if result.fp32.mAP else "–")
    table.add_row("latency ms (median), torch eager", f"{result.fp32_latency.median_ms:.1f}",
                  f"{result.int8_latency.median_ms:.1f}",
                  f"{result.int8_latency.median_ms / result.fp32_latency.median_ms:.3f}")
    for row in onnx_rows(result.timing)[:1] if result.timing is not None else []:
        table.add_row("latency ms (median), ONNX Runtime", *latency_cells(row[1:]))
    table.add_row("size MB", f"{result.fp32_bytes / 1e6:.2f}", f"{result.int8_bytes / 1e6:.2f}",
                  f"{result.int8_bytes / result.fp32_bytes:.3f}")
    console.print(table)
    if result.fidelity is not None:
        f = result.fidelity
        console.print(
            f"fidelity of int8 vs fp32 (no labels for these classes in the data): AP50 {f['AP50']:.4f}, "
            f"recall {f['recall']:.3f}, mean IoU {f['mean_iou']:.3f}, score drift {f['score_drift_signed']:+.3f}"
        )
    if result.search is not None:
        s = result.search
        console.print(
            f"--max-drop {s['points']:g}: {s['metric']} fp32 {s['reference']:.4f}, target >= {s['target']:.4f}; "
            f"{len(s['trials'])} splits tried; kept float: {len(s['float_layers'])} layer(s)"
            + (f" ({', '.join(s['float_layers'][:6])}{', …' if len(s['float_layers']) > 6 else ''})"
               if s["float_layers"] else "")
            + f"; final {s['final_score']:.4f} ({'met' if s['final_meets'] else 'MISSED'})")
    for step in result.steps:
        console.print(f"[dim]{step['step']}:[/] {step.get('summary', '')}")
    if result.parts:
        int8 = [p for p, q, _ in result.parts if q.startswith("int8")]
        kept = [p for p, q, _ in result.parts if q == "float"]
        console.print(f"[dim]int8:[/] {', '.join(int8)}; [dim]float:[/] {', '.join(kept)}")
    console.print(f"saved {result.out}; report {out_dir / report.name}.md")
