"""Inference versions of a two-stage detector's float parts: greedy NMS that stops after ``max_keep`` boxes
(proposal layers keep only the first N), RoI max pooling over channels-last features, and 2x2 max pooling.

In a narrow or binarized Faster R-CNN these float parts, not the convolutions, set the latency: at 320 px
and width 0.25 (1 thread, AMD EPYC) the RPN's NMS over 3,600 boxes, torchvision's ``roi_pool`` and torch's
NCHW ``max_pool2d`` (28 ms for 16 x 320 x 320, 2.3 ms channels-last) took more time per image than the whole
binarized extractor. Each returns exactly what the op it replaces returns (tests compare them); the model
calls them only for inference (no gradient, not traced or exported, not on quantized tensors).

A region proposal network sends thousands of boxes to NMS (3,600 at 320 px, 12,000 during the
reference's training) and keeps the best 300 / 2,000 survivors. ``torchvision.ops.nms`` suppresses
through the whole list first, about ``n**2 / 2`` IoUs when few boxes overlap (a young or binarized
RPN); greedy NMS decides each box from the boxes kept before it alone, so its first ``max_keep``
survivors are final as soon as they are found, and the rest of the list need not be visited:
at most ``max_keep * n`` IoUs. :func:`nms_sorted` returns exactly ``torchvision.ops.nms(...)[:max_keep]``
for boxes given in the order torchvision's stable descending sort puts them in (same float32 IoU, same
strict ``> threshold``); tests compare the two.

Under tracing, scripting or ONNX export the caller keeps torchvision's op (a numba kernel cannot be
traced); see :func:`exporting`.

RoI max pooling (:func:`roi_max_pool`): torchvision's CPU ``roi_pool`` walks channel by channel through
NCHW features and writes an argmax map for the backward pass. Inference needs neither: the kernel here
visits each bin once with all channels contiguous (NHWC), so the maximum over a bin's cells is a
vectorised loop over channels. Bin edges are torchvision's, computed the same way in float32 (RoI
corners times the scale rounded half away from zero, ``floor`` / ``ceil`` of ``k * bin_size``, malformed
RoIs forced to 1x1, empty bins 0, ``>`` comparisons from ``-FLT_MAX``).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn


def exporting() -> bool:
    """Whether the model is being traced, scripted or exported (use graph ops only)."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


