"""Ultra-Light-Fast-Generic-Face-Detector-1MB ("version-RFB" and "version-slim"), our own code.

The public project (Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB) trains tiny SSD face
detectors in pytorch-ssd's key layout; its released ``version-{RFB,slim}-{320,640}.pth`` files load
strictly into the networks built here.

Layout (both variants, base width 16 channels):
- ``base_net.{0..12}``: a 3x3 conv (stride 2) then twelve depthwise-separable blocks; strides 2 at
  blocks 2, 4, 8 and 11. The "RFB" variant replaces block 7 by a receptive-field block (Liu et al.,
  "Receptive Field Block Net for Accurate and Fast Object Detection", ECCV 2018): three dilated
  branches, concatenated, projected by ``ConvLinear`` and added to a 1x1 ``shortcut``.
- heads read the outputs of ``base_net.7`` (64 ch, stride 8), ``base_net.10`` (128 ch, stride 16),
  ``base_net.12`` (256 ch, stride 32) and of the single ``extras.0`` stage (256 ch, stride 64).
- ``classification_headers.{0..2}`` / ``regression_headers.{0..2}``: 3x3 depthwise conv + ReLU +
  1x1 conv; ``*.3`` a plain 3x3 conv. Priors per location: 3, 2, 2, 3.

Input: width x height = ``input_size`` x ``input_size * 3 / 4`` (320 -> 320x240, 640 -> 640x480),
RGB normalised as ``(x - 127) / 128``. The 320 and 640 checkpoints have identical tensor shapes:
only the priors differ, so the input size must be given (builder option ``input_size``), it cannot
be read off the weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

from qcompress.errors import QCompressError
from qcompress.models.detector import Detector, ModelSpec, PostprocessConfig, ssd_postprocess
from qcompress.models.registry import CompressionSpec, classes_from_head, register_arch
from qcompress.models.ssd_lite import SSDHeads

CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2
BASE_CHANNELS = 16
# Prior sizes in input pixels per source feature map (project's fd_config ``min_boxes``); every
# prior is a square of that many pixels, so in normalised units it is wider than tall.
FACE_MIN_BOXES: tuple[tuple[int, ...], ...] = ((10, 16, 24), (32, 48), (64, 96), (128, 192, 256))
# Total stride of each source feature map.
SOURCE_STRIDES = (8, 16, 32, 64)
# base_net stops after which layer for each backbone source (pytorch-ssd ``source_layer_indexes``).
SOURCE_LAYER_ENDS = (8, 11, 13)
# The project's own NMS overlap for faces; crowds of small faces suffer from SSD's usual 0.45.
FACE_NMS_IOU = 0.3


# --- priors -------------------------------------------------------------------------------------


def face_input_size(input_size: int) -> tuple[int, int]:
    """The project's ``input_size`` (a width) -> our ``(height, width)``: 4:3 landscape."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32 or input_size % 4:
        raise QCompressError(
            f"invalid input size {input_size!r} for an ultralight face detector",
            "give the input width as a multiple of 4, e.g. 320 (320x240) or 640 (640x480)",
        )
    return input_size * 3 // 4, input_size


