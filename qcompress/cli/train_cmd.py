"""``qcompress train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qcompress.cli.common import command, console, rich_progress
from qcompress.cli.options import Arch, DataDir, Labels, Limit, OutDir, Seed


@command
def train_cmd(
    arch: Arch = None,
    data: DataDir = None,
    labels: Labels = None,
    arch_options: Annotated[str | None, typer.Option(help="Builder options of a fresh --arch as JSON, e.g. '{\"input_size\": 320, \"width\": 0.25}' (see `qcompress models`; recorded in the sidecar).")] = None,
    init: Annotated[Path | None, typer.Option(help="Fine-tune from this checkpoint instead of random weights.")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the trained checkpoint (+ sidecar, labels).")] = Path(
        "trained_models/mb2-ssd-lite-trained.pth"
    ),
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 16,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr: Annotated[float, typer.Option(help="Peak learning rate (linear warm-up, then cosine decay).")] = 3e-3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay on conv/linear weights.")] = 5e-4,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 1,
    eval_limit: Annotated[int, typer.Option(help="Validation images per epoch.")] = 300,
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast for forward passes (faster on CPUs with AVX512-BF16/AMX).")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads (1 is fastest on a busy 2-core machine).")] = None,
    freeze: Annotated[str | None, typer.Option(help='Modules kept as they are, module-name globs separated by "," (no gradient; their BNs on running statistics), e.g. "conv1,bn1,layer1" (CenterNet) or "backbone.body.conv1,backbone.body.bn1,backbone.body.layer1" (FCOS/RetinaNet R18): a backbone trained before, as torchvision and Detectron freeze the stem and first stage; ~25 % faster steps.')] = None,
    limit: Limit = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run of --out from its last epoch.")] = False,
    seed: Seed = 0,
    out_dir: OutDir = Path("eval_results"),
) -> None:
    """Train a detector with its architecture's losses (SSD: MultiBox, 3:1 hard negatives; SSD augmentation; cosine schedule).

    Default data is the generated VOC-layout dataset; the embedded checkpoints were made by this
    command. Saves a checkpoint per epoch (``--resume`` continues) and reports validation mAP.
    """
    import json

    from qcompress import api
    from qcompress.errors import QCompressError
    from qcompress.models.registry import DEFAULT_ARCH

    options = None
    if arch_options is not None:
        try:
            options = json.loads(arch_options)
        except json.JSONDecodeError as exc:
            raise QCompressError(f"--arch-options is not valid JSON ({exc.msg} at character {exc.pos})",
                                 """pass an object, e.g. '{"input_size": 320, "width": 0.25}'""") from None
        if not isinstance(options, dict):
            raise QCompressError("--arch-options must be a JSON object", """e.g. '{"input_size": 320, "width": 0.25}'""")
    from qcompress.training.loop import TrainConfig

    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        num_workers=workers, seed=seed, eval_limit=eval_limit, bf16=bf16, threads=threads,
        freeze=tuple(g.strip() for g in (freeze or "").split(",") if g.strip()),
    )
    job = api.TrainJobConfig(
        arch=arch or DEFAULT_ARCH, data=api.DataConfig("voc", data, "train", None, limit), labels=labels,
        init=init, arch_options=options, out=out, resume=resume, train=cfg, out_dir=out_dir,
    )
    with rich_progress() as progress:
        bars: dict[int, object] = {}

        def on_step(epoch: int, step: int, steps: int, stats: dict[str, float]) -> None:
            if epoch not in bars:
                bars[epoch] = progress(f"epoch {epoch + 1}/{epochs}", steps)
            bars[epoch](1)

        def on_epoch(epoch: int, record: dict) -> None:
            console.print(
                f"epoch {record['epoch']}: loss {record['regression_loss']:.3f} (box) + "
                f"{record['classification_loss']:.3f} (class), val mAP {record.get('val_mAP', float('nan')):.4f}, "
                f"{record['seconds']:.0f} s"
            )

        _, result, report = api.train(job, on_step=on_step, on_epoch=on_epoch, progress=progress)
    if report is None:  # a non-zero torchrun rank: rank 0 saves and reports
        return
    console.print(f"saved {out} ({result.epochs_run} epochs, {result.seconds / 60:.1f} min); report {out_dir / report.name}.md")