@functools.lru_cache(maxsize=1)
def _kernels() -> SimpleNamespace:
    """The numba kernels, compiled on first use (cached on disk), so that importing the model registry, which
    imports every architecture, does not import numba (as :mod:`qcompress.runtime.binary` does)."""
    from numba import njit, prange

    @njit(cache=True, error_model="numpy")  # x / 0 -> nan (a zero-area pair), as in C++
    def _greedy_nms(boxes: np.ndarray, threshold: float, max_keep: int) -> np.ndarray:  # pragma: no cover - numba
        n = boxes.shape[0]
        x1, y1 = np.ascontiguousarray(boxes[:, 0]), np.ascontiguousarray(boxes[:, 1])
        x2, y2 = np.ascontiguousarray(boxes[:, 2]), np.ascontiguousarray(boxes[:, 3])
        areas = (x2 - x1) * (y2 - y1)
        zero = np.float32(0.0)
        # float32 IoU > threshold (a double, as in C++) <=> IoU > the largest float32 <= threshold
        limit = np.float32(threshold)
        if np.float64(limit) > threshold:
            limit = np.nextafter(limit, np.float32(-np.inf))
        suppressed = np.zeros(n, np.uint8)
        keep = np.empty(min(n, max_keep), np.int64)
        count = 0
        for i in range(n):
            if suppressed[i]:
                continue
            keep[count] = i
            count += 1
            if count == max_keep:
                break
            ix1, iy1, ix2, iy2, area = x1[i], y1[i], x2[i], y2[i], areas[i]
            # torchvision's arithmetic, std::max(a, b) = a < b ? b : a and std::min(a, b) = b < a ? b : a written as
            # selects over slices (no branch, no negative index, not Python's max): LLVM vectorises the loop (~7x)
            a1, b1, a2, b2 = x1[i + 1:], y1[i + 1:], x2[i + 1:], y2[i + 1:]
            rest, flags = areas[i + 1:], suppressed[i + 1:]
            for k in range(a1.shape[0]):
                xx1 = a1[k] if ix1 < a1[k] else ix1  # noqa: FURB136
                yy1 = b1[k] if iy1 < b1[k] else iy1  # noqa: FURB136
                xx2 = a2[k] if a2[k] < ix2 else ix2  # noqa: FURB136
                yy2 = b2[k] if b2[k] < iy2 else iy2  # noqa: FURB136
                w = xx2 - xx1
                w = w if zero < w else zero  # noqa: FURB136
                h = yy2 - yy1
                h = h if zero < h else zero  # noqa: FURB136
                inter = w * h
                flags[k] |= np.uint8(inter / (area + rest[k] - inter) > limit)
        return keep[:count]


    @njit(cache=True)
    def _round_half_away(x: np.float32) -> int:  # pragma: no cover - numba; C's roundf
        a = abs(x)
        r = np.floor(a)
        if a - r >= np.float32(0.5):  # a - floor(a) is exact in float32
            r += np.float32(1.0)
        return int(r) if x >= 0 else -int(r)


    @njit(cache=True)
    def _roi_max_pool(features: np.ndarray, rois: np.ndarray, scale: np.float32, out_h: int, out_w: int
                      ) -> np.ndarray:  # pragma: no cover - numba
        _, height, width, channels = features.shape
        out = np.zeros((rois.shape[0], channels, out_h, out_w), np.float32)
        acc = np.empty(channels, np.float32)
        lowest = np.float32(-3.4028234663852886e38)  # -FLT_MAX
        for r in range(rois.shape[0]):
            b = int(rois[r, 0])
            x0 = _round_half_away(rois[r, 1] * scale)
            y0 = _round_half_away(rois[r, 2] * scale)
            x1 = _round_half_away(rois[r, 3] * scale)
            y1 = _round_half_away(rois[r, 4] * scale)
            bin_h = np.float32(max(y1 - y0 + 1, 1)) / np.float32(out_h)
            bin_w = np.float32(max(x1 - x0 + 1, 1)) / np.float32(out_w)
            for ph in range(out_h):
                hs = min(max(int(np.floor(np.float32(ph) * bin_h)) + y0, 0), height)
                he = min(max(int(np.ceil(np.float32(ph + 1) * bin_h)) + y0, 0), height)
                for pw in range(out_w):
                    ws = min(max(int(np.floor(np.float32(pw) * bin_w)) + x0, 0), width)
                    we = min(max(int(np.ceil(np.float32(pw + 1) * bin_w)) + x0, 0), width)
                    if he <= hs or we <= ws:
                        continue  # empty bin: 0
                    acc[:] = lowest
                    for h in range(hs, he):
                        for w in range(ws, we):
                            row = features[b, h, w]
                            for c in range(channels):  # fmax: a NaN never wins (torchvision's ``>`` test: acc
                                acc[c] = np.fmax(acc[c], row[c])  # never holds one), and LLVM vectorises it (5x)
                    for c in range(channels):
                        out[r, c, ph, pw] = acc[c]
        return out

    @njit(parallel=True, cache=True)
    def _max_pool_2x2(x: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - numba
        # x (planes, H, W) -> out (planes, H // 2, W // 2); np.maximum propagates NaN, as max pooling does
        for plane in prange(x.shape[0]):
            for oy in range(out.shape[1]):
                top, bottom, row = x[plane, 2 * oy], x[plane, 2 * oy + 1], out[plane, oy]
                for ox in range(out.shape[2]):
                    row[ox] = np.maximum(np.maximum(top[2 * ox], top[2 * ox + 1]),
                                         np.maximum(bottom[2 * ox], bottom[2 * ox + 1]))

    return SimpleNamespace(greedy_nms=_greedy_nms, roi_max_pool=_roi_max_pool, max_pool_2x2=_max_pool_2x2)


def roi_max_pool(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float) -> torch.Tensor:
    """``torchvision.ops.roi_pool(features, rois, (output_size, output_size), spatial_scale)`` for inference:
    ``features`` (N, C, H, W) float32, ``rois`` (R, 5) ``(image, x1, y1, x2, y2)``; no gradient."""
    nhwc = np.ascontiguousarray(features.detach().to(torch.float32).permute(0, 2, 3, 1).cpu().numpy())
    boxes = np.ascontiguousarray(rois.detach().to(torch.float32).cpu().numpy())
    return torch.from_numpy(_kernels().roi_max_pool(nhwc, boxes, np.float32(spatial_scale), output_size, output_size))


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2, 2)`` (same module, same state_dict) whose inference forward is the elementwise maximum
    of the four strided 2x2 phases (a numba kernel for float CPU tensors, ``torch.maximum`` otherwise): torch's CPU
    ``max_pool2d`` on NCHW float maps is several times slower (16 x 320 x 320 at one thread: 28 ms; the phases in
    torch 1.4-2.3 ms, the kernel 0.3-0.4 ms). Both propagate NaN as max pooling does; odd sizes drop the last row /
    column (floor mode).
    Gradients, quantized tensors and exports take the parent's forward."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad or x.is_quantized or x.dim() != 4 or exporting():
            return super().forward(x)
        n, c, height, width = x.shape
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and height > 1 and width > 1:
            planes = x.contiguous().view(n * c, height, width).numpy()
            out = np.empty((n * c, height // 2, width // 2), planes.dtype)
            _kernels().max_pool_2x2(planes, out)  # one pass, each row read once
            return torch.from_numpy(out).view(n, c, height // 2, width // 2)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]
        return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                             torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


def nms_sorted(boxes: torch.Tensor, iou_threshold: float, max_keep: int) -> torch.Tensor:
    """Indices of the first ``max_keep`` boxes greedy NMS keeps, ``boxes`` (N, 4) xyxy already in descending
    score order (ties in the order they should be visited)."""
    if boxes.shape[0] == 0 or max_keep <= 0:
        return torch.zeros(0, dtype=torch.long)
    data = np.ascontiguousarray(boxes.detach().to(torch.float32).cpu().numpy())
    return torch.from_numpy(_kernels().greedy_nms(data, float(iou_threshold), int(max_keep)))


__all__ = ["MaxPool2x2", "exporting", "nms_sorted", "roi_max_pool"]
