"""Low-bit Linear layers (fc6 of the 1-bit Faster R-CNN): binary weights per output row, the input
quantizer, every method on 2-D weights, and a reload through the recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcompress.jobs.qat_steps import resolve_steps
from qcompress.quant.lowbit import LowBitLinear, initialize_lowbit, rebuild_lowbit, wrap_convs


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_binary_linear_by_hand():
    torch.manual_seed(0)
    net = _net()
    wrap_convs(net, ["2"], "binary", 1, 1)
    layer = net[2]
    assert isinstance(layer, LowBitLinear) and layer.bits == (1, 1)
    x = torch.randn(5, 64)
    out = layer(x)  # first call: the activation quantizer takes mu (per feature) and one K
    w = layer.linear.weight
    alpha = w.abs().mean(dim=1, keepdim=True)  # one scale per output row
    binary_w = torch.where(w >= 0, 1.0, -1.0) * alpha
    mu, k = x.mean(dim=0), (x - x.mean(dim=0)).abs().mean()
    binary_x = torch.where(x - mu >= 0, 1.0, -1.0) * k + mu
    assert torch.allclose(out, binary_x @ binary_w.T + layer.linear.bias, atol=1e-5)


@pytest.mark.parametrize("method", ["lsq", "pact", "dorefa", "binary", "lqnet"])
def test_every_method_trains_and_reloads(method):
    torch.manual_seed(0)
    net = _net()
    bits = (1, 1) if method == "binary" else (2, 2) if method == "lqnet" else (4, 4)
    wrap_convs(net, ["0", "2"], method, *bits)
    x = torch.randn(4, 3, 6, 6)
    initialize_lowbit(net, [x])
    net.train()
    net(x).square().sum().backward()
    assert net[2].linear.weight.grad is not None and net[2].linear.weight.grad.abs().sum() > 0
    net.eval()
    again = rebuild_lowbit(_net(), {"method": method, "bits_w": bits[0], "bits_a": bits[1], "layers": ["0", "2"]})
    again.load_state_dict(net.state_dict(), strict=True)
    again.eval()
    assert torch.equal(net(x), again(x))


def test_steps_select_linear_layers():
    assert resolve_steps(_net(), [["0"], ["2", "4"]], binary=True) == [["0"], ["2", "4"]]


def test_bops_count_linear_layers():
    from qcompress.bench.size import conv_macs, estimate_bops

    macs = conv_macs(_net(), (1, 3, 6, 6))
    assert macs == {"0": 4 * 4 * 4 * 3 * 9, "2": 64 * 8, "4": 8 * 3}
    assert estimate_bops(macs, {"2": (1, 1)}).total_bops == (macs["0"] + macs["4"]) * 1024 + macs["2"]
