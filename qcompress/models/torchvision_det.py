"""torchvision detection models behind the qcompress registry.

``detector.model`` *is* the torchvision model (``SSD``, ``FasterRCNN``, ``RetinaNet``, ``FCOS``), built
with ``weights=None, weights_backbone=None, num_classes=len(class_names)``; so its ``state_dict`` keys
are torchvision's and the released COCO files load unchanged with ``strict=True``. Class 0 is the
background, as in torchvision (the sigmoid heads of RetinaNet/FCOS keep a never-trained column for it).

How the contract maps onto a model that resizes, normalises and post-processes internally:

- ``preprocess``: bilinear resize to ``input_size x input_size`` and scale to [0, 1] (mean 0, std 255);
  nothing else.
- ``model(batch)``: torchvision iterates over the batch's first dimension. Its ``GeneralizedRCNNTransform``
  still normalises with the model's own mean/std, but its sizes are set to ``input_size`` so it never
  resizes again (a scale-1 bilinear resize is the identity). It returns, in eval mode, one
  ``{"boxes", "scores", "labels"}`` dict per image, boxes ``xyxy`` float in input-size pixels, after the
  model's own decoding and NMS.
- ``postprocess``: rescales boxes to each original image, drops background labels, and applies
  :class:`PostprocessConfig` ``score_threshold`` and ``max_detections``. ``iou_threshold`` and
  ``candidates_per_class`` do not apply: NMS ran inside the model with torchvision's trained settings.
  The model's own score threshold is lowered to :data:`MODEL_SCORE_THRESHOLD` and its cap raised to
  :data:`MODEL_MAX_DETECTIONS` so the config, not the model, decides.

Default input sizes (``input_size=`` overrides; it is recorded in ``ModelSpec.options`` so a sidecar
rebuilds the same model): ssdlite320_mobilenet_v3_large 320, ssd300_vgg16 300 (the only size: its
anchor steps are fixed for 300), fasterrcnn_mobilenet_v3_large_320_fpn 320, retinanet_resnet50_fpn and
fcos_resnet50_fpn 512 (torchvision evaluates those at 800-1333; 512 is a CPU-friendly default).

Batch norm: without pretrained weights torchvision builds ``nn.BatchNorm2d`` where the released
Faster R-CNN / RetinaNet / FCOS files were saved from ``FrozenBatchNorm2d`` (no ``num_batches_tracked``).
Loading still succeeds strictly because ``BatchNorm2d`` fills that buffer in for state_dicts without
version metadata, which is what :func:`qcompress.core.checkpoints.read_state_dict` returns. ``BatchNorm2d``
is also what eager-mode fusion needs. RetinaNet's ``COCO_V1`` weights were evaluated with eps 0 in the
frozen norms; ours keep eps 1e-5 (a small, documented deviation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models import detection

from qcompress.errors import QCompressError
from qcompress.models.detector import Detections, Detector, ModelSpec, PostprocessConfig
from qcompress.models.registry import CompressionSpec, classes_from_head, register_arch

# The model's own filters sit below anything PostprocessConfig would ask for (0.001 is torchvision's
# own SSDLite setting and the usual COCO-evaluation threshold).
MODEL_SCORE_THRESHOLD = 0.001
MODEL_MAX_DETECTIONS = 300

# preprocess() only scales to [0, 1]; the model's transform applies its own normalisation.
_UNIT_MEAN = (0.0, 0.0, 0.0)
_UNIT_STD = 255.0


@dataclass(frozen=True)
class _TorchvisionArch:
    name: str
    description: str
    factory: Callable[..., nn.Module]
    default_input_size: int
    # Classification-head weight whose rows are anchors_per_location * num_classes.
    class_weight_key: str
    anchors_per_location: int
    # Keyword names the torchvision constructor uses for its score threshold / detection cap.
    score_kwarg: str = "score_thresh"
    detections_kwarg: str = "detections_per_img"
    fixed_input_size: int | None = None
    # Module names (globs) that run in int8; everything else stays float (qcompress.quant.parts).
    int8_parts: tuple[str, ...] = ("backbone",)
    first_conv: str = ""  # kept float by low-bit QAT: the image is 8-bit data already
    heads: tuple[str, ...] = ("head.*",)

    @property
    def compression(self) -> CompressionSpec:
        return CompressionSpec(
            int8_parts=self.int8_parts,
            lowbit_scopes={"backbone": ("backbone.*",)},
            keep_float=(self.first_conv, *self.heads),
            training="native",
        )

    def infer_num_classes(self, state_dict: Mapping[str, torch.Tensor]) -> int | None:
        return classes_from_head(state_dict, self.class_weight_key, self.anchors_per_location)


def _set_transform_size(model: nn.Module, size: int) -> None:
    # SSD's constructor takes no min/max size, so all families are set the same way, after construction.
    transform = model.transform
    transform.min_size = (size,)
    transform.max_size = size
    if transform.fixed_size is not None:  # SSD resizes to a fixed (h, w)
        transform.fixed_size = (size, size)


def torchvision_postprocess(
    input_size: tuple[int, int],
    raw: Sequence[Mapping[str, torch.Tensor]],
    image_sizes: Sequence[tuple[int, int]],
    config: PostprocessConfig,
) -> list[Detections]:
    """torchvision eval outputs (boxes in input-size pixels) -> :class:`Detections` per original image."""
    if isinstance(raw, Mapping) or len(raw) != len(image_sizes):
        raise QCompressError(
            "torchvision detector returned no per-image detections",
            "run the model in eval mode (detector.model.eval()) before post-processing",
        )
    input_height, input_width = input_size
    results = []
    for output, (height, width) in zip(raw, image_sizes):
        scores = output["scores"].float()
        labels = output["labels"].long()
        keep = torch.nonzero((scores > config.score_threshold) & (labels > 0)).flatten()
        keep = keep[scores[keep].argsort(descending=True, stable=True)][: config.max_detections]
        factor = torch.tensor(
            [width / input_width, height / input_height, width / input_width, height / input_height],
            dtype=torch.float32,
        )
        limit = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.minimum((output["boxes"].float()[keep] * factor).clamp_(min=0), limit)
        results.append(Detections(boxes=boxes, labels=labels[keep], scores=scores[keep]))
    return results


def _register(arch: _TorchvisionArch) -> None:
    def build(class_names: Sequence[str], input_size: int | None = None) -> Detector:
        size = arch.default_input_size if input_size is None else int(input_size)
        if arch.fixed_input_size is not None and size != arch.fixed_input_size:
            raise QCompressError(
                f"{arch.name} only runs at {arch.fixed_input_size}x{arch.fixed_input_size} (got input size {size})",
                "omit input_size, or use ssdlite320_mobilenet_v3_large for other sizes",
            )
        if size < 32:
            raise QCompressError(f"input size {size} is too small for {arch.name}", "use 128 or more")
        if len(class_names) < 2:
            raise QCompressError(
                f"{arch.name} needs the background and at least one class (got {len(class_names)} names)",
                "pass a labels file with at least one class",
            )
        kwargs: dict[str, Any] = {
            arch.score_kwarg: MODEL_SCORE_THRESHOLD,
            arch.detections_kwarg: MODEL_MAX_DETECTIONS,
        }
        model = arch.factory(weights=None, weights_backbone=None, num_classes=len(class_names), **kwargs)
        _set_transform_size(model, size)
        model.eval()
        spec = ModelSpec(
            arch.name, tuple(class_names), (size, size), _UNIT_MEAN, _UNIT_STD, {"input_size": size}
        )
        return Detector(model, spec, partial(torchvision_postprocess, (size, size)))

    build.__name__ = arch.name
    build.__doc__ = f"{arch.description}. ``build(class_names, input_size=None) -> Detector``."
    register_arch(arch.name, arch.description, arch.infer_num_classes, arch.compression)(build)


ARCHS: tuple[_TorchvisionArch, ...] = (
    # SSDLite head: module_list.i = (depthwise conv-bn-relu6, 1x1 conv); 6 boxes per location.
    _TorchvisionArch(
        "ssdlite320_mobilenet_v3_large",
        "torchvision SSDLite, MobileNetV3-Large backbone (reduced tail), default 320x320",
        detection.ssdlite320_mobilenet_v3_large,
        320,
        "head.classification_head.module_list.0.1.weight",
        6,
        int8_parts=("backbone", "head.classification_head.module_list.*", "head.regression_head.module_list.*"),
        first_conv="backbone.features.0.0.0",
    ),
    # SSD300 head: module_list.0 is a 3x3 conv on conv4_3 with aspect ratios [2] -> 4 boxes.
    _TorchvisionArch(
        "ssd300_vgg16",
        "torchvision SSD300, VGG16 backbone, 300x300 only",
        detection.ssd300_vgg16,
        300,
        "head.classification_head.module_list.0.weight",
        4,
        fixed_input_size=300,
        int8_parts=("backbone", "head.classification_head.module_list.*", "head.regression_head.module_list.*"),
        first_conv="backbone.features.0",
    ),
    _TorchvisionArch(
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "torchvision Faster R-CNN, MobileNetV3-Large FPN, default 320x320",
        detection.fasterrcnn_mobilenet_v3_large_320_fpn,
        320,
        "roi_heads.box_predictor.cls_score.weight",
        1,
        score_kwarg="box_score_thresh",
        detections_kwarg="box_detections_per_img",
        int8_parts=("backbone", "rpn.head.conv", "rpn.head.cls_logits", "rpn.head.bbox_pred",
                    "roi_heads.box_head.fc6", "roi_heads.box_head.fc7"),
        first_conv="backbone.body.0.0",
        heads=("rpn.*", "roi_heads.*"),
    ),
    # 3 scales x 3 aspect ratios per location.
    _TorchvisionArch(
        "retinanet_resnet50_fpn",
        "torchvision RetinaNet (v1), ResNet50 FPN, default 512x512",
        detection.retinanet_resnet50_fpn,
        512,
        "head.classification_head.cls_logits.weight",
        9,
        int8_parts=("backbone", "head.classification_head.conv", "head.classification_head.cls_logits",
                    "head.regression_head.conv", "head.regression_head.bbox_reg"),
        first_conv="backbone.body.conv1",
    ),
    # Anchor-free: one "anchor" (point) per location.
    _TorchvisionArch(
        "fcos_resnet50_fpn",
        "torchvision FCOS, ResNet50 FPN, default 512x512",
        detection.fcos_resnet50_fpn,
        512,
        "head.classification_head.cls_logits.weight",
        1,
        # FCOS's head towers are conv + GroupNorm + ReLU: quantized GroupNorm runs between int8 convs.
        int8_parts=("backbone", "head.classification_head.conv", "head.classification_head.cls_logits",
                    "head.regression_head.conv", "head.regression_head.bbox_reg",
                    "head.regression_head.bbox_ctrness"),
        first_conv="backbone.body.conv1",
    ),
)

for _arch in ARCHS:
    _register(_arch)
