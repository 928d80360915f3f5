"""FCOS / RetinaNet with a ResNet-18 FPN: structure variants, strict reload, declared compression scopes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.models import build_detector
from qcompress.models.registry import compression_spec
from qcompress.models.resnet18_fpn import LevelBatchNorm2d
from qcompress.quant.lowbit import select_convs

CLASSES = ("BACKGROUND", "a", "b")


@pytest.mark.parametrize("arch", ["fcos_resnet18_fpn", "retinanet_resnet18_fpn"])
def test_variants_build_detect_and_reload_strictly(arch, tmp_path):
    torch.manual_seed(0)
    detector = build_detector(arch, CLASSES, input_size=128, width=64, fpn_bn=True, head_norm="bn")
    fpn_bns = [m for n, m in detector.model.named_modules() if n.startswith("backbone.fpn") and isinstance(m, nn.BatchNorm2d)]
    head_bns = [m for n, m in detector.model.named_modules() if n.startswith("head") and isinstance(m, nn.BatchNorm2d)]
    assert len(fpn_bns) == 6 and len(head_bns) == 8 * 5  # 3 inner + 3 output FPN convs; 4 + 4 tower convs x 5 levels
    assert not any(isinstance(m, nn.GroupNorm) for m in detector.model.modules())
    path = save_detector(detector, tmp_path / "m.pth")
    again = load_detector(path)
    assert again.spec.options == {"input_size": 128, "width": 64, "fpn_bn": True, "head_norm": "bn"}
    image = (torch.rand(100, 90, 3) * 255).to(torch.uint8).numpy()
    first, second = detector.detect([image])[0], again.detect([image])[0]
    assert torch.equal(first.boxes, second.boxes) and torch.equal(first.scores, second.scores)


@pytest.mark.parametrize("arch", ["fcos_resnet18_fpn", "retinanet_resnet18_fpn"])
def test_head_bn_is_unshared_per_level(arch):
    """Head-BN: level i of every tower runs through its own BN i (a loop reference with the tower
    rebuilt per level), in eval with distinct statistics per level and in training, where each
    level's BN sees only that level's features."""
    torch.manual_seed(0)
    model = build_detector(arch, CLASSES, input_size=128, width=32, head_norm="bn").model
    for m in model.head.modules():
        if isinstance(m, LevelBatchNorm2d):
            for bn in m.levels:
                bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    features = [torch.randn(2, 32, s, s) for s in (16, 8, 4, 2, 1)]
    tower = model.head.classification_head.conv

    def per_level(level: int, x: torch.Tensor) -> torch.Tensor:
        for layer in (tower if isinstance(tower[0], nn.Conv2d) else [m for block in tower for m in block]):
            x = layer.levels[level](x) if isinstance(layer, LevelBatchNorm2d) else layer(x)
        return x

    model.eval()
    with torch.no_grad():
        for _ in range(2):  # the level count restarts with every head forward
            model.head(features)
        logits = model.head.classification_head.cls_logits
        got = model.head.classification_head(features)
        want = torch.cat([logits(per_level(i, f)).permute(0, 2, 3, 1).flatten(1) for i, f in enumerate(features)], 1)
        assert torch.allclose(got.flatten(1), want, atol=1e-5)
    first = next(m for m in tower.modules() if isinstance(m, LevelBatchNorm2d))
    conv = next(m for m in tower.modules() if isinstance(m, nn.Conv2d))  # the layer before it
    before = [bn.running_mean.clone() for bn in first.levels]
    model.train()
    model.head(features)
    with torch.no_grad():
        for level, f in enumerate(features):  # each level's BN averaged in that level's batch only
            want = 0.9 * before[level] + 0.1 * conv(f).mean(dim=(0, 2, 3))
            assert torch.allclose(first.levels[level].running_mean, want, atol=1e-5)


def test_head_norm_variants():
    gn = build_detector("fcos_resnet18_fpn", CLASSES, width=64)
    plain = build_detector("retinanet_resnet18_fpn", CLASSES, width=64)
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.model.head.modules()) == 8
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in plain.model.head.modules())


@pytest.mark.parametrize("arch", ["fcos_resnet18_fpn", "retinanet_resnet18_fpn"])
def test_declared_scopes_backbone_vs_all(arch):
    detector = build_detector(arch, CLASSES, width=64)
    spec = compression_spec(arch)
    backbone, kept_b = select_convs(detector.model, "backbone", spec=spec)
    everything, kept_a = select_convs(detector.model, "all", spec=spec)
    assert all(n.startswith("backbone.body.") for n in backbone) and len(backbone) == 19  # ResNet-18 minus conv1
    assert kept_b == ["backbone.body.conv1"]
    assert any(n.startswith("backbone.fpn") for n in everything) and any(n.startswith("head.") for n in everything)
    assert "head.classification_head.cls_logits" in kept_a and "head.regression_head.bbox_reg" in kept_a
    assert set(backbone) < set(everything)


def test_bad_options_are_one_line_errors():
    from qcompress.errors import QCompressError

    with pytest.raises(QCompressError, match="head_norm"):
        build_detector("fcos_resnet18_fpn", CLASSES, head_norm="ln")
    with pytest.raises(QCompressError, match="multiple of 32"):
        build_detector("retinanet_resnet18_fpn", CLASSES, width=100)
