"""Registry entries for the pytorch-ssd family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch

from qcompress.models.box_coder import generate_priors
from qcompress.models.detector import Detector, ModelSpec, PostprocessConfig, ssd_postprocess
from qcompress.models.registry import CompressionSpec, classes_from_head, register_arch
from qcompress.models.ssd_lite import SSD300_PRIOR_SPECS, create_mb2_ssd_lite

CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2


def _num_classes_from_last_head(key: str, boxes: int) -> callable:
    def infer(state_dict: Mapping[str, torch.Tensor]) -> int | None:
        return classes_from_head(state_dict, key, boxes)

    return infer


def _ssd_postprocess(priors: torch.Tensor, raw, image_sizes, config: PostprocessConfig):
    confidences, locations = raw
    return ssd_postprocess(confidences, locations, priors, image_sizes, CENTER_VARIANCE, SIZE_VARIANCE, config)


@register_arch(
    "mb2-ssd-lite",
    "MobileNetV2-SSD-Lite 300x300 (pytorch-ssd layout: mb2-ssd-lite-mp-0_686.pth loads strictly)",
    _num_classes_from_last_head("classification_headers.5.weight", 6),
    CompressionSpec(
        int8_parts=None,  # the network carries its own quant stubs and FloatFunctional skip-adds
        lowbit_scopes={"backbone": ("base_net.*",)},
        keep_float=("base_net.0.0", "classification_headers.*", "regression_headers.*"),
        heads=("classification_headers.*", "regression_headers.*"),
        feature_taps=tuple(f"classification_headers.{i}" for i in range(6)),
        training="priors",
        priors=lambda spec: generate_priors(SSD300_PRIOR_SPECS, spec.input_size[0]),
        output_names=("class scores", "box offsets"),
    ),
)
def mb2_ssd_lite(class_names: Sequence[str], width_mult: float = 1.0) -> Detector:
    model = create_mb2_ssd_lite(len(class_names), width_mult=width_mult)
    spec = ModelSpec("mb2-ssd-lite", tuple(class_names), (300, 300), (127.0, 127.0, 127.0), 128.0,
                     {"width_mult": width_mult} if width_mult != 1.0 else {})
    priors = generate_priors(SSD300_PRIOR_SPECS, 300)
    return Detector(model, spec, partial(_ssd_postprocess, priors))
