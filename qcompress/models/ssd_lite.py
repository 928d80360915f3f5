"""MobileNetV2-SSD-Lite with the exact ``state_dict`` layout of pytorch-ssd.

Key layout (pytorch-ssd ``create_mobilenetv2_ssd_lite``): ``base_net.{0..18}`` is MobileNetV2's
``features``; ``extras.{0..3}`` are inverted residuals; ``classification_headers.{0..5}`` and
``regression_headers.{0..5}`` are depthwise-separable convs (the last one a plain 1x1 conv).
The first head reads the 576-channel expansion inside ``base_net.14`` (pytorch-ssd's
``GraphPath(14, 'conv', 3)``), the second the 1280-channel output of ``base_net.18``.

Our modules are quantization-ready without changing the float keys: residual adds go through
``FloatFunctional`` and the network carries ``QuantStub``/``DeQuantStub`` (none own parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

from qcompress.models.box_coder import PriorSpec

# pytorch-ssd ``mobilenetv1_ssd_config`` (also used by mb2-ssd-lite): 300x300 input, 3000 priors.
SSD300_PRIOR_SPECS = [
    PriorSpec(19, 16, 60, 105, (2, 3)),
    PriorSpec(10, 32, 105, 150, (2, 3)),
    PriorSpec(5, 64, 150, 195, (2, 3)),
    PriorSpec(3, 100, 195, 240, (2, 3)),
    PriorSpec(2, 150, 240, 285, (2, 3)),
    PriorSpec(1, 300, 285, 330, (2, 3)),
]

# MobileNetV2 stages: expansion t, output channels c, repeats n, first stride s (Sandler et al. 2018, table 2).
MOBILENETV2_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def conv_bn_relu6(inp: int, oup: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection (+ skip)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += list(conv_bn_relu6(inp, hidden, 1, 1))
        layers += list(conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden))
        layers += [nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.skip_add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return self.skip_add.add(x, self.conv(x))
        return self.conv(x)


def separable_conv(inp: int, oup: int) -> nn.Sequential:
    """SSD-Lite head: 3x3 depthwise (with bias) + BN + ReLU6, then 1x1 conv (with bias)."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, 1, 1, groups=inp),
        nn.BatchNorm2d(inp),
        nn.ReLU6(),
        nn.Conv2d(inp, oup, 1),
    )


def mobilenetv2_features(width_mult: float = 1.0) -> nn.Sequential:
    input_channel = int(32 * width_mult)
    last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
    features: list[nn.Module] = [conv_bn_relu6(3, input_channel, 3, 2)]
    for t, c, n, s in MOBILENETV2_SETTING:
        output_channel = int(c * width_mult)
        for i in range(n):
            features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
            input_channel = output_channel
    features.append(conv_bn_relu6(input_channel, last_channel, 1, 1))
    return nn.Sequential(*features)


class SSDHeads(nn.Module):
    """Shared SSD forward: source features -> per-level heads -> dequantize -> (confidences, locations).

    Subclasses provide ``source_features(x)`` and the attributes ``num_classes``,
    ``classification_headers``, ``regression_headers``, ``quant`` and ``dequant``.
    """

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = images.shape[0]
        features = self.source_features(self.quant(images))
        confidences, locations = [], []
        for feature, cls_head, reg_head in zip(features, self.classification_headers, self.regression_headers):
            confidences.append(self.dequant(cls_head(feature)).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes))
            locations.append(self.dequant(reg_head(feature)).permute(0, 2, 3, 1).reshape(n, -1, 4))
        return torch.cat(confidences, dim=1), torch.cat(locations, dim=1)


class SSDLite(SSDHeads):
    """The network part of an SSD detector: normalised images in, raw head outputs out.

    ``forward(images)`` takes ``(N, 3, H, W)`` float images already normalised as the model expects
    and returns ``(confidences, locations)``: class logits ``(N, P, num_classes)`` (softmax not applied)
    and box regressions ``(N, P, 4)`` relative to the priors. Decoding and NMS happen outside
    (see :class:`qcompress.models.detector.Detector`), in float, so this module is what gets
    quantized or pruned.

    ``split`` names where the first source feature is tapped: ``(layer index, position inside that
    layer's ``conv``)``; the second source is the output of ``base_net``.
    """

    def __init__(
        self,
        num_classes: int,
        base_net: nn.Sequential,
        split: tuple[int, int],
        extras: nn.ModuleList,
        classification_headers: nn.ModuleList,
        regression_headers: nn.ModuleList,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.base_net = base_net
        self.split = split
        self.extras = extras
        self.classification_headers = classification_headers
        self.regression_headers = regression_headers
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def source_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        layer_index, position = self.split
        for layer in self.base_net[:layer_index]:
            x = layer(x)
        inner = self.base_net[layer_index].conv
        tap = inner[:position](x)
        x = inner[position:](tap)
        for layer in self.base_net[layer_index + 1 :]:
            x = layer(x)
        features = [tap, x]
        for extra in self.extras:
            x = extra(x)
            features.append(x)
        return features



def create_mb2_ssd_lite(num_classes: int, width_mult: float = 1.0, boxes_per_location: Sequence[int] = (6,) * 6) -> SSDLite:
    """pytorch-ssd's ``create_mobilenetv2_ssd_lite(num_classes)`` layout, our own code."""
    base_net = mobilenetv2_features(width_mult)
    extras = nn.ModuleList(
        [
            InvertedResidual(1280, 512, stride=2, expand_ratio=0.2),
            InvertedResidual(512, 256, stride=2, expand_ratio=0.25),
            InvertedResidual(256, 256, stride=2, expand_ratio=0.5),
            InvertedResidual(256, 64, stride=2, expand_ratio=0.25),
        ]
    )
    source_channels = [round(576 * width_mult), 1280, 512, 256, 256, 64]

    def heads(per_box: int) -> nn.ModuleList:
        layers: list[nn.Module] = [
            separable_conv(ch, k * per_box) for ch, k in zip(source_channels[:-1], boxes_per_location[:-1])
        ]
        layers.append(nn.Conv2d(source_channels[-1], boxes_per_location[-1] * per_box, 1))
        return nn.ModuleList(layers)

    return SSDLite(num_classes, base_net, (14, 3), extras, heads(num_classes), heads(4))
