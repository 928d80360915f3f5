"""Pruned checkpoints rebuild from (weights, sidecar): resize_to_state_dict and the save -> load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.models import build_detector
from qcompress.prune.channels import prune_channels
from qcompress.prune.reshape import resize_to_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("BACKGROUND", "a", "b", "c")


def _block(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        nn.Conv2d(width, width, 3, 2, 1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        nn.Conv2d(width, 5, 1), nn.BatchNorm2d(5),
    )


def test_resize_to_state_dict_is_generic_and_keeps_depthwise():
    torch.manual_seed(0)
    small = randomize_bn(_block(6))
    big = _block(16)
    changed = resize_to_state_dict(big, small.state_dict())
    assert changed == ["0", "1", "3", "4", "6"]
    dw = big[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 6 and dw.stride == (2, 2) and dw.padding == (1, 1)
    assert big[0].bias is None and big[6].bias is not None
    big.load_state_dict(small.state_dict(), strict=True)
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(big.eval()(x), small(x))
    assert resize_to_state_dict(big, small.state_dict()) == []  # already the right shapes: nothing to do


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    detector = build_detector("mb2-ssd-lite", CLASSES)
    randomize_bn(detector.model)
    x = torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(2))
    prune_channels(detector.model, x[:1], 0.3, round_to=8, include_residual=True)
    path = tmp_path_factory.mktemp("pruned") / "pruned.pth"
    save_detector(detector, path, pruned=True, command=["test"], compression=[{"step": "prune", "method": "channels"}])
    return detector, path, x


def test_save_then_load_gives_identical_outputs(pruned_checkpoint):
    detector, path, x = pruned_checkpoint
    assert json.loads(path.with_suffix(".json").read_text())["pruned"] is True
    loaded = load_detector(path)
    assert loaded.model.base_net[2].conv[3].groups == detector.model.base_net[2].conv[3].groups < 96
    with torch.no_grad():
        for a, b in zip(detector.model.eval()(x), loaded.model(x)):
            assert torch.equal(a, b)


def test_quantized_pruned_checkpoint_reloads(pruned_checkpoint, tmp_path):
    """BN is folded away in an int8 checkpoint: its width comes from the conv before it."""
    from qcompress._warnings import quiet_torch_ao
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

    _, path, x = pruned_checkpoint
    parent = load_detector(path)
    with quiet_torch_ao():
        qdet, record = quantize_detector(parent, [x], QuantizeOptions(observer="minmax"))
        qdet.source = parent.source  # the parent's sidecar (pruned: true) is inherited by the int8 child
        out = save_detector(qdet, tmp_path / "int8.pth", parent=path, quantization=record.recipe)
        reloaded = load_detector(out)
        with torch.no_grad():
            for a, b in zip(qdet.model(x), reloaded.model(x)):
                assert torch.equal(a, b)
