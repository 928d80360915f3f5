"""FCOS and RetinaNet with a ResNet-18 FPN backbone (P3-P7), with the structure variants of the
low-bit detection literature: FPN-BN and Head-BN / Head-GN / no head normalisation.

Built from torchvision's detector classes (`torchvision.models.detection.FCOS` / `RetinaNet`) around
a ResNet-18 body, so their losses, anchors, decoding and NMS are torchvision's and a released
torchvision state_dict layout of the same structure loads strictly. Options (recorded in the sidecar):

- ``input_size``: square input (default 320; the transform resizes to it).
- ``width``: FPN and head channels (default 128; the source uses 256 — 128 keeps an fp32 checkpoint
  under 25 MB).
- ``fpn_bn``: BatchNorm after every FPN conv and ReLU after each output conv ("FPN-BN": BN + ReLU in
  the FPN, which the source found necessary before quantizing the FPN).
- ``head_norm``: ``"gn"`` (GroupNorm(32) in the towers, FCOS's default, "Head-GN"), ``"bn"``
  (BatchNorm unshared per level, "Head-BN": the tower's convs are shared by the levels, each level has
  its own BN, :class:`LevelBatchNorm2d`), or ``"none"`` (RetinaNet v1's towers).

Compression declarations: the int8 parts are the backbone with FPN and every head conv; low-bit
``--scope backbone`` is the ResNet body (the source's "Quantize-Backbone") and ``all`` adds the FPN
and head towers ("Quantize-All"); the first conv and the two output convs stay float.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from qcompress.errors import QCompressError
from qcompress.models.detector import Detector, ModelSpec
from qcompress.models.registry import CompressionSpec, classes_from_head, register_arch
from qcompress.models.torchvision_det import (
    _UNIT_MEAN,
    _UNIT_STD,
    MODEL_MAX_DETECTIONS,
    MODEL_SCORE_THRESHOLD,
    _set_transform_size,
    torchvision_postprocess,
)

HEAD_NORMS = ("gn", "bn", "none")
_OUTPUT_CONVS = ("head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                 "head.regression_head.bbox_ctrness")


def _compression(int8_heads: tuple[str, ...]) -> CompressionSpec:
    return CompressionSpec(
        int8_parts=("backbone", *int8_heads),
        lowbit_scopes={"backbone": ("backbone.body.*",)},
        keep_float=("backbone.body.conv1", *_OUTPUT_CONVS),
        training="native",
        native_taps=("transform", "backbone", "anchor_generator"),  # `--teacher`: the FPN levels P3-P7
    )


def _backbone(width: int, fpn_bn: bool) -> BackboneWithFPN:
    body = resnet18(weights=None)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=width,
        extra_blocks=LastLevelP6P7(width, width),
        norm_layer=nn.BatchNorm2d if fpn_bn else None,
    )
    if fpn_bn:  # ReLU after each FPN output conv (the "BN + ReLU in the FPN" of the source)
        for i, block in enumerate(backbone.fpn.layer_blocks):
            backbone.fpn.layer_blocks[i] = nn.Sequential(*block, nn.ReLU(inplace=False))
    return backbone


LEVELS = 5  # P3-P7


class LevelBatchNorm2d(nn.Module):
    """Head-BN: one BatchNorm2d per pyramid level in a tower that torchvision shares over the levels.

    torchvision's heads run their towers once per level, P3 to P7 in order; each call here uses the
    next level's BN. The sub-heads reset the count before every forward (:func:`_reset_levels`), so a
    failed call cannot shift the levels of the next one. A single BN shared by the levels would mix
    their statistics (its running averages end up those of the last levels run, P6-P7)."""

    def __init__(self, channels: int, levels: int = LEVELS) -> None:
        super().__init__()
        self.levels = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(levels))
        self.next_level = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.next_level >= len(self.levels):
            raise RuntimeError(f"Head-BN called more than {len(self.levels)} times in one head forward")
        out = self.levels[self.next_level](x)
        self.next_level += 1
        return out


def _reset_levels(module: nn.Module, args: Any) -> None:
    for child in module.modules():
        if isinstance(child, LevelBatchNorm2d):
            child.next_level = 0


def _per_level_bn(head: nn.Module) -> None:
    """Reset every per-level BN of each sub-head before it runs (a plain function: survives deepcopy)."""
    for sub in (head.classification_head, head.regression_head):
        sub.register_forward_pre_hook(_reset_levels)


def _set_head_norm(head: nn.Module, head_norm: str) -> None:
    """Replace the towers' GroupNorm by per-level BatchNorm or nothing (FCOS builds GroupNorm itself)."""
    if head_norm == "gn":
        return
    for _, module in list(head.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, child_name, LevelBatchNorm2d(child.num_channels) if head_norm == "bn" else nn.Identity())
    if head_norm == "bn":
        _per_level_bn(head)


