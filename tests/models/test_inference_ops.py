"""NMS that stops after max_keep boxes and RoI max pooling (qcompress.models.inference_ops) against torchvision's
ops, and the Faster R-CNN proposal layer and RoI head that use them against their graph-op path (the one
ONNX export traces)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_pool

from qcompress.models import fasterrcnn_vgg16 as frcnn
from qcompress.models.inference_ops import MaxPool2x2, nms_sorted, roi_max_pool


def _boxes(n: int, seed: int, size: float = 320.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * size
    half = torch.rand(n, 2, generator=g) * size / 6 + 1
    boxes = torch.cat([centre - half, centre + half], dim=1)
    return boxes, torch.rand(n, generator=g)


@pytest.mark.parametrize("n, threshold, max_keep", [(3600, 0.7, 300), (500, 0.3, 1000), (2000, 0.5, 50)])
def test_nms_sorted_is_torchvision_nms_truncated(n: int, threshold: float, max_keep: int) -> None:
    boxes, scores = _boxes(n, seed=n)
    order = torch.argsort(scores, descending=True, stable=True)
    expected = nms(boxes, scores, threshold)[:max_keep]
    got = order[nms_sorted(boxes[order], threshold, max_keep)]
    assert torch.equal(got, expected)


def test_nms_sorted_hand_case() -> None:
    # IoU(a, b) = 50 / 150 = 1/3, IoU(a, c) = 0, IoU(b, c) = 25 / 175 = 1/7
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [10, 5, 20, 15]])
    assert nms_sorted(boxes, 0.3, 10).tolist() == [0, 2]  # b suppressed by a
    assert nms_sorted(boxes, 0.34, 10).tolist() == [0, 1, 2]
    half = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5]])  # IoU exactly 0.5: strict >, b stays
    assert nms_sorted(half, 0.5, 10).tolist() == [0, 1] == nms(half, torch.tensor([1.0, 0.5]), 0.5).tolist()
    assert nms_sorted(half, 0.49, 10).tolist() == [0]
    assert nms_sorted(boxes, 0.3, 1).tolist() == [0]
    # IoU(a, b) in float32 is 0.33333334 > 1/3: torchvision compares the float IoU with the double threshold
    scores = torch.tensor([3.0, 2.0, 1.0])
    for t in (1 / 3, float(np.float32(1 / 3)), float(np.nextafter(np.float32(1 / 3), np.float32(0)))):
        assert nms_sorted(boxes, t, 10).tolist() == nms(boxes, scores, t).tolist(), t
    assert nms_sorted(boxes, 1 / 3, 10).tolist() == [0, 2] and nms_sorted(boxes, float(np.float32(1 / 3)), 10).tolist() == [0, 1, 2]
    assert nms_sorted(boxes[:0], 0.3, 10).numel() == 0
    # degenerate boxes (zero area: IoU 0 / 0) are never suppressed, as in torchvision
    flat = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0]])
    assert nms_sorted(flat, 0.5, 10).tolist() == nms(flat, torch.tensor([1.0, 0.5]), 0.5).tolist()


@pytest.mark.parametrize("training, pad", [(False, True), (False, False), (True, False)])
def test_proposals_match_the_exported_graph_path(monkeypatch: pytest.MonkeyPatch, training: bool, pad: bool) -> None:
    torch.manual_seed(0)
    size = (320, 320)
    anchors = frcnn.shifted_anchors(frcnn.anchor_base(scales=(4.0, 8.0, 16.0)), frcnn.FEAT_STRIDE, 20, 20)
    m = anchors.shape[0]
    loc = torch.randn(3, m, 4) * 0.3
    objectness = torch.rand(3, m)
    objectness[1, :100] = 1.0  # ties, as a saturated softmax gives
    objectness[2] = 0.0  # every box below min_size in image 2: no proposals
    loc[2, :, 2:] = -8.0
    fast = frcnn.propose(loc, objectness, anchors, size, 16 * 320 / 600, training, pad)
    monkeypatch.setattr(frcnn, "exporting", lambda: True)
    graph = frcnn.propose(loc, objectness, anchors, size, 16 * 320 / 600, training, pad)
    assert torch.equal(fast[1], graph[1])
    for image in (0, 2):
        assert torch.equal(fast[0][fast[1] == image], graph[0][graph[1] == image])
    # image 1's tied scores: the graph path's regrouping argsort is not stable, so only the set is defined
    tied = [sorted(map(tuple, rois[indices == 1].tolist())) for rois, indices in (fast, graph)]
    assert tied[0] == tied[1]


def test_roi_max_pool_is_torchvision_roi_pool() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 24, 20, 20, generator=g)
    corner = torch.rand(200, 2, generator=g) * 320
    rois = torch.cat([torch.randint(0, 2, (200, 1), generator=g).float(), corner,
                      corner + torch.rand(200, 2, generator=g) * 200], dim=1)
    # corners at k + 0.5 feature cells (8, 24, 40 px at 1/16): C's round goes away from zero (0.5 -> 1,
    # 2.5 -> 3) where Python's and numpy's round to even; malformed (x2 < x1) and outside the map
    rois[:3] = torch.tensor([[0.0, 8, 24, 40, 56], [1, 40, 8, 8, 40], [0, 400, 400, 500, 500]])
    features[1, 5, 3, 4] = float("nan")  # torchvision's `>` skips a NaN
    expected = roi_pool(features, rois, (7, 7), 1 / 16)
    got = roi_max_pool(features, rois, 7, 1 / 16)
    assert torch.equal(got, expected)
    assert (got[2] == 0).all()  # a RoI wholly outside the map: every bin empty


def test_roi_head_inference_matches_torchvision_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    head = frcnn.VGG16RoIHead(n_class=4, in_channels=16, fc=32).eval()
    features = torch.randn(1, 16, 20, 20)
    rois = torch.rand(50, 4) * 300
    rois[:, 2:] += rois[:, :2]
    with torch.no_grad():
        fast = head(features, rois, torch.zeros(50, dtype=torch.long))
        monkeypatch.setattr(frcnn, "exporting", lambda: True)
        reference = head(features, rois, torch.zeros(50, dtype=torch.long))
    assert all(torch.equal(a, b) for a, b in zip(fast, reference, strict=True))


@pytest.mark.parametrize(("shape", "dtype", "layout"), [
    ((2, 16, 40, 40), torch.float32, torch.contiguous_format),
    ((1, 3, 11, 9), torch.float32, torch.contiguous_format),
    ((2, 8, 10, 13), torch.float32, torch.channels_last),
    ((1, 4, 7, 6), torch.float64, torch.contiguous_format),
    ((1, 2, 8, 8), torch.bfloat16, torch.contiguous_format),  # not the kernel's: the torch phases
])
def test_maxpool2x2_is_max_pool2d(shape: tuple[int, ...], dtype: torch.dtype, layout: torch.memory_format) -> None:
    x = torch.randn(*shape).to(dtype).contiguous(memory_format=layout)
    x[0, 0, 0, 1] = float("nan")  # propagates, as in max_pool2d
    pool = MaxPool2x2()
    with torch.no_grad():
        assert torch.allclose(pool(x), F.max_pool2d(x, 2, 2), equal_nan=True, atol=0, rtol=0)
    assert torch.isnan(pool(x)[0, 0, 0, 0])
    # training: the parent's forward (its gradient goes to one cell per window)
    leaf = x.nan_to_num().requires_grad_()
    pool(leaf).sum().backward()
    assert leaf.grad.sum() == pool(leaf).numel()
    assert dict(pool.state_dict()) == {} and isinstance(pool, torch.nn.MaxPool2d)
