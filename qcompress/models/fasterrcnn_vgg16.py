"""Faster R-CNN with a VGG16 feature extractor, in the ``state_dict`` layout of simple-faster-rcnn-pytorch
(chenyuntc), so its VOC checkpoints load strictly.

Layout (``FasterRCNNVGG16`` there; ``n_class`` counts the background):

- ``extractor``: VGG16 ``features[:30]`` (conv1_1 .. conv5_3 with their ReLUs, four max-pools: stride 16; the
  last max-pool is removed). Conv names are Sequential indices:

  conv1_1 0, conv1_2 2 | conv2_1 5, conv2_2 7 | conv3_1 10, conv3_2 12, conv3_3 14 |
  conv4_1 17, conv4_2 19, conv4_3 21 | conv5_1 24, conv5_2 26, conv5_3 28 (``extractor.N``; ReLUs at N + 1,
  max-pools at 4, 9, 16, 23).

- ``rpn.conv1`` (3x3, 512 -> 512, ReLU), ``rpn.score`` (1x1, 9 anchors x 2 softmax logits, channel
  ``anchor * 2 + class``, class 1 = object), ``rpn.loc`` (1x1, 9 x 4 deltas ``(dy, dx, dh, dw)``);
- ``head.classifier.0`` / ``head.classifier.2``: fc6 / fc7 (``Linear(512*7*7, 4096)``, ``Linear(4096, 4096)``,
  each followed by ReLU, VGG's dropout removed: the reference's ``use_drop=False``), ``head.cls_loc``
  (``n_class * 4`` deltas ``(dy, dx, dh, dw)`` normalised by std ``(0.1, 0.1, 0.2, 0.2)``) and ``head.score``
  (``n_class`` logits).

Anchors: base 16, ratios (0.5, 1, 2) x scales (8, 16, 32), anchor ``i * 3 + j`` for ratio ``i`` and scale
``j``, ``(K, A)`` order over the feature map (row-major cells), exactly the reference's; ours are ``xyxy``
where the reference writes ``yxyx`` (the same boxes). Proposals: decode, clip to the input, drop boxes
smaller than the minimum size, top 12000 (train) / 6000 (test) by objectness, NMS 0.7, keep 2000 / 300
(greedy NMS stopping at the 2000th / 300th survivor, :mod:`qcompress.models.inference_ops`: the same boxes).
RoI max pooling 7x7 at 1/16 (``torchvision.ops.roi_pool``, what the reference calls; for inference
the channels-last kernel of :mod:`~qcompress.models.inference_ops`, equal values). Decoding of the
head: per-class boxes, softmax scores, per-class NMS 0.3 (the reference's ``evaluate`` preset; the
:class:`~qcompress.models.detector.PostprocessConfig` score threshold and detection cap apply, its IoU
threshold does not).

Deviations, all documented choices for a fixed-size pipeline:

- The image is resized to ``input_size x input_size`` (the reference: shorter side 600, longer <= 1000).
  Anchor sizes and the proposals' minimum size (16 px) scale with ``input_size / 600``, so objects and
  anchors keep the proportion they have at 600 px; at ``input_size=600`` they are the reference's.
- Normalisation: torchvision's ImageNet mean (RGB, 0..255) and one std, the mean of its three (the
  reference divides each channel by its own std: 0.229/0.224/0.225).
- In evaluation each image's proposals are padded to exactly 300 by repeating its last proposal (the
  whole image when none survives): repeated RoIs give repeated boxes that the per-class NMS removes, and
  fixed shapes let int8 and fp32 outputs be compared and exported. ``exp`` of ``dh``/``dw`` is clamped at
  ``log(1000/16)`` (torchvision's guard; the reference has none).
- Training does not freeze conv1_1 .. conv2_2 (the reference does, for ImageNet-pretrained VGG; nothing
  here is pretrained).

Options (recorded in the sidecar): ``input_size`` (default 600; e.g. 320 for a CPU example), ``width``
(channel multiplier of VGG and the RPN, e.g. 0.25; 1 is the reference), ``fc`` (fc6/fc7 width, 4096) and
``anchor_scales`` (three multiples of the 16-pixel base at 600 px, ``[8, 16, 32]``; e.g. ``[4, 8, 16]`` for
objects of 8 % .. 50 % of the image).

Training (``training="native"``): in train mode ``model(images, targets)`` (a list of preprocessed images
and ``{"boxes": xyxy input pixels, "labels": 1..C}`` per image) returns the reference's four losses:
RPN softmax cross-entropy over 256 anchors (at most half positive: IoU >= 0.7 or the best anchor of a
box; negative below 0.3; anchors crossing the image border ignored) + smooth L1 (sigma 3); head
cross-entropy over 128 sampled RoIs (proposals + ground truth, at most 25 % with IoU >= 0.5, the rest
background in [0, 0.5)) + smooth L1 (sigma 1) on the true class's normalised deltas. In eval mode
``model(batch)`` returns ``(roi box deltas (R, C*4), roi class logits (R, C), rois (R, 4) xyxy input
pixels, roi image index (R,) float)`` and decoding runs in float outside the network.

Compression: int8 runs the extractor, the RPN convs and fc6/fc7 (RoI pooling, proposals, the two
output layers and decoding stay float). Low-bit scopes: ``backbone`` (the extractor) and ``conv1`` ..
``conv5`` (VGG blocks); ``fc6`` is a Linear, reachable by ``qat --steps``. The layer-by-layer binary
table of the 1-bit Faster R-CNN (issue 19) is::

    qcompress qat --method binary --steps "extractor.0,extractor.2,extractor.5,extractor.7;\
extractor.10,extractor.12,extractor.14;extractor.17,extractor.19,extractor.21;\
extractor.24,extractor.26,extractor.28;head.classifier.0"

(step 1 includes conv1_1, which ``--scope`` would keep float; the source binarizes it too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_iou, roi_pool

from qcompress.errors import QCompressError
from qcompress.models.detector import Detections, Detector, ModelSpec, PostprocessConfig
from qcompress.models.inference_ops import MaxPool2x2, exporting, nms_sorted, roi_max_pool
from qcompress.models.registry import CompressionSpec, classes_from_head, register_arch

ARCH = "fasterrcnn_vgg16"
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
              "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
FEAT_STRIDE = 16
ANCHOR_BASE = 16
RATIOS = (0.5, 1.0, 2.0)
SCALES = (8.0, 16.0, 32.0)
REFERENCE_SIZE = 600
ROI_SIZE = 7
LOC_STD = (0.1, 0.1, 0.2, 0.2)
MIN_SIZE = 16.0
RPN_NMS = 0.7
PRE_NMS = {True: 12000, False: 6000}  # training -> count
POST_NMS = {True: 2000, False: 300}
RPN_SAMPLES, RPN_POS_FRACTION, RPN_POS_IOU, RPN_NEG_IOU = 256, 0.5, 0.7, 0.3
ROI_SAMPLES, ROI_POS_FRACTION, ROI_POS_IOU, ROI_NEG_HI, ROI_NEG_LO = 128, 0.25, 0.5, 0.5, 0.0
RPN_SIGMA, ROI_SIGMA = 3.0, 1.0
HEAD_NMS = 0.3
BBOX_CLIP = math.log(1000.0 / 16)
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 + 0.224 + 0.225) / 3 * 255


def conv_indices() -> dict[str, int]:
    """VGG16 conv name (``conv1_1`` .. ``conv5_3``) -> its index in ``extractor``."""
    indices, i = [], 0
    for layer in VGG16_LAYERS:
        if layer == "M":
            i += 1
        else:
            indices.append(i)
            i += 2  # conv, ReLU
    return dict(zip(CONV_NAMES, indices))


def _channels(c: int, width: float) -> int:
    return max(4, round(c * width))


# ------------------------------------------------------------------------------------------ boxes
def anchor_base(base_size: float = ANCHOR_BASE, ratios: Sequence[float] = RATIOS,
                scales: Sequence[float] = SCALES) -> torch.Tensor:
    """``(len(ratios) * len(scales), 4)`` xyxy anchors centred on ``(base/2, base/2)``: anchor ``i * S + j``
    has height ``base * scales[j] * sqrt(ratios[i])`` and width ``base * scales[j] / sqrt(ratios[i])``."""
    rows = []
    centre = base_size / 2.0
    for ratio in ratios:
        for scale in scales:
            h = base_size * scale * math.sqrt(ratio)
            w = base_size * scale * math.sqrt(1.0 / ratio)
            rows.append((centre - w / 2, centre - h / 2, centre + w / 2, centre + h / 2))
    return torch.tensor(rows, dtype=torch.float32)


def shifted_anchors(base: torch.Tensor, stride: int, height: int, width: int) -> torch.Tensor:
    """``(height * width * A, 4)`` anchors over a feature map, cell-major (row by row), anchors inner."""
    ys = torch.arange(height, dtype=torch.float32) * stride
    xs = torch.arange(width, dtype=torch.float32) * stride
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)], dim=1)
    return (shifts[:, None, :] + base[None]).reshape(-1, 4)


def loc2bbox(boxes: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """Decode ``(dy, dx, dh, dw)`` deltas (the reference's order) against xyxy ``boxes``; returns xyxy."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    dy, dx = loc[:, 0], loc[:, 1]
    dh, dw = loc[:, 2].clamp(max=BBOX_CLIP), loc[:, 3].clamp(max=BBOX_CLIP)
    ncx, ncy = dx * widths + cx, dy * heights + cy
    nw, nh = torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([ncx - 0.5 * nw, ncy - 0.5 * nh, ncx + 0.5 * nw, ncy + 0.5 * nh], dim=1)


def bbox2loc(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``(dy, dx, dh, dw)`` that move xyxy ``src`` onto xyxy ``dst`` (inverse of :func:`loc2bbox`)."""
    eps = torch.finfo(torch.float32).eps
    w, h = (src[:, 2] - src[:, 0]).clamp(min=eps), (src[:, 3] - src[:, 1]).clamp(min=eps)
    cx, cy = src[:, 0] + 0.5 * w, src[:, 1] + 0.5 * h
    gw, gh = dst[:, 2] - dst[:, 0], dst[:, 3] - dst[:, 1]
    gcx, gcy = dst[:, 0] + 0.5 * gw, dst[:, 1] + 0.5 * gh
    return torch.stack([(gcy - cy) / h, (gcx - cx) / w, torch.log(gh.clamp(min=eps) / h),
                        torch.log(gw.clamp(min=eps) / w)], dim=1)


def rpn_objectness(scores: torch.Tensor) -> torch.Tensor:
    """``(..., 2)`` RPN logits ``(background, object)`` -> object probability (softmax, class 1)."""
    return torch.softmax(scores.float(), dim=-1)[..., 1]


def rpn_outputs(loc_map: torch.Tensor, score_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RPN maps ``(N, A*4, H, W)``, ``(N, A*2, H, W)`` -> ``(N, H*W*A, 4)`` deltas and ``(N, H*W*A, 2)`` logits,
    in :func:`shifted_anchors` order (channel ``a * 4 + k`` / ``a * 2 + c`` of cell ``(y, x)``)."""
    n = loc_map.shape[0]
    return (loc_map.permute(0, 2, 3, 1).reshape(n, -1, 4), score_map.permute(0, 2, 3, 1).reshape(n, -1, 2))


def propose(loc: torch.Tensor, objectness: torch.Tensor, anchors: torch.Tensor, image_size: tuple[int, int],
            min_size: float, training: bool, pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ProposalCreator, batched: ``(rois (R, 4) xyxy, image index (R,))``, each image's
    rois in descending objectness. ``pad``: exactly :data:`POST_NMS` rois per image (see the module doc)."""
    n, m = objectness.shape
    height, width = image_size
    boxes = loc2bbox(anchors.repeat(n, 1), loc.reshape(-1, 4).float()).reshape(n, m, 4)
    boxes = torch.stack([boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
                         boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)], dim=-1)
    big = ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)
    scores = objectness.float().masked_fill(~big, -1.0)
    k = min(PRE_NMS[training], m)
    top, order = scores.topk(k, dim=1)
    top_boxes = boxes.gather(1, order[..., None].expand(n, k, 4))
    image = torch.arange(n)[:, None].expand(n, k)
    valid = top >= 0
    post = POST_NMS[training]
    if exporting():  # graph ops: NMS over every candidate, then the first `post` of each image
        b, s, i = top_boxes[valid], top[valid], image[valid]
        keep = batched_nms(b, s, i, RPN_NMS)  # descending score
        b, i = b[keep], i[keep]
        # by image, descending score within each image (objectness < 1, so the key never crosses images;
        # argsort rather than a stable sort: ONNX has no stable sort)
        regroup = torch.argsort(i.float() * 2 - s[keep])
        b, i = b[regroup], i[regroup]
    else:  # the same boxes, NMS stopping at `post` per image (qcompress.models.inference_ops)
        candidates = [top_boxes[j][valid[j]] for j in range(n)]
        kept = [boxes_j[nms_sorted(boxes_j, RPN_NMS, post)] for boxes_j in candidates]
        b = torch.cat(kept) if kept else top_boxes.reshape(0, 4)
        i = torch.arange(n).repeat_interleave(torch.tensor([len(x) for x in kept], dtype=torch.long))
    counts = (i[None, :] == torch.arange(n)[:, None]).sum(dim=1)
    starts = torch.cumsum(counts, 0) - counts
    if not pad:
        rank = torch.arange(i.numel()) - starts[i]
        chosen = rank < post
        return b[chosen], i[chosen]
    slots = torch.arange(post)[None, :].expand(n, post)
    last = (counts.clamp(max=post) - 1).clamp(min=0)[:, None]
    index = (starts[:, None] + torch.minimum(slots, last)).clamp(max=max(b.shape[0] - 1, 0))
    whole = torch.tensor([0.0, 0.0, float(width), float(height)])
    padded = b[index.reshape(-1)] if b.shape[0] else whole.expand(n * post, 4)
    empty = (counts == 0)[:, None].expand(n, post).reshape(-1, 1)
    rois = torch.where(empty, whole.expand(n * post, 4), padded)
    return rois, torch.arange(n).repeat_interleave(post)


# ---------------------------------------------------------------------------------------- targets
def _sample(candidates: torch.Tensor, count: int) -> torch.Tensor:
    if candidates.numel() <= count:
        return candidates
    return candidates[torch.randperm(candidates.numel())[:count]]


def anchor_targets(gt: torch.Tensor, anchors: torch.Tensor, image_size: tuple[int, int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's AnchorTargetCreator: ``(deltas (M, 4), labels (M,))`` with labels 1 object, 0
    background, -1 ignored (crossing the border, or not sampled)."""
    height, width = image_size
    m = anchors.shape[0]
    labels = torch.full((m,), -1, dtype=torch.long)
    deltas = torch.zeros(m, 4)
    inside = torch.nonzero((anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= width)
                           & (anchors[:, 3] <= height)).flatten()
    if inside.numel() == 0:
        return deltas, labels
    inner = anchors[inside]
    inner_labels = torch.full((inside.numel(),), -1, dtype=torch.long)
    if gt.numel() == 0:
        inner_labels[:] = 0
        assigned = None
    else:
        iou = box_iou(inner, gt)
        max_iou, assigned = iou.max(dim=1)
        inner_labels[max_iou < RPN_NEG_IOU] = 0
        gt_best = iou.max(dim=0).values
        best = torch.nonzero((iou == gt_best[None]) & (gt_best[None] > 0))[:, 0]
        inner_labels[best] = 1
        inner_labels[max_iou >= RPN_POS_IOU] = 1
    positives = torch.nonzero(inner_labels == 1).flatten()
    keep_pos = _sample(positives, int(RPN_POS_FRACTION * RPN_SAMPLES))
    inner_labels[positives] = -1
    inner_labels[keep_pos] = 1
    negatives = torch.nonzero(inner_labels == 0).flatten()
    keep_neg = _sample(negatives, RPN_SAMPLES - keep_pos.numel())
    inner_labels[negatives] = -1
    inner_labels[keep_neg] = 0
    labels[inside] = inner_labels
    if assigned is not None:
        deltas[inside] = bbox2loc(inner, gt[assigned])
    return deltas, labels


def roi_targets(rois: torch.Tensor, gt: torch.Tensor, gt_labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's ProposalTargetCreator: ``(sampled rois (S, 4), normalised deltas (S, 4), labels (S,))``
    from the proposals and the ground truth (which joins the candidates); label 0 is the background."""
    rois = torch.cat([rois, gt], dim=0)
    if gt.numel() == 0:
        sample = _sample(torch.arange(rois.shape[0]), ROI_SAMPLES)
        return rois[sample], torch.zeros(sample.numel(), 4), torch.zeros(sample.numel(), dtype=torch.long)
    iou = box_iou(rois, gt)
    max_iou, assigned = iou.max(dim=1)
    positives = _sample(torch.nonzero(max_iou >= ROI_POS_IOU).flatten(), round(ROI_SAMPLES * ROI_POS_FRACTION))
    negatives = torch.nonzero((max_iou < ROI_NEG_HI) & (max_iou >= ROI_NEG_LO)).flatten()
    negatives = _sample(negatives, ROI_SAMPLES - positives.numel())
    keep = torch.cat([positives, negatives])
    labels = gt_labels.long()[assigned[keep]].clone()
    labels[positives.numel():] = 0
    sampled = rois[keep]
    deltas = bbox2loc(sampled, gt[assigned[keep]]) / torch.tensor(LOC_STD)
    return sampled, deltas, labels


def smooth_l1_loc_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, sigma: float) -> torch.Tensor:
    """The reference's ``_fast_rcnn_loc_loss``: smooth L1 (``sigma``) summed over positives (label > 0),
    divided by the number of non-ignored samples (label >= 0)."""
    sigma2 = sigma**2
    weight = (labels > 0).float()[:, None]
    diff = (weight * (pred.float() - target)).abs()
    loss = torch.where(diff < 1.0 / sigma2, 0.5 * sigma2 * diff**2, diff - 0.5 / sigma2).sum()
    return loss / max(int((labels >= 0).sum()), 1)


# ---------------------------------------------------------------------------------------- network
def vgg16_extractor(width: float = 1.0) -> nn.Sequential:
    """VGG16 ``features[:30]``: conv1_1 .. conv5_3 with ReLUs and the first four max-pools."""
    layers: list[nn.Module] = []
    channels = 3
    for layer in VGG16_LAYERS:
        if layer == "M":
            layers.append(MaxPool2x2())  # nn.MaxPool2d(2, 2), faster for inference
            continue
        out = _channels(int(layer), width)
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers)


class RegionProposalNetwork(nn.Module):
    """``conv1`` (3x3) + ReLU, then ``loc`` (A x 4 deltas) and ``score`` (A x 2 logits); the network part
    only (anchors and proposals live in :class:`FasterRCNNVGG16`)."""

    def __init__(self, in_channels: int, mid_channels: int, anchors: int = len(RATIOS) * len(SCALES)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, 1, 1)
        self.relu = nn.ReLU()
        self.score = nn.Conv2d(mid_channels, anchors * 2, 1)
        self.loc = nn.Conv2d(mid_channels, anchors * 4, 1)
        self.qcompress_fusion_groups = [["conv1", "relu"]]
        for conv in (self.conv1, self.score, self.loc):
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.relu(self.conv1(x))
        return self.loc(h), self.score(h)


class VGG16RoIHead(nn.Module):
    """RoI max pooling 7x7 at 1/16, fc6/fc7 (``classifier``), per-class deltas (``cls_loc``) and logits (``score``)."""

    def __init__(self, n_class: int, in_channels: int, fc: int) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(in_channels * ROI_SIZE * ROI_SIZE, fc), nn.ReLU(inplace=True),
                                        nn.Linear(fc, fc), nn.ReLU(inplace=True))
        self.cls_loc = nn.Linear(fc, n_class * 4)
        self.score = nn.Linear(fc, n_class)
        self.n_class = n_class
        for linear in (self.classifier[0], self.classifier[2]):  # torchvision's VGG classifier init
            nn.init.normal_(linear.weight, 0, 0.01)
            nn.init.zeros_(linear.bias)
        nn.init.normal_(self.cls_loc.weight, 0, 0.001)
        nn.init.zeros_(self.cls_loc.bias)
        nn.init.normal_(self.score.weight, 0, 0.01)
        nn.init.zeros_(self.score.bias)

    def forward(self, features: torch.Tensor, rois: torch.Tensor, roi_indices: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        indexed = torch.cat([roi_indices.to(rois.dtype)[:, None], rois], dim=1)
        if features.requires_grad or exporting():
            pool = roi_pool(features.float(), indexed, (ROI_SIZE, ROI_SIZE), 1.0 / FEAT_STRIDE)
        else:  # inference: the same values, channels-last (qcompress.models.inference_ops)
            pool = roi_max_pool(features, indexed, ROI_SIZE, 1.0 / FEAT_STRIDE)
        fc7 = self.classifier(pool.flatten(1))
        return self.cls_loc(fc7), self.score(fc7)


class AnchorGrid(nn.Module):
    """``features (N, C, H, W)`` -> the ``(H * W * A, 4)`` xyxy anchors over them (:func:`shifted_anchors`),
    shared by every image. A module so that a teacher's imitation mask (``native_taps``) can see them; it
    holds no state_dict entries (``base`` is a plain attribute)."""

    def __init__(self, base: torch.Tensor, stride: int = FEAT_STRIDE) -> None:
        super().__init__()
        self.base = base
        self.stride = stride

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return shifted_anchors(self.base, self.stride, features.shape[-2], features.shape[-1])


class FasterRCNNVGG16(nn.Module):
    """``extractor`` -> ``rpn`` -> proposals -> ``head`` (see the module docstring for the layout)."""

    def __init__(self, n_class: int, width: float = 1.0, fc: int = 4096, input_size: int = REFERENCE_SIZE,
                 anchor_scales: Sequence[float] = SCALES) -> None:
        super().__init__()
        c5 = _channels(512, width)
        self.extractor = vgg16_extractor(width)
        self.rpn = RegionProposalNetwork(c5, c5)
        self.head = VGG16RoIHead(n_class, c5, fc)
        for module in self.extractor:
            if isinstance(module, nn.Conv2d):  # torchvision's VGG init
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        scale = input_size / REFERENCE_SIZE
        # Plain attributes, not buffers: nothing outside the reference's keys enters the state_dict.
        self.anchor_base = anchor_base(ANCHOR_BASE * scale, RATIOS, anchor_scales)
        self.anchors = AnchorGrid(self.anchor_base)
        self.min_size = MIN_SIZE * scale

    def _proposals(self, features: torch.Tensor, image_size: tuple[int, int], pad: bool):
        loc_map, score_map = self.rpn(features)
        rpn_loc, rpn_score = rpn_outputs(loc_map.float(), score_map.float())
        anchors = self.anchors(features)
        rois, indices = propose(rpn_loc.detach(), rpn_objectness(rpn_score.detach()), anchors, image_size,
                                self.min_size, self.training, pad)
        return rpn_loc, rpn_score, anchors, rois, indices

    def forward(self, images, targets: Sequence[Mapping[str, torch.Tensor]] | None = None):
        """Without targets: ``(N, 3, H, W)`` -> ``(roi deltas, roi logits, rois, roi image index)``. With
        targets (a list of images or a batch): the four training losses."""
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        image_size = (int(x.shape[-2]), int(x.shape[-1]))
        features = self.extractor(x).float()
        rpn_loc, rpn_score, anchors, rois, indices = self._proposals(features, image_size, pad=targets is None)
        if targets is None:
            cls_loc, score = self.head(features, rois, indices)
            return cls_loc, score, rois, indices.float()
        return self._losses(features, rpn_loc, rpn_score, anchors, rois, indices, targets, image_size)

    def _losses(self, features, rpn_loc, rpn_score, anchors, rois, indices, targets, image_size
                ) -> dict[str, torch.Tensor]:
        rpn_loc_losses, rpn_cls_losses = [], []
        sampled, sampled_index, roi_deltas, roi_labels = [], [], [], []
        for i, target in enumerate(targets):
            gt = target["boxes"].float().reshape(-1, 4).to(features.device)
            labels = target["labels"].long().reshape(-1)
            deltas, anchor_labels = anchor_targets(gt, anchors, image_size)
            rpn_loc_losses.append(smooth_l1_loc_loss(rpn_loc[i], deltas, anchor_labels, RPN_SIGMA))
            if bool((anchor_labels >= 0).any()):
                rpn_cls_losses.append(F.cross_entropy(rpn_score[i], anchor_labels, ignore_index=-1))
            else:
                rpn_cls_losses.append(rpn_score[i].sum() * 0.0)
            roi, delta, label = roi_targets(rois[indices == i], gt, labels)
            sampled.append(roi)
            sampled_index.append(torch.full((roi.shape[0],), i, dtype=torch.long))
            roi_deltas.append(delta)
            roi_labels.append(label)
        sample_rois, labels_all = torch.cat(sampled), torch.cat(roi_labels)
        cls_loc, score = self.head(features, sample_rois, torch.cat(sampled_index))
        picked = cls_loc.float().reshape(cls_loc.shape[0], -1, 4)[torch.arange(cls_loc.shape[0]), labels_all]
        return {
            "rpn_box_reg": torch.stack(rpn_loc_losses).mean(),
            "rpn_objectness": torch.stack(rpn_cls_losses).mean(),
            "roi_box_reg": smooth_l1_loc_loss(picked, torch.cat(roi_deltas), labels_all, ROI_SIGMA),
            "roi_classifier": F.cross_entropy(score.float(), labels_all),
        }


# ----------------------------------------------------------------------------------------- decoding
def decode_head(cls_loc: torch.Tensor, rois: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """``(R, C*4)`` normalised ``(dy, dx, dh, dw)`` against ``(R, 4)`` xyxy rois -> ``(R, C, 4)`` xyxy boxes
    clipped to the input."""
    r = rois.shape[0]
    deltas = cls_loc.float().reshape(r, -1, 4) * torch.tensor(LOC_STD)
    c = deltas.shape[1]
    boxes = loc2bbox(rois.float()[:, None, :].expand(r, c, 4).reshape(-1, 4), deltas.reshape(-1, 4)).reshape(r, c, 4)
    height, width = image_size
    limit = torch.tensor([width, height, width, height], dtype=torch.float32)
    return torch.minimum(boxes.clamp(min=0), limit)


def fasterrcnn_postprocess(input_size: tuple[int, int], raw, image_sizes: Sequence[tuple[int, int]],
                           config: PostprocessConfig) -> list[Detections]:
    """Raw outputs -> :class:`Detections` per original image: per-class boxes, softmax, per-class NMS 0.3."""
    if not isinstance(raw, (tuple, list)) or len(raw) != 4:
        raise QCompressError("Faster R-CNN returned no (deltas, logits, rois, indices) outputs",
                             "run the network in eval mode without targets before post-processing")
    cls_loc, logits, rois, indices = raw
    boxes = decode_head(cls_loc, rois, input_size)
    probs = torch.softmax(logits.float(), dim=1)
    n_class = probs.shape[1]
    in_h, in_w = input_size
    results = []
    for i, (height, width) in enumerate(image_sizes):
        mine = indices.long() == i
        image_boxes, image_probs = boxes[mine][:, 1:], probs[mine][:, 1:]
        classes = torch.arange(1, n_class).expand_as(image_probs)
        keep = image_probs > config.score_threshold
        cand_boxes, cand_scores, cand_labels = image_boxes[keep], image_probs[keep], classes[keep]
        kept = batched_nms(cand_boxes, cand_scores, cand_labels, HEAD_NMS)[: config.max_detections]
        factor = torch.tensor([width / in_w, height / in_h, width / in_w, height / in_h], dtype=torch.float32)
        limit = torch.tensor([width, height, width, height], dtype=torch.float32)
        results.append(Detections(boxes=torch.minimum(cand_boxes[kept] * factor, limit),
                                  labels=cand_labels[kept].long(), scores=cand_scores[kept]))
    return results


# ----------------------------------------------------------------------------------------- registry
_BLOCKS = {f"conv{b}": tuple(f"extractor.{i}" for n, i in conv_indices().items() if n.startswith(f"conv{b}_"))
           for b in range(1, 6)}

COMPRESSION = CompressionSpec(
    int8_parts=("extractor", "rpn", "head.classifier"),
    lowbit_scopes={"backbone": ("extractor.*",), **_BLOCKS},
    keep_float=("extractor.0", "rpn.score", "rpn.loc", "head.cls_loc", "head.score"),
    heads=("rpn.*", "head.cls_loc", "head.score"),
    training="native",
    output_names=("roi box deltas", "roi class logits", "rois", "roi image index"),
    native_taps=("", "extractor", "anchors"),  # `--teacher`: conv5_3's features near objects, over the RPN's anchors
)


@register_arch(
    ARCH,
    "Faster R-CNN, VGG16 (simple-faster-rcnn-pytorch layout), stride 16; options input_size (600), width (1.0), fc (4096), "
    "anchor_scales ([8, 16, 32])",
    lambda sd: classes_from_head(sd, "head.score.weight", 1),
    COMPRESSION,
)
def fasterrcnn_vgg16(class_names: Sequence[str], input_size: int = REFERENCE_SIZE, width: float = 1.0,
                     fc: int = 4096, anchor_scales: Sequence[float] = SCALES) -> Detector:
    if len(class_names) < 2:
        raise QCompressError(f"{ARCH} needs the background and at least one class", "pass a labels file")
    if int(input_size) < 64:
        raise QCompressError(f"input size {input_size} is too small for {ARCH}", "use 64 or more (600 is the reference)")
    if not 0 < float(width) <= 4:
        raise QCompressError(f"width {width} is outside (0, 4] for {ARCH}", "e.g. 0.25, 0.5 or 1 (the reference)")
    if int(fc) < 8:
        raise QCompressError(f"fc {fc} is too small for {ARCH}", "e.g. 256, 1024 or 4096 (the reference)")
    scales = [float(v) for v in anchor_scales]
    if len(scales) != len(SCALES) or min(scales) <= 0:
        raise QCompressError(f"anchor_scales {list(anchor_scales)} must be {len(SCALES)} positive numbers "
                             f"(the RPN has {len(RATIOS) * len(SCALES)} anchors)", "e.g. [8, 16, 32] (the reference)")
    size, width, fc = int(input_size), float(width), int(fc)
    model = FasterRCNNVGG16(len(class_names), width, fc, size, scales).eval()
    options: dict = {"input_size": size, "width": width, "fc": fc}
    if scales != [float(v) for v in SCALES]:
        options["anchor_scales"] = scales
    spec = ModelSpec(ARCH, tuple(class_names), (size, size), MEAN, STD, options)
    return Detector(model, spec, partial(fasterrcnn_postprocess, (size, size)))


__all__ = ["COMPRESSION", "AnchorGrid", "FasterRCNNVGG16", "anchor_base", "anchor_targets", "bbox2loc", "conv_indices",
           "decode_head", "fasterrcnn_postprocess", "fasterrcnn_vgg16", "loc2bbox", "propose", "roi_targets",
           "rpn_objectness", "rpn_outputs", "shifted_anchors", "smooth_l1_loc_loss"]
