"""CenterNet ("Objects as Points", Zhou et al. 2019) with the ResNet-18 encoder of its non-deformable
``msra_resnet`` variant: objects are peaks of a per-class heatmap at stride 4, with a box size and a
centre offset regressed at each peak.

Layout (``state_dict`` keys as the original ``msra_resnet.py`` with ``heads={"hm": C, "wh": 2, "reg": 2}``,
``head_conv=64``, so its ResNet-18 checkpoints load strictly):

- encoder: ``conv1`` (7x7 s2) / ``bn1`` / max-pool, ``layer1``-``layer4`` (ResNet-18 basic blocks);
- decoder: ``deconv_layers``: three ``ConvTranspose2d(4x4, stride 2, padding 1, no bias)`` + BN + ReLU
  stages, 512 -> ``width`` -> ``width`` -> ``width`` channels (256 in the original);
- heads ``hm`` (one channel per class, no background), ``wh`` (box width/height in output cells) and
  ``reg`` (centre offset in output cells): each ``3x3 conv(width -> 64) + ReLU + 1x1``; ``hm``'s output
  bias starts at -2.19 (prior probability 0.1), ``wh``/``reg`` output weights at N(0, 0.001).

Options (recorded in the sidecar): ``input_size`` (square, a multiple of 32; default 320: the heatmap
is 80x80), ``width`` (decoder channels; default 256 as the original), ``head_conv`` (the heads' hidden
channels, 64 as the original) and ``block`` (``basic``, the original; ``bireal``: Bi-Real Net's real-valued
shortcut around every encoder conv, same tensors and keys, for binary encoders) and ``skips`` (False, the
original; True adds ``skip_layers.0/1/2``: layer3, layer2 and layer1 through a 1x1 conv + BN, added to the
upsampling stage of the same stride before its ReLU, as TTFNet's ResNet-18 CenterNet and FPN-style decoders
do, so the stride-4 heatmap sees shape detail the stride-32 features have lost). A released CenterNet file
expects its own normalisation on BGR images; ours is the same mean in RGB order and one std (the
mean of its three), so a released file's first conv would want its input channels reversed.

Training (``training="native"``): in train mode ``model(images, targets)`` (a list of preprocessed
images and ``{"boxes": xyxy input pixels, "labels": 1..C}`` per image) draws the Gaussian heatmaps
with CenterNet's radius (``gaussian_radius``, min overlap 0.7) and returns the penalty-reduced focal
loss (alpha 2, beta 4) on the heatmap, the L1 size loss times 0.1 and the L1 offset loss at object
centres. In eval mode ``model(batch)`` returns ``(hm logits, wh, reg)``; decoding (sigmoid, 3x3
max-pool peaks, top-100 over all classes and cells, boxes) runs in float outside the network.

Int8: the whole network runs int8 (it carries its own quant/dequant stubs; residual adds are
``FloatFunctional``); the transposed convs get per-tensor weights (eager mode has no per-channel
transposed conv). Low-bit scopes: ``stem`` (conv1), ``encoder`` (layer1-4), ``decoder``
(deconv_layers), ``heads`` (hm/wh/reg); the first conv, the encoder's 1x1 downsampling shortcuts and each
head's last 1x1 stay float unless asked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

from qcompress.errors import QCompressError
from qcompress.models.detector import Detections, Detector, ModelSpec, PostprocessConfig
from qcompress.models.registry import CompressionSpec, register_arch

ARCH = "centernet_resnet18"
STRIDE = 4
HEAD_CONV = 64
TOP_K = 100
HM_BIAS = -2.19
SIZE_WEIGHT = 0.1
OFFSET_WEIGHT = 1.0
MIN_OVERLAP = 0.7
# CenterNet's mean (RGB order) and the mean of its three stds, in pixel units.
MEAN = (0.47026115 * 255, 0.44719302 * 255, 0.40789654 * 255)
STD = (0.28863828 + 0.27408164 + 0.27809835) / 3 * 255
RESNET18_BLOCKS = (2, 2, 2, 2)
HEADS = ("hm", "wh", "reg")


# ------------------------------------------------------------------------------------------ network
class BasicBlock(nn.Module):
    """ResNet basic block (msra_resnet keys: conv1, bn1, conv2, bn2, downsample.0/1); the residual add
    and the ReLU after it are one ``FloatFunctional.add_relu`` so the block quantizes in eager mode.

    ``bireal=True`` is Bi-Real Net's wiring (Liu et al., ECCV 2018) on the same tensors: a real-valued
    shortcut around *each* conv, ``y1 = relu(bn1(conv1(x)) + shortcut(x))``, ``y2 = relu(bn2(conv2(y1)) + y1)``,
    so a binarized conv only adds a correction to a real-valued path instead of replacing it."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, bireal: bool = False) -> None:
        super().__init__()
        self.bireal = bireal
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.skip_add_relu = FloatFunctional()
        if bireal:
            self.inner_add_relu = FloatFunctional()
            self.qcompress_fusion_groups = [["conv1", "bn1"], ["conv2", "bn2"]]
        else:
            self.qcompress_fusion_groups = [["conv1", "bn1", "relu"], ["conv2", "bn2"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if self.bireal:
            y = self.inner_add_relu.add_relu(self.bn1(self.conv1(x)), identity)
            return self.skip_add_relu.add_relu(self.bn2(self.conv2(y)), y)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.skip_add_relu.add_relu(out, identity)


class CenterNetResNet(nn.Module):
    """ResNet-18 encoder, three transposed-conv upsampling stages, heads ``hm``/``wh``/``reg`` (stride 4)."""

    def __init__(self, num_classes: int, width: int = 256, head_conv: int = HEAD_CONV, bireal: bool = False,
                 skips: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), RESNET18_BLOCKS)):
            stride = 1 if index == 0 else 2
            layer = [BasicBlock(inplanes, planes, stride, bireal)]
            layer += [BasicBlock(planes, planes, bireal=bireal) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
            inplanes = planes
        stages: list[nn.Module] = []
        for _ in range(3):
            stages += [nn.ConvTranspose2d(inplanes, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            inplanes = width
        self.deconv_layers = nn.Sequential(*stages)
        self.skip_layers: nn.ModuleList | None = None
        if skips:  # layer3, layer2, layer1 -> 1x1 conv + BN, added before each upsampling stage's ReLU
            self.skip_layers = nn.ModuleList(nn.Sequential(nn.Conv2d(planes, width, 1, bias=False), nn.BatchNorm2d(width))
                                             for planes in (256, 128, 64))
            self.skip_adds = nn.ModuleList(FloatFunctional() for _ in range(3))
        for head, outputs in zip(HEADS, (num_classes, 2, 2)):
            setattr(self, head, nn.Sequential(nn.Conv2d(width, head_conv, 3, 1, 1), nn.ReLU(),
                                              nn.Conv2d(head_conv, outputs, 1)))
        self.quant = QuantStub()
        self.dequant = DeQuantStub()
        self.qcompress_fusion_groups = [["conv1", "bn1", "relu"]]  # the stem is wired by attributes
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module not in (self.hm[2], self.wh[2],
                                                                                       self.reg[2]):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.hm[2].bias, HM_BIAS)
        for head in (self.wh[2], self.reg[2]):
            nn.init.normal_(head.weight, std=0.001)
            nn.init.zeros_(head.bias)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, 3, H, W)`` -> ``(hm logits (N, C, H/4, W/4), wh (N, 2, ..), reg (N, 2, ..))``, float."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.quant(x)))))
        if self.skip_layers is None:
            x = self.deconv_layers(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        else:
            c1 = self.layer1(x)
            c2 = self.layer2(c1)
            c3 = self.layer3(c2)
            x = self.layer4(c3)
            for stage, (lateral, skip, add) in enumerate(zip((c3, c2, c1), self.skip_layers, self.skip_adds)):
                up = self.deconv_layers[3 * stage + 1](self.deconv_layers[3 * stage](x))
                x = add.add_relu(up, skip(lateral))
        return self.dequant(self.hm(x)), self.dequant(self.wh(x)), self.dequant(self.reg(x))

    def forward(self, images, targets: Sequence[Mapping[str, torch.Tensor]] | None = None):
        """Eval: ``(N, 3, H, W)`` -> raw outputs. Train with targets: a list of images (or a batch) and
        their targets -> ``{"heatmap", "size_reg", "offset_reg"}`` weighted losses."""
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        raw = self.raw(x)
        if targets is None:
            return raw
        return centernet_losses(raw, targets, (x.shape[-2], x.shape[-1]))


# ----------------------------------------------------------------------------------------- targets
def gaussian_radius(height: float, width: float, min_overlap: float = MIN_OVERLAP) -> float:
    """CenterNet's heatmap radius for a ``height x width`` box (output cells): the smallest of the three
    corner-shift cases of CornerNet's quadratic bound, in CenterNet's own form."""

    def root(a: float, b: float, c: float) -> float:
        return (b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / 2

    r1 = root(1.0, height + width, width * height * (1 - min_overlap) / (1 + min_overlap))
    r2 = root(4.0, 2 * (height + width), (1 - min_overlap) * width * height)
    r3 = root(4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height)
    return min(r1, r2, r3)


def gaussian_kernel(radius: int) -> torch.Tensor:
    """``(2r+1, 2r+1)`` Gaussian with sigma (2r+1)/6 and peak 1; values below eps x peak are zero."""
    sigma = (2 * radius + 1) / 6
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma * sigma))
    kernel[kernel < torch.finfo(torch.float32).eps * kernel.max()] = 0
    return kernel


def draw_gaussian(heatmap: torch.Tensor, cx: int, cy: int, radius: int) -> None:
    """In place: ``heatmap = max(heatmap, Gaussian at (cx, cy))``, clipped at the borders."""
    kernel = gaussian_kernel(radius)
    height, width = heatmap.shape
    left, right = min(cx, radius), min(width - cx, radius + 1)
    top, bottom = min(cy, radius), min(height - cy, radius + 1)
    if right <= 0 or bottom <= 0 or left < 0 or top < 0:
        return
    region = heatmap[cy - top:cy + bottom, cx - left:cx + right]
    torch.maximum(region, kernel[radius - top:radius + bottom, radius - left:radius + right], out=region)


def encode_targets(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, output_size: tuple[int, int],
                   stride: float = STRIDE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's ``(heatmap (C, h, w), centre cells (K,) flat indices, sizes (K, 2), offsets (K, 2))``
    from boxes in input pixels and labels 1..C (boxes that vanish at stride 4 are dropped)."""
    out_h, out_w = output_size
    heatmap = torch.zeros(num_classes, out_h, out_w)
    cells, sizes, offsets = [], [], []
    scaled = boxes.float().reshape(-1, 4) / stride
    for box, label in zip(scaled.tolist(), labels.tolist()):
        x1, y1 = min(max(box[0], 0.0), out_w - 1), min(max(box[1], 0.0), out_h - 1)
        x2, y2 = min(max(box[2], 0.0), out_w - 1), min(max(box[3], 0.0), out_h - 1)
        h, w = y2 - y1, x2 - x1
        if h <= 0 or w <= 0 or not 1 <= label <= num_classes:
            continue
        radius = max(0, int(gaussian_radius(math.ceil(h), math.ceil(w))))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ix, iy = int(cx), int(cy)
        draw_gaussian(heatmap[label - 1], ix, iy, radius)
        cells.append(iy * out_w + ix)
        sizes.append((w, h))
        offsets.append((cx - ix, cy - iy))
    return (heatmap, torch.tensor(cells, dtype=torch.long), torch.tensor(sizes, dtype=torch.float32).reshape(-1, 2),
            torch.tensor(offsets, dtype=torch.float32).reshape(-1, 2))


# ------------------------------------------------------------------------------------------- losses
def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CornerNet/CenterNet penalty-reduced focal loss (alpha 2, beta 4) on Gaussian target heatmaps,
    summed and divided by the number of centres (cells where the target is 1); the sigmoid is clamped
    to [1e-4, 1 - 1e-4] as in CenterNet."""
    pred = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    negative = 1 - positive
    pos_loss = torch.log(pred) * (1 - pred) ** 2 * positive
    neg_loss = torch.log(1 - pred) * pred**2 * (1 - target) ** 4 * negative
    num_pos = positive.sum()
    total = -(pos_loss.sum() + neg_loss.sum())
    return total / num_pos if num_pos > 0 else total


def centernet_losses(raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                     input_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Focal heatmap loss + 0.1 x L1 size + 1 x L1 offset (at object centres, averaged over objects)."""
    hm, wh, reg = (t.float() for t in raw)
    _, num_classes, out_h, out_w = hm.shape
    stride = input_size[0] / out_h
    heatmaps, batch, cells, sizes, offsets = [], [], [], [], []
    for i, target in enumerate(targets):
        heat, cell, size, offset = encode_targets(target["boxes"], target["labels"], num_classes, (out_h, out_w), stride)
        heatmaps.append(heat)
        batch.append(torch.full_like(cell, i))
        cells.append(cell)
        sizes.append(size)
        offsets.append(offset)
    heatmap_loss = focal_loss(hm, torch.stack(heatmaps).to(hm.device))
    b, c = torch.cat(batch), torch.cat(cells)
    count = max(int(c.numel()), 1)
    wh_at = wh.flatten(2)[b, :, c]  # (K, 2)
    reg_at = reg.flatten(2)[b, :, c]
    size_loss = F.l1_loss(wh_at, torch.cat(sizes).to(wh.device), reduction="sum") / count
    offset_loss = F.l1_loss(reg_at, torch.cat(offsets).to(reg.device), reduction="sum") / count
    return {"heatmap": heatmap_loss, "size_reg": SIZE_WEIGHT * size_loss, "offset_reg": OFFSET_WEIGHT * offset_loss}


# ----------------------------------------------------------------------------------------- decoding
def decode(raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor], input_size: tuple[int, int], k: int = TOP_K
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heatmap peaks (3x3 max-pool) -> top-``k`` over classes and cells: ``(boxes (N, k, 4) xyxy input
    pixels, scores (N, k), class indices (N, k) 0-based)``, in float."""
    hm, wh, reg = (t.float() for t in raw)
    n, num_classes, out_h, out_w = hm.shape
    heat = torch.sigmoid(hm)
    heat = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    k = min(k, num_classes * out_h * out_w)
    scores, index = heat.reshape(n, -1).topk(k)
    classes, cells = index // (out_h * out_w), index % (out_h * out_w)
    ys, xs = (cells // out_w).float(), (cells % out_w).float()
    size = wh.flatten(2).gather(2, cells[:, None, :].expand(n, 2, k))  # (N, 2, k)
    offset = reg.flatten(2).gather(2, cells[:, None, :].expand(n, 2, k))
    cx, cy = xs + offset[:, 0], ys + offset[:, 1]
    half_w, half_h = size[:, 0] / 2, size[:, 1] / 2
    stride_y, stride_x = input_size[0] / out_h, input_size[1] / out_w
    boxes = torch.stack([(cx - half_w) * stride_x, (cy - half_h) * stride_y,
                         (cx + half_w) * stride_x, (cy + half_h) * stride_y], dim=-1)
    return boxes, scores, classes


def centernet_postprocess(input_size: tuple[int, int], raw, image_sizes: Sequence[tuple[int, int]],
                          config: PostprocessConfig) -> list[Detections]:
    """Raw outputs -> :class:`Detections` per original image (no NMS: the max-pool is CenterNet's)."""
    if not isinstance(raw, (tuple, list)) or len(raw) != 3:
        raise QCompressError("CenterNet returned no (hm, wh, reg) outputs",
                             "run the network in eval mode (detector.model.eval()) before post-processing")
    boxes, scores, classes = decode(raw, input_size)
    in_h, in_w = input_size
    results = []
    for image_boxes, image_scores, image_classes, (height, width) in zip(boxes, scores, classes, image_sizes):
        keep = torch.nonzero(image_scores > config.score_threshold).flatten()[: config.max_detections]
        factor = torch.tensor([width / in_w, height / in_h, width / in_w, height / in_h], dtype=torch.float32)
        limit = torch.tensor([width, height, width, height], dtype=torch.float32)
        results.append(Detections(boxes=torch.minimum((image_boxes[keep] * factor).clamp_(min=0), limit),
                                  labels=image_classes[keep] + 1, scores=image_scores[keep]))
    return results


# ------------------------------------------------------------------------------------------ registry
def _infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    weight = state_dict.get("hm.2.weight")
    if weight is None:
        return None
    if weight.ndim != 4 or weight.shape[0] < 1:
        raise QCompressError(f"hm.2.weight has shape {tuple(weight.shape)}; expected (classes, 64, 1, 1)",
                             "the file is damaged or from another architecture: pass the right --arch")
    return int(weight.shape[0]) + 1  # + background, which CenterNet's heatmap has no channel for


COMPRESSION = CompressionSpec(
    int8_parts=None,  # the whole network runs int8: it carries its own stubs and FloatFunctional adds
    lowbit_scopes={
        "stem": ("conv1", "bn1"),
        "encoder": ("layer1.*", "layer2.*", "layer3.*", "layer4.*"),
        "decoder": ("deconv_layers.*", "skip_layers.*"),
        "heads": ("hm.*", "wh.*", "reg.*"),
    },
    # the stem, each head's output 1x1 and the encoder's downsampling shortcuts (1x1, 1 % of the MACs; the
    # binary literature keeps them real-valued, Bi-Real's shortcut path stays real) stay float unless asked
    keep_float=("conv1", "layer*.downsample.0", "skip_layers.*.0", "hm.2", "wh.2", "reg.2"),
    heads=("hm.*", "wh.*", "reg.*"),
    training="native",
    output_names=("heatmap logits", "box sizes", "centre offsets"),
    # `--teacher`: the heads' shared input (the decoder's stride-4 features), imitated at the locations inside the
    # ground-truth boxes (anchor-free: no anchor module)
    native_taps=("", "hm", ""),
)


@register_arch(
    ARCH,
    "CenterNet, ResNet-18 (msra_resnet layout), stride 4; options input_size (default 320), width (256), "
    "head_conv (64), block (basic | bireal: a real-valued shortcut around every encoder conv), "
    "skips (false | true: layer1-3 added into the decoder through 1x1 convs)",
    _infer_num_classes,
    COMPRESSION,
)
def centernet_resnet18(class_names: Sequence[str], input_size: int = 320, width: int = 256,
                       head_conv: int = HEAD_CONV, block: str = "basic", skips: bool = False) -> Detector:
    if len(class_names) < 2:
        raise QCompressError(f"{ARCH} needs the background and at least one class", "pass a labels file")
    if int(input_size) < 64 or int(input_size) % 32:
        raise QCompressError(f"input size {input_size} must be a multiple of 32 and >= 64 for {ARCH}",
                             "e.g. 256, 320 or 512")
    if int(width) < 8:
        raise QCompressError(f"width {width} is too small for {ARCH}", "use 64..256 (256 is the original)")
    if int(head_conv) < 8:
        raise QCompressError(f"head_conv {head_conv} is too small for {ARCH}", "use 32..256 (64 is the original)")
    if block not in ("basic", "bireal"):
        raise QCompressError(f"block {block!r} is not a {ARCH} block",
                             "use 'basic' (ResNet, the original) or 'bireal' (a shortcut around every conv)")
    if not isinstance(skips, bool):
        raise QCompressError(f"skips {skips!r} is not true or false", "pass \"skips\": true or false")
    size, width, head_conv = int(input_size), int(width), int(head_conv)
    model = CenterNetResNet(len(class_names) - 1, width, head_conv, bireal=block == "bireal", skips=skips).eval()
    options = {"input_size": size, "width": width, "head_conv": head_conv, "block": block}
    if skips:  # recorded only when set, so the sidecars of checkpoints without it stay as they were
        options["skips"] = True
    spec = ModelSpec(ARCH, tuple(class_names), (size, size), MEAN, STD, options)
    return Detector(model, spec, partial(centernet_postprocess, (size, size)))


__all__ = ["CenterNetResNet", "centernet_losses", "centernet_postprocess", "centernet_resnet18", "decode",
           "draw_gaussian", "encode_targets", "focal_loss", "gaussian_radius"]
