"""The teacher: IoU-ratio imitation mask, per-level masks, imitation / output losses, and the job wiring."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qcompress.errors import QCompressError
from qcompress.models.registry import build_detector, compression_spec
from qcompress.training.distill import DistillConfig, Distiller, imitation_mask, level_masks


def test_imitation_mask_keeps_priors_within_psi_of_each_boxes_best_iou():
    gt = torch.tensor([[0.0, 0.0, 0.4, 0.4]])
    priors = torch.tensor([
        [0.0, 0.0, 0.4, 0.4],  # IoU 1 (the best)
        [0.0, 0.0, 0.4, 0.2],  # IoU 0.5: kept at psi 0.5, not at 0.6
        [0.0, 0.0, 0.4, 0.1],  # IoU 0.25
        [0.5, 0.5, 1.0, 1.0],  # IoU 0
    ])
    assert imitation_mask(gt, priors, 0.5).tolist() == [True, True, False, False]
    assert imitation_mask(gt, priors, 0.6).tolist() == [True, False, False, False]
    # The threshold is relative to each box's own best prior: a small box far from any prior still gets one.
    small = torch.tensor([[0.55, 0.55, 0.57, 0.57]])  # inside the last prior only: IoU 0.0016
    assert imitation_mask(small, priors, 0.5).tolist() == [False, False, False, True]
    assert not imitation_mask(torch.zeros(0, 4), priors, 0.5).any()


def test_level_masks_follow_the_ssd_prior_order():
    # Two levels: 2x2 locations x 3 priors, then 1x1 x 2 priors; priors ordered level, row, column, prior.
    mask = torch.zeros(1, 2 * 2 * 3 + 2, dtype=torch.bool)
    mask[0, (1 * 2 + 0) * 3 + 2] = True  # level 0, row 1, column 0, prior 2
    mask[0, 12 + 1] = True  # level 1, the only location, prior 1
    first, second = level_masks(mask, [(2, 2, 3), (1, 1, 2)])
    assert first[0].tolist() == [[False, False], [True, False]]
    assert second[0].tolist() == [[True]]
    with pytest.raises(QCompressError):
        level_masks(mask, [(2, 2, 3)])


class _TinySSD(nn.Module):
    """Two levels, SSD-style heads: classification_headers.i outputs priors x classes channels."""

    def __init__(self, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.num_classes = classes
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), nn.ReLU())
        self.classification_headers = nn.ModuleList([nn.Conv2d(width, 2 * classes, 1), nn.Conv2d(width, 2 * classes, 1)])
        self.regression_headers = nn.ModuleList([nn.Conv2d(width, 8, 1), nn.Conv2d(width, 8, 1)])

    def forward(self, x):
        a = self.body(x)
        b = self.down(a)
        n = x.shape[0]
        conf = [h(f).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes) for h, f in zip(self.classification_headers, (a, b))]
        loc = [h(f).permute(0, 2, 3, 1).reshape(n, -1, 4) for h, f in zip(self.regression_headers, (a, b))]
        return torch.cat(conf, 1), torch.cat(loc, 1)


TAPS = ("classification_headers.0", "classification_headers.1")


def _pair(student_width: int = 8):
    torch.manual_seed(0)
    teacher = _TinySSD()
    student = copy.deepcopy(teacher) if student_width == 8 else _TinySSD(student_width)
    return student, teacher


def test_a_student_equal_to_its_teacher_has_zero_distillation_loss():
    student, teacher = _pair()
    images = torch.randn(2, 3, 8, 8)
    d = Distiller(student, teacher, TAPS, 3, DistillConfig(imitation=1.0, outputs=1.0), images[:1])
    conf, loc = d(images)
    priors = conf.shape[1]  # 4x4x2 + 2x2x2 = 40
    assert priors == 40
    labels = torch.zeros(2, priors, dtype=torch.long)
    labels[:, 3] = 1
    mask = torch.zeros(2, priors, dtype=torch.bool)
    mask[:, :5] = True
    losses = d.losses(conf, loc, labels, mask)
    assert float(losses["imitation"].detach()) == pytest.approx(0.0, abs=1e-10)
    assert float(losses["outputs"].detach()) == pytest.approx(0.0, abs=1e-6)


def test_imitation_is_the_papers_masked_squared_difference_and_trains_the_student():
    student, teacher = _pair(student_width=4)  # pruned-like: the adaptation maps 4 -> 8 channels
    images = torch.randn(2, 3, 8, 8)
    d = Distiller(student, teacher, TAPS, 3, DistillConfig(imitation=2.0), images[:1])
    assert [a.weight.shape[:2] for a in d.adapters] == [torch.Size([8, 4]), torch.Size([8, 4])]
    conf, loc = d(images)
    mask = torch.zeros(2, conf.shape[1], dtype=torch.bool)
    mask[0, 0] = True  # level 0, image 0, location (0, 0)
    mask[1, 32] = True  # level 1, image 1, location (0, 0)
    loss = d.losses(conf, loc, torch.zeros_like(mask, dtype=torch.long), mask)["imitation"]
    # Loop reference over the two masked locations: sum over channels / (2 N_p), N_p = 2 (Wang et al.'s loss).
    with torch.no_grad():
        s0 = student.body(images)
        s1 = student.down(s0)
        t0 = teacher.body(images)
        t1 = teacher.down(t0)
        ref = ((d.adapters[0](s0)[0, :, 0, 0] - t0[0, :, 0, 0]).pow(2).sum()
               + (d.adapters[1](s1)[1, :, 0, 0] - t1[1, :, 0, 0]).pow(2).sum()) / (2 * 2)
    assert float(loss.detach()) == pytest.approx(2.0 * float(ref), rel=1e-5)
    loss.backward()
    assert student.body[0].weight.grad.abs().sum() > 0 and d.adapters[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_the_cli_default_imitation_weight_is_the_configs():
    from qcompress.cli.options import IMITATION_WEIGHT

    assert IMITATION_WEIGHT == DistillConfig().imitation == 0.01  # the paper's code's lambda


def test_distill_config_rejects_nonsense():
    for bad in (DistillConfig(imitation=-1), DistillConfig(psi=0), DistillConfig(psi=1.5),
                DistillConfig(temperature=0), DistillConfig(imitation=0, outputs=0), DistillConfig(imitation=float("nan"))):
        with pytest.raises(QCompressError):
            bad.validate()


def test_the_default_architecture_declares_taps_that_match_its_priors():
    det = build_detector("mb2-ssd-lite", ["BACKGROUND", "a", "b"])
    spec = compression_spec("mb2-ssd-lite")
    teacher = copy.deepcopy(det.model).eval()
    d = Distiller(det.model, teacher, spec.feature_taps, 3, DistillConfig(), torch.zeros(1, 3, 300, 300))
    det.model.eval()
    conf, _ = d(torch.zeros(1, 3, 300, 300))
    shapes = d.level_shapes()
    assert sum(h * w * a for h, w, a in shapes) == conf.shape[1] == spec.priors(det.spec).shape[0]


def _fcos_pair():
    torch.manual_seed(0)
    teacher = build_detector("fcos_resnet18_fpn", ["BACKGROUND", "a", "b"], input_size=64, width=32)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a perturbed student (as after quantization), same widths
        for p in student.model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student.model, teacher.model


def test_native_imitation_is_the_papers_loss_over_the_anchors_of_a_torchvision_detector():
    """FCOS computes its own losses: the teacher imitates its FPN levels near objects, the mask from FCOS's own
    anchors. Reference: the levels recomputed by hand, the IoU-ratio mask by loops over anchors and boxes."""
    from torchvision.ops import box_iou

    from qcompress.training.distill import NativeDistiller

    student, teacher = _fcos_pair()
    taps = compression_spec("fcos_resnet18_fpn").native_taps
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 20.0, 18.0], [30.0, 20.0, 62.0, 60.0]]), "labels": torch.tensor([2, 1])}]
    d = NativeDistiller(student, teacher, taps, DistillConfig(imitation=0.5), images[:1])
    student.train()
    losses = d(list(images), targets)
    assert {"classification", "bbox_regression"} <= set(losses)  # FCOS's own losses, unchanged
    loss = d.losses()["imitation"]

    with torch.no_grad():
        batch = (images - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        s_levels = list(student.backbone(batch).values())
        t_levels = list(teacher.backbone(batch).values())
    total, points = 0.0, 0
    for i, target in enumerate(targets):
        cells = []  # (level, y, x, anchor box): FCOS has one anchor per location, 8 x 2^level px
        for level, f in enumerate(s_levels):
            stride, size = 64 // f.shape[2], 8 * 2**level
            for y in range(f.shape[2]):
                for x in range(f.shape[3]):
                    cx, cy = x * stride, y * stride  # torchvision anchors are centred on location * stride
                    cells.append((level, y, x, torch.tensor([[cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]])))
        ious = torch.cat([box_iou(target["boxes"], c[3]) for c in cells], dim=1)  # (G, cells)
        keep = (ious >= 0.5 * ious.max(dim=1, keepdim=True).values).any(dim=0)
        for (level, y, x, _), k in zip(cells, keep.tolist()):
            if k:
                total += float((s_levels[level][i, :, y, x] - t_levels[level][i, :, y, x]).pow(2).sum())
                points += 1
    assert points > 2
    assert float(loss.detach()) == pytest.approx(0.5 * total / (2 * points), rel=1e-4)
    loss.backward()
    assert student.backbone.body.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    d.detach_hooks()


def test_native_distiller_refuses_output_distillation_and_a_student_equal_to_its_teacher_imitates_nothing():
    from qcompress.training.distill import NativeDistiller

    student, teacher = _fcos_pair()
    student.load_state_dict(teacher.state_dict())
    taps = compression_spec("fcos_resnet18_fpn").native_taps
    images = torch.rand(2, 3, 64, 64)
    with pytest.raises(QCompressError, match="distill-outputs"):
        NativeDistiller(student, teacher, taps, DistillConfig(outputs=1.0), images)
    d = NativeDistiller(student, teacher, taps, DistillConfig(), images)
    student.train()
    for m in list(student.modules()) + list(teacher.modules()):  # BN in eval on both sides: same function
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    d(list(images), [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2)
    assert float(d.losses()["imitation"].detach()) == pytest.approx(0.0, abs=1e-8)


def test_native_imitation_of_faster_rcnn_vgg16_masks_conv5_3_over_the_rpn_anchors():
    """Faster R-CNN VGG16 takes the batch as it is (no transform): conv5_3's features are imitated near objects,
    the mask from the RPN's 9 anchors per cell. Reference: anchors placed by hand (base anchors shifted by 16 px
    per cell), the IoU-ratio mask by loops, the features recomputed."""
    from torchvision.ops import box_iou

    from qcompress.training.distill import NativeDistiller

    teacher = build_detector("fasterrcnn_vgg16", ["BACKGROUND", "a", "b"], input_size=96, width=0.125, fc=32,
                             anchor_scales=[2, 4, 8])
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.extractor.parameters():
            p.add_(0.05 * torch.randn_like(p))
    taps = compression_spec("fasterrcnn_vgg16").native_taps
    assert taps[0] == ""
    images = torch.rand(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 28.0], [40.0, 30.0, 90.0, 92.0]]), "labels": torch.tensor([2, 1])}]
    d = NativeDistiller(student.model, teacher.model, taps, DistillConfig(imitation=0.5), images[:1])
    student.model.train()
    losses = d(images, targets)
    assert {"rpn_objectness", "roi_classifier"} <= set(losses)
    loss = d.losses()["imitation"]

    with torch.no_grad():
        s, t = student.model.extractor(images), teacher.model.extractor(images)
    base = student.model.anchor_base  # (9, 4) xyxy around (0, 0)-based cell
    total, points = 0.0, 0
    for i, target in enumerate(targets):
        cells = [(y, x, base + torch.tensor([x * 16.0, y * 16.0, x * 16.0, y * 16.0]))
                 for y in range(s.shape[2]) for x in range(s.shape[3])]
        ious = torch.cat([box_iou(target["boxes"], c[2]) for c in cells], dim=1)  # (G, cells * 9)
        keep = (ious >= 0.5 * ious.max(dim=1, keepdim=True).values).any(dim=0).reshape(len(cells), 9).any(dim=1)
        for (y, x, _), k in zip(cells, keep.tolist()):
            if k:
                total += float((s[i, :, y, x] - t[i, :, y, x]).pow(2).sum())
                points += 1
    assert 2 < points < 2 * s.shape[2] * s.shape[3]
    assert float(loss.detach()) == pytest.approx(0.5 * total / (2 * points), rel=1e-4)
    loss.backward()
    assert student.model.extractor[2].weight.grad.abs().sum() > 0
    d.detach_hooks()


def test_native_imitation_of_an_anchor_free_centernet_masks_the_locations_inside_the_boxes():
    """CenterNet declares no anchors: the heads' shared input (the decoder's stride-4 features) is imitated at the
    cells whose centre lies inside a box. Reference: the decoder output recomputed from the modules (skips
    included) and the mask by loops over cells and boxes; the task losses are CenterNet's own."""
    from qcompress.training.distill import NativeDistiller

    torch.manual_seed(0)
    teacher = build_detector("centernet_resnet18", ["BACKGROUND", "a", "b"], input_size=64, width=16, head_conv=8,
                             skips=True)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.layer2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    taps = compression_spec("centernet_resnet18").native_taps
    assert taps == ("", "hm", "")
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 20.0, 18.0], [33.0, 20.0, 62.0, 60.0]]), "labels": torch.tensor([2, 1])}]
    d = NativeDistiller(student.model, teacher.model, taps, DistillConfig(imitation=0.5), images[:1])
    student.model.train()
    losses = d(images, targets)
    assert set(losses) == {"heatmap", "size_reg", "offset_reg"}
    loss = d.losses()["imitation"]

    def decoder_output(net):
        c1 = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(images)))))
        c2 = net.layer2(c1)
        c3 = net.layer3(c2)
        y = net.layer4(c3)
        for stage, lateral in enumerate((c3, c2, c1)):
            up = net.deconv_layers[3 * stage + 1](net.deconv_layers[3 * stage](y))
            y = torch.relu(up + net.skip_layers[stage](lateral))
        return y

    teacher.model.eval()
    with torch.no_grad():
        s, t = decoder_output(student.model), decoder_output(teacher.model)  # the student in train mode, as trained
    assert s.shape[-1] == 16
    total, points = 0.0, 0
    for i, target in enumerate(targets):
        for y in range(16):
            for x in range(16):
                cx, cy = 4 * x + 2, 4 * y + 2  # cell centres, stride 4
                if any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in target["boxes"].tolist()):
                    total += float((s[i, :, y, x] - t[i, :, y, x]).pow(2).sum())
                    points += 1
    assert 20 < points < 2 * 256
    assert float(loss.detach()) == pytest.approx(0.5 * total / (2 * points), rel=1e-4)
    loss.backward()
    assert student.model.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())
    d.detach_hooks()
    assert not student.model.hm._forward_hooks and not teacher.model.hm._forward_hooks


