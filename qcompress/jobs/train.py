"""``qcompress train``: detector training with per-epoch checkpoints, resume and validation mAP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qcompress.core import (
    DataConfig,
    Progress,
    Subset,
    dataset_labels,
    evaluate_detector,
    limited_indices,
    load_dataset,
    no_progress,
    read_run_state,
    run_dir_for,
)
from qcompress.core.checkpoints import load_detector, save_detector, versions
from qcompress.core.context import restores_torch_state
from qcompress.core.loading import default_data_dir
from qcompress.defaults import DEFAULT_REPORTS
from qcompress.errors import QCompressError
from qcompress.io_utils import check_writable
from qcompress.models.detector import Detector
from qcompress.models.registry import DEFAULT_ARCH
from qcompress.reports import Report, md_table, write_report


@dataclass(frozen=True)
class TrainJobConfig:
    arch: str = DEFAULT_ARCH
    data: DataConfig = field(default_factory=lambda: DataConfig(split="train"))
    labels: Path | None = None  # default: the dataset's labels.txt, else the init checkpoint's classes
    init: Path | None = None  # fine-tune from this checkpoint instead of random initialisation
    arch_options: dict[str, Any] | None = None  # builder options of a fresh --arch (recorded in the sidecar)
    out: Path = Path("trained_models/mb2-ssd-lite-trained.pth")
    val_split: str = "val"
    resume: bool = False
    train: Any = None  # qcompress.training.loop.TrainConfig; None: its defaults
    out_dir: Path = DEFAULT_REPORTS


# Settings a --resume must share with the run it continues (the schedule and the numbers depend on them).
RESUME_KEYS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "warmup_epochs", "augment",
               "seed", "freeze_bn", "bf16", "channels_last", "freeze")


@restores_torch_state
def train(
    config: TrainJobConfig,
    on_step: Callable[..., None] | None = None,
    on_epoch: Callable[..., None] | None = None,
    progress: Progress = no_progress,
) -> tuple[Detector, Any, Report]:
    """``qcompress train``: SSD training with per-epoch checkpoints and validation mAP. Under torchrun every
    process trains its shard and rank 0 alone writes; the other ranks return ``(detector, result, None)``."""
    from qcompress.training import distributed

    with distributed.session() as main:
        return _train(config, on_step if main else None, on_epoch if main else None,
                      progress if main else no_progress, main)


def _train(config: TrainJobConfig, on_step, on_epoch, progress: Progress, main: bool):
    import torch

    from qcompress.io_utils import read_labels
    from qcompress.models.registry import build_detector, check_builder_options
    from qcompress.training.loop import TrainConfig, frozen_modules, train_detector

    train_cfg = (config.train or TrainConfig()).validate()
    out = Path(config.out)
    run_dir = run_dir_for(out)
    # Every output is checked before the first step: a refusal after hours of training loses the report.
    if config.init is not None and out.resolve() == Path(config.init).resolve():
        raise QCompressError(f"--out {out} is the --init checkpoint; training would have to overwrite its input",
                             f"pass another --out (e.g. {out.with_name(out.stem + '-ft.pth')}) and rename it afterwards")
    if main:  # rank 0 alone writes; probes from every rank would race each other's folders
        check_writable(out, "--out")
        check_writable(run_dir, "the run folder", is_dir=True)
        check_writable(config.out_dir, "--out-dir", is_dir=True)
    data_root = Path(config.data.data) if config.data.data is not None else default_data_dir()
    data_cfg = DataConfig(config.data.dataset, data_root, config.data.split, config.data.ann, config.data.limit)
    if config.init is not None and config.arch_options:
        raise QCompressError("--arch-options builds a fresh network; --init's sidecar already fixes its options",
                             "drop --arch-options, or drop --init to train from scratch")
    resume_state = None
    if config.resume:
        # The run's own checkpoint names its architecture, classes and builder options (--arch-options and
        # --init need not be repeated) and holds the weights to continue from.
        resume_state = read_run_state(run_dir, "start without --resume")
        if resume_state is None:
            raise QCompressError(f"nothing to resume in {run_dir}", "start without --resume")
        detector = load_detector(run_dir / "last.pth", labels=config.labels)
        recorded = resume_state.get("settings") or {}
        changed = [f"{k} {recorded[k]} -> {getattr(train_cfg, k)}" for k in RESUME_KEYS
                   if k in recorded and recorded[k] != getattr(train_cfg, k)]
        if changed:
            raise QCompressError(f"--resume with other settings than the run in {run_dir}: {', '.join(changed)}",
                                 "resume with the original options, or start a new run without --resume")
    elif config.init is not None:
        detector = load_detector(Path(config.init), labels=config.labels)
    else:
        labels = config.labels or dataset_labels(data_root)
        check_builder_options(config.arch, config.arch_options or {})
        torch.manual_seed(train_cfg.seed)  # the random initialisation is part of the run: --seed fixes it
        try:
            detector = build_detector(config.arch, read_labels(labels), **(config.arch_options or {}))
        except (TypeError, ValueError) as exc:  # e.g. a string where a number belongs
            raise QCompressError(f"--arch-options for {config.arch}: {exc}", "see qcompress models for the options") from None
    frozen_modules(detector.model, train_cfg.freeze)  # a --freeze glob that matches nothing: before any data is read
    train_set = load_dataset(data_cfg, detector.class_names, config.data.split)
    if config.data.limit:
        train_set = Subset(train_set, limited_indices(train_set, config.data.limit))
    val_set = load_dataset(data_cfg, detector.class_names, config.val_split)

    def evaluate_fn(det: Detector) -> dict[str, Any]:
        res, _ = evaluate_detector(det, val_set, "voc07", train_cfg.eval_limit, description="validate", progress=progress)
        return {"val_mAP": res.mAP}

    def checkpoint_fn(epoch: int, state: dict[str, Any]) -> None:
        # a usable checkpoint in its own right: its sidecar says how far the run got (kept out of the compression
        # chain, which the final checkpoint of a resumed run extends with the whole step)
        progress_record = {"step": "train", "epochs_done": epoch + 1, "of": train_cfg.epochs, "config": asdict(train_cfg)}
        save_detector(detector, run_dir / "last.pth", parent=config.init,
                      extra={"in_progress": progress_record, "training": {"history": state.get("history", [])}})
        from qcompress.io_utils import atomic_path

        settings = {k: getattr(train_cfg, k) for k in RESUME_KEYS}
        with atomic_path(run_dir / "last.state.pt") as tmp:
            torch.save({**state, "settings": settings}, tmp)

    result = train_detector(
        detector,
        train_set,
        train_cfg,
        evaluate_fn=evaluate_fn,
        checkpoint_fn=checkpoint_fn,
        resume_state=resume_state,
        on_step=on_step,
        on_epoch=on_epoch,
    )
    if not main:
        return detector, result, None
    save_detector(
        detector,
        out,
        parent=config.init,
        compression=[{"step": "train", "epochs": result.epochs_run, "config": asdict(train_cfg)}],
        extra={"training": {"history": result.history, "data": str(data_root), "seconds": result.seconds}},
    )
    from qcompress.io_utils import write_labels

    write_labels(out.with_name(f"{out.stem}-labels.txt"), detector.class_names)
    report = Report(f"train-{out.stem}", f"Training of {out.name}")
    report.data.update(
        {"command": "train", "out": str(out), "config": asdict(train_cfg), "history": result.history,
         "seconds": result.seconds, "versions": versions()}
    )
    rows = [[h["epoch"], h["regression_loss"], h["classification_loss"], h.get("val_mAP", float("nan")), h["seconds"]]
            for h in result.history]
    report.add("Epochs", md_table(["epoch", "regression loss", "classification loss", "val mAP (voc07)", "seconds"], rows))
    write_report(report, config.out_dir)
    return detector, result, report
