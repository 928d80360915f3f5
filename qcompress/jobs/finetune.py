"""What the fine-tuning jobs share (``qat``, ``qat --steps``, ``prune --finetune-epochs``): the training
split, the teacher, and BN re-estimation after training."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qcompress.core import DataConfig, load_dataset
from qcompress.core.checkpoints import load_detector
from qcompress.errors import QCompressError
from qcompress.models.detector import Detector
from qcompress.models.registry import compression_spec
from qcompress.training.distill import DistillConfig, Distiller, NativeDistiller


def split_dataset(data: DataConfig, class_names: Sequence[str], split: str, reference=None):
    """The ``split`` image set of ``data`` (COCO folders have no image sets: all of it)."""
    if data.dataset == "coco" and data.pseudo_labels is None:
        return load_dataset(data, class_names)
    return load_dataset(data, class_names, split, reference=reference)


def teacher_distiller(
    teacher: str | Path | None,
    distill: DistillConfig,
    student: Detector,
    model: torch.nn.Module,
    parent: Detector,
    parent_path: Path,
    example: torch.Tensor,
    probe: torch.nn.Module | None = None,
) -> tuple[Distiller | NativeDistiller | None, dict[str, Any] | None]:
    """``(Distiller around model, summary for reports)``, or ``(None, None)`` without a teacher.

    ``teacher``: "parent" (``parent``) or a float checkpoint with ``student``'s classes. ``probe``: see
    :class:`~qcompress.training.distill.Distiller` (a float twin of an int8 QAT ``model``)."""
    if teacher is None:
        return None, None
    if teacher == "parent":
        source, path = parent, parent_path
    else:
        source, path = load_detector(Path(teacher)), Path(teacher)
        if source.source.get("sidecar", {}).get("quantization"):
            raise QCompressError(f"--teacher {teacher} is a quantized checkpoint", "pass a float model")
        if tuple(source.class_names) != tuple(student.class_names):
            raise QCompressError(f"--teacher {teacher} has other classes than the student",
                                 "pass a teacher trained on the same labels")
    spec = compression_spec(student.spec.arch)
    if spec.training == "native":
        if not spec.native_taps:
            raise QCompressError(f"{student.spec.arch} declares no feature levels for a teacher to imitate",
                                 "drop --teacher for this model")
        native = NativeDistiller(model, copy.deepcopy(source.model), spec.native_taps, distill, example, probe=probe)
        where = (f"the input of {spec.native_taps[1]} (mask: the locations inside the boxes)" if native.anchor_free
                 else f"the feature levels of {spec.native_taps[1]} (mask over the anchors of {spec.native_taps[2]})")
        return native, {"teacher": str(path), **asdict(distill), "feature_taps": list(spec.native_taps),
                        "imitated": where, "mask": "inside the boxes" if native.anchor_free else "iou-ratio"}
    taps = spec.feature_taps
    distiller = Distiller(model, copy.deepcopy(source.model), taps, len(student.class_names), distill, example,
                          probe=probe)
    return distiller, {"teacher": str(path), **asdict(distill), "feature_taps": list(taps),
                       "imitated": f"the inputs of {', '.join(taps)}", "mask": "iou-ratio"}


def mask_words(teacher: dict[str, Any]) -> str:
    """How a report names the imitation mask: the IoU-ratio mask, or (anchor-free) none beyond ``imitated``."""
    if teacher.get("mask") == "inside the boxes":
        return ""
    return f", IoU-ratio mask psi {teacher['psi']:g} from the training targets"


def reestimate_bn_after_training(config: Any, model: torch.nn.Module,
                                 batches: Callable[[], Iterable[torch.Tensor]]) -> dict[str, Any]:
    """With ``config.bn_reestimate``: recompute BN running statistics with the trained network on
    ``batches()`` (called only then), where BN trained on batch statistics (their running averages lag
    the weights); with BN frozen (``config.bn_frozen_at_end``) the network trained against the running
    statistics themselves, so they stay. Returns what reports show."""
    if not config.bn_reestimate:
        return {"skipped": "off (--bn-reestimate turns it on)"}
    if config.bn_frozen_at_end:
        return {"skipped": "BN statistics were frozen during training: the network trained against them"}
    from qcompress.quant.bn_reestimate import reestimate_bn
    from qcompress.quant.qat import observers_disabled

    with observers_disabled(model):
        return reestimate_bn(model, batches()).summary()


__all__ = ["reestimate_bn_after_training", "split_dataset", "teacher_distiller"]