def _check(arch: str, class_names: Sequence[str], input_size: int, width: int, head_norm: str) -> None:
    if len(class_names) < 2:
        raise QCompressError(f"{arch} needs the background and at least one class", "pass a labels file")
    if input_size < 64:
        raise QCompressError(f"input size {input_size} is too small for {arch}", "use 128 or more")
    if width < 32 or width % 32:
        raise QCompressError(f"width {width} must be a multiple of 32 (GroupNorm(32) groups)", "e.g. 128 or 256")
    if head_norm not in HEAD_NORMS:
        raise QCompressError(f"unknown head_norm {head_norm!r}", f"use one of: {', '.join(HEAD_NORMS)}")


def _detector(arch: str, model: nn.Module, class_names: Sequence[str], options: dict) -> Detector:
    size = options["input_size"]
    _set_transform_size(model, size)
    model.eval()
    spec = ModelSpec(arch, tuple(class_names), (size, size), _UNIT_MEAN, _UNIT_STD, dict(options))
    return Detector(model, spec, partial(torchvision_postprocess, (size, size)))


@register_arch(
    "fcos_resnet18_fpn",
    "FCOS, ResNet-18 FPN (P3-P7); options input_size, width, fpn_bn, head_norm gn|bn|none",
    lambda sd: classes_from_head(sd, "head.classification_head.cls_logits.weight", 1),
    _compression(("head.classification_head.conv", "head.classification_head.cls_logits",
                  "head.regression_head.conv", "head.regression_head.bbox_reg", "head.regression_head.bbox_ctrness")),
)
def fcos_resnet18_fpn(class_names: Sequence[str], input_size: int = 320, width: int = 128, fpn_bn: bool = False,
                      head_norm: str = "gn") -> Detector:
    _check("fcos_resnet18_fpn", class_names, input_size, width, head_norm)
    model = FCOS(_backbone(width, fpn_bn), num_classes=len(class_names), min_size=input_size, max_size=input_size,
                 score_thresh=MODEL_SCORE_THRESHOLD, detections_per_img=MODEL_MAX_DETECTIONS)
    _set_head_norm(model.head, head_norm)
    options = {"input_size": input_size, "width": width, "fpn_bn": fpn_bn, "head_norm": head_norm}
    return _detector("fcos_resnet18_fpn", model, class_names, options)


@register_arch(
    "retinanet_resnet18_fpn",
    "RetinaNet, ResNet-18 FPN (P3-P7); options input_size, width, fpn_bn, head_norm none|gn|bn",
    lambda sd: classes_from_head(sd, "head.classification_head.cls_logits.weight", 9),
    _compression(("head.classification_head.conv", "head.classification_head.cls_logits",
                  "head.regression_head.conv", "head.regression_head.bbox_reg")),
)
def retinanet_resnet18_fpn(class_names: Sequence[str], input_size: int = 320, width: int = 128,
                           fpn_bn: bool = False, head_norm: str = "none") -> Detector:
    _check("retinanet_resnet18_fpn", class_names, input_size, width, head_norm)
    model = RetinaNet(_backbone(width, fpn_bn), num_classes=len(class_names), min_size=input_size,
                      max_size=input_size, score_thresh=MODEL_SCORE_THRESHOLD, detections_per_img=MODEL_MAX_DETECTIONS)
    if head_norm != "none":  # RetinaNet v1 towers have no normalisation; add it where asked
        norm = partial(nn.GroupNorm, 32) if head_norm == "gn" else LevelBatchNorm2d
        model.head = type(model.head)(width, 9, len(class_names), norm_layer=norm)
        if head_norm == "bn":
            _per_level_bn(model.head)
    options = {"input_size": input_size, "width": width, "fpn_bn": fpn_bn, "head_norm": head_norm}
    return _detector("retinanet_resnet18_fpn", model, class_names, options)


__all__ = ["HEAD_NORMS", "LevelBatchNorm2d", "fcos_resnet18_fpn", "retinanet_resnet18_fpn"]
