"""``qcompress prune``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qcompress.cli.common import command, console, rich_progress
from qcompress.cli.options import (
    IMITATION_WEIGHT,
    Ann,
    Arch,
    DataDir,
    DatasetKind,
    DistillOutputs,
    Imitation,
    InputSize,
    Labels,
    Limit,
    ModelPath,
    OutDir,
    PseudoLabels,
    Psi,
    ReportName,
    Seed,
    Split,
    Teacher,
    Temperature,
)


@command
def prune_cmd(
    model_path: ModelPath = None,
    arch: Arch = None,
    labels: Labels = None,
    input_size: InputSize = None,
    dataset: DatasetKind = "voc",
    data: DataDir = None,
    split: Split = "test",
    ann: Ann = None,
    limit: Limit = None,
    pseudo_labels: PseudoLabels = None,
    method: Annotated[str, typer.Option(help="l1-unstructured (zero the smallest weights) or channels (remove channels).")] = "l1-unstructured",
    amount: Annotated[float, typer.Option(help="Fraction in [0, 1): of the weights (unstructured) or of each channel group.")] = 0.2,
    scope: Annotated[str, typer.Option(help="Unstructured: global (one threshold) or layer (each layer by --amount).")] = "global",
    criterion: Annotated[str, typer.Option(help="Channels: l1 or l2 weight norm as channel importance.")] = "l1",
    round_to: Annotated[int, typer.Option(help="Channels: round kept widths to a multiple of this (0: exact).")] = 16,
    include_residual: Annotated[bool, typer.Option(help="Channels: also prune residual-coupled block outputs (one group per stage).")] = False,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tune epochs after pruning (train split; 0: none).")] = 0,
    lr: Annotated[float, typer.Option(help="Fine-tune peak learning rate (short warm-up, cosine decay).")] = 1e-3,
    train_limit: Annotated[int | None, typer.Option(help="Fine-tune on the first N training images only (quick runs).")] = None,
    teacher: Teacher = None,
    imitation: Imitation = IMITATION_WEIGHT,
    psi: Psi = 0.5,
    distill_outputs: DistillOutputs = 0.0,
    temperature: Temperature = 2.0,
    bn_reestimate: Annotated[bool, typer.Option("--bn-reestimate/--no-bn-reestimate", help="Recompute BN statistics with the fine-tuned network on 200 training images (off by default, see README).")] = False,
    sensitivity: Annotated[bool, typer.Option(help="Only analyse: prune each layer/group alone at several amounts, tabulate the mAP drop, write a suggested --amounts-file.")] = False,
    amounts_file: Annotated[Path | None, typer.Option(help='JSON {"layer or group name (glob ok)": amount}; others use --amount.')] = None,
    out: Annotated[Path | None, typer.Option(help="Output checkpoint. Default: trained_models/pruned/<model>-<method>-<amount>.pth")] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate parent and pruned model on --split.")] = True,
    runs: Annotated[int, typer.Option(help="Timed latency runs (after warm-up).")] = 20,
    threads: Annotated[int | None, typer.Option(help="Torch threads for the whole command: evaluation, fine-tuning, latency (default: torch's).")] = None,
    onnx_latency: Annotated[bool, typer.Option("--onnx-latency/--no-onnx-latency", help="Also export parent and pruned model to ONNX and time them in ONNX Runtime (--threads intra-op threads, default 1).")] = True,
    seed: Seed = 0,
    report_name: ReportName = None,
    out_dir: OutDir = Path("eval_results"),
) -> None:
    """Prune a float checkpoint and compare it with its parent: mAP, parameters, MACs, size, latency.

    --method l1-unstructured zeroes the smallest weights (globally or per layer) and saves them as
    zeros: fewer non-zero weights, same dense latency. --method channels removes whole channels and
    rewrites every dependent layer (BN, depthwise partner, next conv, SSD-Lite heads) so the network
    gets smaller and faster; the checkpoint reloads with `qcompress eval` and can be quantized.
    """
    from qcompress import api
    from qcompress.jobs.onnx_latency import latency_cells, onnx_rows
    from qcompress.jobs.prune import PruneJobConfig, prune
    from qcompress.training.distill import DistillConfig

    config = PruneJobConfig(
        model=api.ModelConfig(model_path, arch, labels, input_size),
        data=api.DataConfig(dataset, data, split, ann, limit, pseudo_labels),
        method=method, amount=amount, scope=scope, criterion=criterion, round_to=round_to,
        include_residual=include_residual, amounts_file=amounts_file, finetune_epochs=finetune_epochs, lr=lr,
        train_limit=train_limit, teacher=teacher, distill=DistillConfig(imitation, psi, distill_outputs, temperature),
        bn_reestimate=bn_reestimate,
        sensitivity=sensitivity, evaluate=evaluate, out=out, latency_runs=runs, threads=threads, seed=seed,
        report_name=report_name, out_dir=out_dir, onnx_latency=onnx_latency,
    )
    with rich_progress() as progress:
        result, report = prune(config, progress=progress)
    if result is None:  # a non-zero torchrun rank: rank 0 saves and reports
        return
    if sensitivity:
        scan = result.sensitivity
        table = Table(title=f"mAP drop, one {'group' if method == 'channels' else 'layer'} pruned alone (baseline {scan.baseline:.4f})")
        table.add_column("target")
        for a in scan.amounts:
            table.add_column(f"{a:g}", justify="right")
        for row in scan.rows()[:15]:
            table.add_row(row[0], *[f"{v:+.4f}" for v in row[1:]])
        console.print(table)
        console.print(f"suggested amounts: {result.amounts_out}; report {out_dir / report.name}.md")
        console.print("[yellow]each amount was measured with that target pruned alone: combined, the drops add up "
                      "- check the combination with --amounts-file[/]")
        return
    b, p = result.before, result.pruned
    table = Table(title=f"parent vs {method} {amount:g} — {result.out.name}")
    for col in ("", "parent", "pruned", "pruned/parent"):
        table.add_column(col, justify="right" if col else "left")

    def ratio(x: float, y: float) -> str:
        return f"{x / y:.3f}" if y else "–"

    if b.eval and p.eval:
        table.add_row(f"mAP ({b.eval.metric})", f"{b.eval.mAP:.4f}", f"{p.eval.mAP:.4f}", ratio(p.eval.mAP, b.eval.mAP))
        if result.finetuned_eval:
            f = result.finetuned_eval
            table.add_row(f"mAP after {finetune_epochs} ep fine-tune", f"{b.eval.mAP:.4f}", f"{f.mAP:.4f}", ratio(f.mAP, b.eval.mAP))
    table.add_row("parameters", f"{b.params:,}", f"{p.params:,}", ratio(p.params, b.params))
    table.add_row("non-zero parameters", f"{b.nonzero_params:,}", f"{p.nonzero_params:,}", ratio(p.nonzero_params, b.nonzero_params))
    table.add_row("MACs (M)", f"{b.macs / 1e6:.1f}", f"{p.macs / 1e6:.1f}", ratio(p.macs, b.macs))
    table.add_row("size MB", f"{b.bytes / 1e6:.2f}", f"{p.bytes / 1e6:.2f}", ratio(p.bytes, b.bytes))
    table.add_row("size zlib MB", f"{b.compressed_bytes / 1e6:.2f}", f"{p.compressed_bytes / 1e6:.2f}",
                  ratio(p.compressed_bytes, b.compressed_bytes))
    table.add_row("latency ms (median), torch eager", f"{b.latency.median_ms:.1f}", f"{p.latency.median_ms:.1f}",
                  ratio(p.latency.median_ms, b.latency.median_ms))
    for row in onnx_rows(result.timing)[:1] if result.timing is not None else []:
        table.add_row("latency ms (median), ONNX Runtime", *latency_cells(row[1:]))
    console.print(table)
    if method == "l1-unstructured":
        console.print("[dim]dense tensors keep their shapes: latency, MACs and file size do not change; "
                      "zeros help compression and sparse kernels only.[/]")
    elif result.recipe.get("shortfall"):
        console.print(f"[yellow]only {result.recipe['channels_removed']:.1%} of the conv channels removed "
                      f"({result.recipe['channels_requested']:.1%} requested): {result.recipe['shortfall']}[/]")
    elif result.skipped:
        console.print(f"[dim]{len(result.skipped)} residual-coupled groups left unpruned (--include-residual prunes them).[/]")
    console.print(f"saved {result.out}; report {out_dir / report.name}.md")
