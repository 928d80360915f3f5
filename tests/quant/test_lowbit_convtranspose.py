"""Low-bit transposed convolutions (CenterNet's decoder, issue 20): the wrapper computes the float layer
when no quantizer is set, per-channel weight quantizers work per OUTPUT channel of the (in, out/groups,
kh, kw) weight, every method trains and reloads, the decoder scope of a tiny CenterNet wraps its three
transposed convs and round-trips through a checkpoint, MACs/BOPs count them, the binary engine leaves
them float."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qcompress.quant.lowbit import (
    METHODS,
    LowBitConvTranspose2d,
    apply_lowbit,
    initialize_lowbit,
    lsq_mse_step,
    rebuild_lowbit,
    wrap_convs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "centernet_resnet18"
CLASSES = ("BACKGROUND", "a", "b")
DECONVS = ["deconv_layers.0", "deconv_layers.3", "deconv_layers.6"]


def _deconv(groups: int = 1, bias: bool = True) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=bias, dilation=1)


@pytest.mark.parametrize("groups", [1, 2])
def test_without_quantizers_equals_the_float_layer(groups):
    torch.manual_seed(0)
    for conv in (_deconv(groups), nn.ConvTranspose2d(4, 2, (3, 2), stride=(2, 3), padding=(0, 1), dilation=2,
                                                     groups=groups, bias=False)):
        layer = LowBitConvTranspose2d(conv, None, None)
        x = torch.randn(2, 4, 5, 7)
        assert torch.equal(layer(x), conv(x))
        assert layer.layer is conv and layer.bits == (32, 32)
    conv = _deconv(groups)
    layer = LowBitConvTranspose2d(conv, None, None)
    x = torch.randn(1, 4, 5, 7)
    assert torch.equal(layer(x, output_size=[9, 13]), conv(x, output_size=[9, 13]))  # output_padding from the size


def _expected_binary_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """sign(W) * alpha with alpha[o] = mean |W| over the weights feeding output channel o, by loops."""
    c_in, out_per_group = w.shape[:2]
    in_per_group = c_in // groups
    expected = torch.empty_like(w)
    for o in range(groups * out_per_group):
        g, j = divmod(o, out_per_group)
        feeding = w[g * in_per_group:(g + 1) * in_per_group, j]  # (in/groups, kh, kw)
        alpha = feeding.abs().mean()
        expected[g * in_per_group:(g + 1) * in_per_group, j] = torch.where(feeding >= 0, 1.0, -1.0) * alpha
    return expected


@pytest.mark.parametrize("groups", [1, 2])
def test_binary_alpha_per_output_channel_by_hand(groups):
    torch.manual_seed(0)
    net = nn.Sequential(_deconv(groups))
    wrap_convs(net, ["0"], "binary", 1, 1)
    layer = net[0]
    assert isinstance(layer, LowBitConvTranspose2d) and layer.bits == (1, 1)
    w = layer.conv.weight.detach()
    expected = _expected_binary_weight(w, groups)
    assert torch.allclose(layer.quantized_weight().detach(), expected, atol=1e-7)
    x = torch.randn(2, 4, 5, 5)
    out = layer(x)  # first call: mu per input channel and one K
    mu = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    k = (x - mu).abs().mean()
    binary_x = torch.where(x - mu >= 0, 1.0, -1.0) * k + mu
    reference = nn.functional.conv_transpose2d(binary_x, expected, layer.conv.bias, 2, 1, 1, groups)
    assert torch.allclose(out, reference, atol=1e-5)


def test_per_channel_lsq_steps_follow_output_channels():
    torch.manual_seed(0)
    net = nn.Sequential(_deconv(groups=2))
    wrap_convs(net, ["0"], "lsq", 4, 4, fully_quantized=True)
    layer = net[0]
    layer(torch.randn(2, 4, 5, 5))
    w = layer.conv.weight.detach()
    # output channel o: group o // 3 (input channels 2g, 2g+1), column o % 3 of the (in, out/groups, kh, kw) weight
    rows = torch.stack([w[(o // 3) * 2:(o // 3 + 1) * 2, o % 3].flatten() for o in range(6)])
    step = layer.weight_quantizer.step.detach().flatten()
    assert step.shape == (6,) and torch.allclose(step, lsq_mse_step(rows, 8, 7))  # the search: tests/quant/test_lowbit.py


def test_binary_keeps_grouped_transposed_convs_float():
    from qcompress.models.registry import CompressionSpec

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2, 2, groups=4), nn.ConvTranspose2d(4, 6, 2, 2))
    spec = CompressionSpec(lowbit_scopes={"up": ("1", "2")})
    record = apply_lowbit(net, "binary", scope="up", spec=spec)
    assert record.layers == ["2"] and record.kept_float == ["1"]
    assert type(net[1]) is nn.ConvTranspose2d and isinstance(net[2], LowBitConvTranspose2d)
    record = apply_lowbit(nn.Sequential(*[m.layer if hasattr(m, "layer") else m for m in net]), "lsq", scope="up",
                          spec=spec)
    assert record.layers == ["1", "2"]  # other methods quantize the grouped one too


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_reloads(method):
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(4, 5, 4, 2, 1))

    bits = {"binary": (1, 1), "lqnet": (2, 2), "lqnet-ternary": (2, 2)}.get(method, (4, 4))
    model = net()
    wrap_convs(model, ["0", "2"], method, *bits)
    x = torch.randn(2, 3, 6, 6)
    initialize_lowbit(model, [x])
    model.train()
    model(x).square().sum().backward()
    assert model[2].conv.weight.grad is not None and model[2].conv.weight.grad.abs().sum() > 0
    model.eval()
    again = rebuild_lowbit(net(), {"method": method, "bits_w": bits[0], "bits_a": bits[1], "layers": ["0", "2"]})
    assert isinstance(again[2], LowBitConvTranspose2d)
    again.load_state_dict(model.state_dict(), strict=True)
    again.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_centernet_decoder_binary_round_trip_bops_and_engine(tmp_path):
    from qcompress.bench.size import conv_macs, estimate_bops, weight_compression
    from qcompress.core.checkpoints import load_detector, save_detector
    from qcompress.models import build_detector
    from qcompress.models.registry import compression_spec
    from qcompress.quant.lowbit import layer_bits
    from qcompress.runtime.binary import convert_binary, unsupported_reason

    torch.manual_seed(0)
    detector = build_detector(ARCH, CLASSES, input_size=64, width=8)
    float_model = detector.model
    macs = conv_macs(float_model, (1, 3, 64, 64))
    # stride-32 features 2x2 -> 4 -> 8 -> 16: in * out * kh * kw * input H * input W
    assert [macs[n] for n in DECONVS] == [512 * 8 * 16 * 2 * 2, 8 * 8 * 16 * 4 * 4, 8 * 8 * 16 * 8 * 8]

    model = copy.deepcopy(float_model)
    record = apply_lowbit(model, "binary", scope="decoder", spec=compression_spec(ARCH))
    assert record.layers == DECONVS and record.kept_float == []
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LowBitConvTranspose2d)]
    assert wrapped == DECONVS
    x = torch.randn(1, 3, 64, 64)
    initialize_lowbit(model, [x])
    model.eval()

    bits = layer_bits(record)
    bops = estimate_bops(macs, bits)
    deconv_macs = sum(macs[n] for n in DECONVS)
    assert bops.total_bops == (sum(macs.values()) - deconv_macs) * 1024 + deconv_macs
    assert weight_compression(float_model, bits) > 1

    path = save_detector(detector.with_model(model), tmp_path / "binary-decoder.pth", quantization=record.recipe)
    again = load_detector(path)
    assert [n for n, m in again.model.named_modules() if isinstance(m, LowBitConvTranspose2d)] == DECONVS
    with torch.no_grad():
        reference = model(x)
        assert all(torch.equal(a, b) for a, b in zip(reference, again.model(x)))

    engine_model, conversion = convert_binary(model)  # each transposed conv as 4 phase convs in the XNOR engine
    assert conversion.converted == DECONVS and conversion.skipped == {}
    assert unsupported_reason(model.deconv_layers[0]) is None
    with torch.no_grad():
        for a, b in zip(reference, engine_model(x)):
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
