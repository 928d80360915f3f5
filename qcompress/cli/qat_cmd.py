"""``qcompress qat``."""

from __future__ import annotations

from contextlib import nullcontext
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
def qat_cmd(
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
    train_split: Annotated[str, typer.Option(help="VOC image set to train on.")] = "train",
    train_limit: Annotated[int | None, typer.Option(help="Train on the first N images only (smoke runs).")] = None,
    method: Annotated[str, typer.Option(help="int8 (real int8 model) or lsq, pact, dorefa, lqnet, lqnet-ternary, binary (low-bit fake quantization, research).")] = "int8",
    bits_w: Annotated[int | None, typer.Option("--bits-w", help="Weight bits for lsq/pact/dorefa (2..8). Default 4.")] = None,
    bits_a: Annotated[int | None, typer.Option("--bits-a", help="Activation bits for lsq/pact/dorefa (2..8). Default 4.")] = None,
    scope: Annotated[str, typer.Option(help="Low-bit layers: a scope the architecture declares (backbone; CenterNet: stem, encoder, decoder, heads), several joined by commas (encoder,decoder), or all convs.")] = "backbone",
    quantize_first_and_heads: Annotated[bool, typer.Option(help="Low-bit: also quantize the first conv and the detection heads (kept float by default).")] = False,
    heads: Annotated[bool, typer.Option("--heads", help="Low-bit with --scope all: fully quantized (Li et al. 2019): heads quantized too, per-channel LSQ weights, BN frozen after epoch 1.")] = False,
    binary_scale: Annotated[str, typer.Option(help="--method binary: scales of each binary layer: layer (one activation scale K, from the first batch; weights x mean|W| per output channel), spatial (XNOR-Net's K(x): the input's mean |x - mu| at each position, averaged over the receptive field; one float multiply per output) or learned (XNOR-Net++: the per-output weight scale is a parameter trained by back-propagation). The binary engine runs all three.")] = "layer",
    teacher: Teacher = None,
    imitation: Imitation = IMITATION_WEIGHT,
    psi: Psi = 0.5,
    distill_outputs: DistillOutputs = 0.0,
    temperature: Temperature = 2.0,
    bn_reestimate: Annotated[bool, typer.Option("--bn-reestimate/--no-bn-reestimate", help="Recompute BN statistics with the trained network on the calibration images before saving (where BN trained on batch statistics). Off by default: it cost 1.2 mAP points where measured (README).")] = False,
    steps: Annotated[str | None, typer.Option(help='Low-bit group by group: conv-name globs, "," inside a step, ";" between cumulative steps (e.g. "base_net.1*,base_net.2*;base_net.3*"). Each step fine-tunes --epochs, is evaluated and saved; one table with measured speed-ups (binary engine).')] = None,
    step_epochs: Annotated[str | None, typer.Option(help='With --steps: fine-tuning epochs of each step, "," between steps (e.g. "6,1,1,1,1"). Default: --epochs for every step.')] = None,
    steps_from: Annotated[Path | None, typer.Option(help="With --steps: a checkpoint qat wrote from this --model-path (same --method and --binary-scale) whose quantized layers are exactly those of the first step(s): their row is that checkpoint, evaluated, and training continues with the next step from it.")] = None,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 2,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate. Default: 1e-4 for int8, 5e-4 for low-bit.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step (per process under torchrun).")] = 16,
    freeze_bn_epoch: Annotated[int | None, typer.Option(help="Freeze BN statistics after this many epochs (-1: never). Default: int8 1, or 0 with --pseudo-labels (foreign images must not rewrite the parent's statistics); low-bit never, 1 with --heads.")] = None,
    freeze_observer_epoch: Annotated[int, typer.Option(help="int8: freeze quantization ranges after this many epochs (-1: never).")] = 1,
    backend: Annotated[str, typer.Option(help="int8 kernels: x86 or qnnpack.")] = "x86",
    calib_images: Annotated[int, typer.Option(help="Images for the initial ranges and the PTQ baseline (train split).")] = 200,
    ptq: Annotated[bool, typer.Option("--ptq/--no-ptq", help="Also evaluate post-training int8 for the side-by-side table.")] = True,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Evaluate fp32, PTQ and QAT on --split.")] = True,
    out: Annotated[Path | None, typer.Option(help="Output checkpoint. Default: trained_models/quantized/<model>-qat-<method>.pth")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run of --out from its last epoch (with --steps: from its first unfinished step).")] = False,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 1,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: torch's).")] = None,
    runs: Annotated[int, typer.Option(help="Timed latency runs (after warm-up) of the fp32 parent and the output.")] = 20,
    seed: Seed = 0,
    report_name: ReportName = None,
    out_dir: OutDir = Path("eval_results"),
) -> None:
    """Quantization-aware fine-tuning: int8 (converted, reloadable) or low-bit LSQ/PACT/DoReFa/binary.

    Starts from a float or pruned checkpoint, trains with fake quantization (int8: fused Conv+BN+ReLU6,
    per-channel weights, BN and ranges frozen after --freeze-*-epoch), saves the model and writes a
    steps report: fp32 / PTQ / QAT mAP, layers quantized, weight compression, BOPs speed-up.

    Several processes: torchrun --standalone --nproc_per_node K -m qcompress qat ... (DDP, gloo).
    """
    from qcompress.api import DataConfig, ModelConfig
    from qcompress.jobs.qat import QATJobConfig, qat
    from qcompress.training.distill import DistillConfig
    from qcompress.training.distributed import is_main_process

    config = QATJobConfig(
        model=ModelConfig(model_path, arch, labels, input_size),
        data=DataConfig(dataset, data, split, ann, limit, pseudo_labels),
        train_split=train_split, train_limit=train_limit, method=method, bits_w=bits_w, bits_a=bits_a, scope=scope,
        keep_first_and_heads=not quantize_first_and_heads, heads=heads, binary_scale=binary_scale, teacher=teacher,
        distill=DistillConfig(imitation, psi, distill_outputs, temperature), bn_reestimate=bn_reestimate, steps=steps,
        step_epochs=step_epochs, steps_from=steps_from, epochs=epochs, lr=lr, batch_size=batch_size,
        freeze_bn_epoch=freeze_bn_epoch,
        freeze_observer_epoch=None if freeze_observer_epoch < 0 else freeze_observer_epoch,
        backend=backend, calib_images=calib_images, ptq_baseline=ptq, evaluate=evaluate, out=out, resume=resume,
        workers=workers, threads=threads, latency_runs=runs, seed=seed, report_name=report_name, out_dir=out_dir,
    )
    main = is_main_process()

    def on_epoch(epoch: int, record: dict) -> None:
        kd = (f" + {record['imitation_loss']:.3f} (imitation) + {record['output_distill_loss']:.3f} (outputs)"
              if "imitation_loss" in record else "")
        console.print(f"epoch {record['epoch']}: loss {record['regression_loss']:.3f} (box) + "
                      f"{record['classification_loss']:.3f} (class){kd}, {record['seconds']:.0f} s")

    with rich_progress() if main else nullcontext(None) as progress:
        if progress is None:
            result, report = qat(config)
        else:
            result, report = qat(config, progress=progress, on_epoch=on_epoch)
    if result is None or report is None:  # a non-zero torchrun rank: rank 0 reports
        return
    if steps is not None:
        _print_steps(result, report, out_dir)
        return
    table = Table(title=f"steps — {result.out.name}")
    metric = result.fp32.metric if result.fp32 else "mAP"
    for col in ("step", "quantized convs", metric, "Δ points", "weights", "BOPs fp32/this (est.)"):
        table.add_column(col, justify="left" if col == "step" else "right", overflow="fold")
    for s in result.steps:
        table.add_row(
            s["step"], f"{s['quantized_layers']}/{s['total_conv_layers']}",
            "–" if s["mAP"] is None else f"{s['mAP']:.4f}",
            "–" if s["delta_mAP_points"] is None else f"{s['delta_mAP_points']:+.2f}",
            f"{s['weight_compression']:.2f}x", f"{s['bops_speedup']:.1f}x",
        )
    console.print(table)
    if result.latency:
        lat = result.latency
        console.print(f"measured latency, batch 1: fp32 {lat['fp32']['median_ms']:.1f} ms, output "
                      f"{lat['output']['median_ms']:.1f} ms ({lat['ratio']:.2f}x; {lat['runtime']})")
    if result.world_size > 1:
        console.print(f"[dim]DDP over {result.world_size} processes; replicas differ by at most {result.param_divergence:.3g}[/]")
    console.print(f"saved {result.out}; report {out_dir / report.name}.md")


def _print_steps(rows: list, report, out_dir: Path) -> None:
    table = Table(title="steps")
    for col in ("step", "quantized convs", "mAP", "Δ points", "speed-up (measured)", "BOPs (est.)", "weight bits removed"):
        table.add_column(col, justify="right")
    for r in rows:
        measured = r["measured_speedup"]
        table.add_row(str(r["step"] or "fp32"), str(r["layers"]), f"{r['mAP']:.4f}", f"{r['delta_points']:+.2f}",
                      f"{measured['speedup']:.2f}x" if measured else "–", f"{r['bops_speedup']:.1f}x",
                      f"{r['weight_bits_removed'] * 100:.1f} %")
    console.print(table)
    console.print(f"saved {len(rows) - 1} step checkpoints ({rows[-1]['checkpoint']}); report {out_dir / report.name}.md")