def test_a_pruned_levels_adapter_is_the_least_squares_map_between_the_features():
    """Where the student is narrower (pruned), the adapter is fitted by least squares: a teacher that is an exact
    linear function of the student's features is reproduced, and on noisy targets no perturbed 1x1 map does
    better (ridge ~0); the default ridge shrinks towards the mean. Equal widths keep the identity."""
    from qcompress.training.distill import _adapters, fit_adapter

    torch.manual_seed(0)
    s = torch.randn(3, 5, 6, 6)
    a, b = torch.randn(7, 5), torch.randn(7)
    t = torch.einsum("ts,nshw->nthw", a, s) + b[None, :, None, None]
    adapter = nn.Conv2d(5, 7, 1)
    fit_adapter(adapter, s, t, ridge=1e-9)
    assert torch.allclose(adapter(s), t, atol=1e-4 * float(t.abs().max()))
    noisy = t + 0.1 * torch.randn_like(t)
    fit_adapter(adapter, s, noisy, ridge=1e-9)
    with torch.no_grad():
        best = float((adapter(s) - noisy).pow(2).mean())
        for _ in range(5):
            other = copy.deepcopy(adapter)
            other.weight.add_(0.01 * torch.randn_like(other.weight))
            assert float((other(s) - noisy).pow(2).mean()) > best
        shrunk = nn.Conv2d(5, 7, 1)
        fit_adapter(shrunk, s, noisy)  # default ridge: smaller weights, same mean output
        assert shrunk.weight.norm() < adapter.weight.norm()
        assert torch.allclose(shrunk(s).mean(dim=(0, 2, 3)), noisy.mean(dim=(0, 2, 3)), atol=1e-4)
    (same,) = _adapters([5], [5])  # equal widths: the identity
    assert torch.equal(same(s), s)