def feature_map_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """``(rows, cols)`` of each source map: stride-2 3x3 convs with padding 1 give ``ceil(n / 2)``."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in SOURCE_STRIDES]


def generate_face_priors(
    input_size: tuple[int, int], min_boxes: Sequence[Sequence[int]] = FACE_MIN_BOXES, clamp: bool = True
) -> torch.Tensor:
    """Center-form priors ``(P, 4)`` normalised by ``input_size = (height, width)``.

    Order: per feature map, row by row, column by column, then each min box. That is the order in
    which ``permute(0, 2, 3, 1).reshape(n, -1, k)`` lays out the heads' outputs.
    """
    height, width = input_size
    rows = []
    for (fh, fw), sizes in zip(feature_map_sizes(height, width), min_boxes):
        ys = (torch.arange(fh, dtype=torch.float64) + 0.5) / fh
        xs = (torch.arange(fw, dtype=torch.float64) + 0.5) / fw
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centers = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(sizes), 2)
        wh = torch.tensor([[s / width, s / height] for s in sizes], dtype=torch.float64)
        wh = wh.expand(centers.shape[0], -1, -1)
        rows.append(torch.cat([centers, wh], dim=-1).reshape(-1, 4))
    priors = torch.cat(rows).float()
    return priors.clamp_(0.0, 1.0) if clamp else priors


# --- network ------------------------------------------------------------------------------------


class ConvBN(nn.Sequential):
    """Conv (no bias) + BN (+ ReLU) with children named ``conv``, ``bn``, ``relu`` (the RFB's keys).

    A ``Sequential`` so the generic fusion pass finds (conv, bn[, relu]) by position.
    """

    def __init__(
        self,
        inp: int,
        oup: int,
        kernel: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        relu: bool = True,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(inp, oup, kernel, stride, padding, dilation=dilation, bias=False),
            bn=nn.BatchNorm2d(oup, eps=1e-5, momentum=0.01),
        )
        if relu:
            layers["relu"] = nn.ReLU(inplace=True)
        super().__init__(layers)


class RFBBlock(nn.Module):
    """Receptive-field block: three branches of growing dilation, concat, 1x1 projection, + shortcut.

    ``relu(scale * ConvLinear(cat(b0, b1, b2)) + shortcut(x))``; the released models use ``scale=1``.
    Concat and add go through ``FloatFunctional`` so the block quantizes in eager mode.
    """

    def __init__(
        self, inp: int, oup: int, stride: int = 1, scale: float = 1.0, map_reduce: int = 8, vision: int = 1
    ) -> None:
        super().__init__()
        inter = inp // map_reduce
        self.scale = scale

        def dilated(dilation: int) -> ConvBN:
            return ConvBN(2 * inter, 2 * inter, 3, 1, padding=dilation, dilation=dilation, relu=False)

        def short_branch(dilation: int) -> nn.Sequential:
            return nn.Sequential(
                ConvBN(inp, inter, 1, relu=False),
                ConvBN(inter, 2 * inter, 3, stride, padding=1),
                dilated(dilation),
            )

        self.branch0 = short_branch(vision + 1)
        self.branch1 = short_branch(vision + 2)
        self.branch2 = nn.Sequential(
            ConvBN(inp, inter, 1, relu=False),
            ConvBN(inter, inter // 2 * 3, 3, 1, padding=1),
            ConvBN(inter // 2 * 3, 2 * inter, 3, stride, padding=1),
            dilated(vision + 4),
        )
        self.ConvLinear = ConvBN(6 * inter, oup, 1, relu=False)  # key name fixed by the checkpoints
        self.shortcut = ConvBN(inp, oup, 1, stride, relu=False)
        self.relu = nn.ReLU()
        self.concat = FloatFunctional()
        # Only when used: an observer that never sees data cannot be converted cleanly.
        self.scale_mul = FloatFunctional() if scale != 1.0 else None
        self.shortcut_add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.concat.cat([self.branch0(x), self.branch1(x), self.branch2(x)], dim=1)
        out = self.ConvLinear(out)
        if self.scale_mul is not None:
            out = self.scale_mul.mul_scalar(out, self.scale)
        return self.relu(self.shortcut_add.add(out, self.shortcut(x)))


def conv_bn_relu(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


def depthwise_separable(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU (MobileNetV1 block)."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


def tiny_backbone(rfb: bool, base: int = BASE_CHANNELS) -> nn.Sequential:
    """The 13-layer backbone (``Mb_Tiny`` / ``Mb_Tiny_RFB`` ``.model``); ``rfb`` picks layer 7."""
    # (output width multiple of ``base``, stride) of layers 1..12; layer 0 is a plain conv.
    plan = [(2, 1), (2, 2), (2, 1), (4, 2), (4, 1), (4, 1), (4, 1), (8, 2), (8, 1), (8, 1), (16, 2), (16, 1)]
    layers: list[nn.Module] = [conv_bn_relu(3, base, 2)]
    channels = base
    for index, (multiple, stride) in enumerate(plan, start=1):
        out = base * multiple
        if index == 7 and rfb:
            layers.append(RFBBlock(channels, out, stride=stride, scale=1.0))
        else:
            layers.append(depthwise_separable(channels, out, stride))
        channels = out
    return nn.Sequential(*layers)


def separable_head(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    """3x3 depthwise conv (bias) + ReLU, then 1x1 conv (bias); no BN in the heads."""
    return nn.Sequential(nn.Conv2d(inp, inp, 3, stride, 1, groups=inp), nn.ReLU(), nn.Conv2d(inp, oup, 1))


class UltraLightSSD(SSDHeads):
    """The network of an ultralight face detector: normalised images in, raw head outputs out.

    ``forward(images)``: ``(N, 3, H, W)`` float images normalised as ``(x - 127) / 128`` ->
    ``(confidences, locations)``: class logits ``(N, P, num_classes)`` (no softmax) and box
    regressions ``(N, P, 4)`` relative to :func:`generate_face_priors` for the same ``(H, W)``.
    Same contract as :class:`qcompress.models.ssd_lite.SSDLite`: ``QuantStub`` at the input,
    ``DeQuantStub`` on every head output before the float reshape and concatenation.
    """

    def __init__(
        self,
        num_classes: int,
        base_net: nn.Sequential,
        source_layer_ends: Sequence[int],
        extras: nn.ModuleList,
        classification_headers: nn.ModuleList,
        regression_headers: nn.ModuleList,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.base_net = base_net
        self.source_layer_ends = tuple(source_layer_ends)
        self.extras = extras
        self.classification_headers = classification_headers
        self.regression_headers = regression_headers
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def source_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        start = 0
        for end in self.source_layer_ends:
            for layer in self.base_net[start:end]:
                x = layer(x)
            features.append(x)
            start = end
        for layer in self.base_net[start:]:
            x = layer(x)
        for extra in self.extras:
            x = extra(x)
            features.append(x)
        return features


def create_ultralight_ssd(num_classes: int, rfb: bool, base: int = BASE_CHANNELS) -> UltraLightSSD:
    """The project's ``create_Mb_Tiny_RFB_fd`` (``rfb=True``) / ``create_mb_tiny_fd`` layout."""
    base_net = tiny_backbone(rfb, base)
    extras = nn.ModuleList(
        [
            nn.Sequential(
                nn.Conv2d(base * 16, base * 4, 1),
                nn.ReLU(),
                separable_head(base * 4, base * 16, stride=2),
                nn.ReLU(),
            )
        ]
    )
    source_channels = (base * 4, base * 8, base * 16, base * 16)
    boxes = [len(sizes) for sizes in FACE_MIN_BOXES]

    def heads(per_box: int) -> nn.ModuleList:
        layers: list[nn.Module] = [
            separable_head(ch, k * per_box) for ch, k in zip(source_channels[:-1], boxes[:-1])
        ]
        layers.append(nn.Conv2d(source_channels[-1], boxes[-1] * per_box, 3, padding=1))
        return nn.ModuleList(layers)

    return UltraLightSSD(num_classes, base_net, SOURCE_LAYER_ENDS, extras, heads(num_classes), heads(4))


# --- registry entries ---------------------------------------------------------------------------


def _infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    return classes_from_head(state_dict, "classification_headers.3.weight", len(FACE_MIN_BOXES[-1]))


def _face_postprocess(priors: torch.Tensor, raw, image_sizes, config: PostprocessConfig):
    confidences, locations = raw
    return ssd_postprocess(
        confidences, locations, priors, image_sizes, CENTER_VARIANCE, SIZE_VARIANCE, config
    )


def _build(arch: str, rfb: bool, class_names: Sequence[str], input_size: int) -> Detector:
    height, width = face_input_size(input_size)
    model = create_ultralight_ssd(len(class_names), rfb=rfb)
    spec = ModelSpec(
        arch, tuple(class_names), (height, width), (127.0, 127.0, 127.0), 128.0, {"input_size": input_size}
    )
    detector = Detector(model, spec, partial(_face_postprocess, generate_face_priors((height, width))))
    detector.postprocess_config = PostprocessConfig(iou_threshold=FACE_NMS_IOU)
    return detector


_FACE_COMPRESSION = CompressionSpec(
    int8_parts=None,
    lowbit_scopes={"backbone": ("base_net.*",)},
    keep_float=("base_net.0.0", "classification_headers.*", "regression_headers.*"),
    heads=("classification_headers.*", "regression_headers.*"),
    feature_taps=tuple(f"classification_headers.{i}" for i in range(4)),
    training="priors",
    priors=lambda spec: generate_face_priors(tuple(spec.input_size)),
    output_names=("class scores", "box offsets"),
)


@register_arch(
    "ultralight-rfb",
    "Ultra-Light face detector, RFB backbone; input_size 320 (320x240) or 640 (640x480): "
    "version-RFB-{320,640}.pth load strictly",
    _infer_num_classes,
    _FACE_COMPRESSION,
)
def ultralight_rfb(class_names: Sequence[str], input_size: int = 320) -> Detector:
    return _build("ultralight-rfb", True, class_names, input_size)


@register_arch(
    "ultralight-slim",
    "Ultra-Light face detector, slim backbone; input_size 320 (320x240) or 640 (640x480): "
    "version-slim-{320,640}.pth load strictly",
    _infer_num_classes,
    _FACE_COMPRESSION,
)
def ultralight_slim(class_names: Sequence[str], input_size: int = 320) -> Detector:
    return _build("ultralight-slim", False, class_names, input_size)
