"""AdaRound (Nagel et al. 2020) and BN re-estimation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

from qcompress.quant.adaround import (
    AdaRoundOptions,
    adaround,
    fix_weight_qparams,
    layer_of,
    rectified_sigmoid,
    round_layer,
    weight_grid,
)
from qcompress.quant.bn_reestimate import reestimate_bn
from qcompress.quant.fuse import fuse
from qcompress.quant.pipeline import quantized_weight_layers
from qcompress.quant.ptq import calibrate, convert_static, prepare_static
from qcompress.quant.qconfig import QuantScheme, weight_observer

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = AdaRoundOptions(iters=300, lr=3e-2, batch_size=8, seed=0)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)
        )
        self.dequant = DeQuantStub()

    def forward(self, x):
        return self.dequant(self.body(self.quant(x)))


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallNet().eval()


def calibration(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 10, 10, generator=g) for _ in range(2)]


def layer_outputs(model: nn.Module, name: str, batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(inputs, pre-activation outputs) of one layer over the batches."""
    layer = layer_of(model.get_submodule(name))
    seen_in, seen_out = [], []

    def save(module, inputs, output):
        seen_in.append(inputs[0])
        seen_out.append(output)

    hook = layer.register_forward_hook(save)
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    return seen_in, seen_out


def nearest_rounded(model: nn.Module, observer) -> nn.Module:
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in rounded.named_modules():
            if isinstance(module, nn.Conv2d):
                scale, _, qmin, qmax = weight_grid(module.weight, observer)
                s = scale.view(-1, 1, 1, 1) if scale.numel() > 1 else scale
                module.weight.copy_(s * torch.clamp(torch.round(module.weight / s), qmin, qmax))
    return rounded


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_layer_error_not_above_nearest_rounding(per_channel, bits):
    net, batches = small_net(), calibration()
    observer = weight_observer(QuantScheme(per_channel=per_channel, weight_bits=bits))
    rounded = copy.deepcopy(net)
    record = adaround(rounded, batches, observer, layers=["body.0", "body.2", "body.4"], options=FAST)
    nearest = nearest_rounded(net, observer)
    # Independent check: each layer's output error against the float model's, on the inputs the
    # rounded model gives it, with the learned weights vs nearest-rounded weights.
    total_learned = total_nearest = 0.0
    for name in ["body.0", "body.2", "body.4"]:
        _, target = layer_outputs(net, name, batches)
        inputs, learned = layer_outputs(rounded, name, batches)
        conv, nearest_conv = layer_of(rounded.get_submodule(name)), layer_of(nearest.get_submodule(name))
        with torch.no_grad():
            err_learned = sum(float((o - t).pow(2).mean()) for o, t in zip(learned, target))
            err_nearest = sum(float((nearest_conv._conv_forward(x, nearest_conv.weight, conv.bias) - t).pow(2).mean())
                              for x, t in zip(inputs, target))
        assert err_learned <= err_nearest * (1 + 1e-6), name
        assert record.layers[name]["loss_adaround"] <= record.layers[name]["loss_nearest"]
        total_learned += err_learned
        total_nearest += err_nearest
    if bits == 4:  # where rounding matters, learning it pays
        assert total_learned < 0.95 * total_nearest


def test_regulariser_drives_rounding_to_zero_or_one():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).eval()
    x = [torch.randn(16, 4, 8, 8)]
    grid = weight_grid(conv.weight, weight_observer(QuantScheme(per_channel=True, weight_bits=4)))
    options = AdaRoundOptions(iters=600, lr=5e-2, seed=0)
    codes, stats = round_layer(conv, conv, x, x, grid, options, torch.Generator().manual_seed(0))
    assert stats["undecided"] < 0.02
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(codes, codes.round())
    # h is the rectified sigmoid: exactly 0 and 1 are reachable
    assert float(rectified_sigmoid(torch.tensor(-10.0))) == 0.0 and float(rectified_sigmoid(torch.tensor(10.0))) == 1.0


def test_deterministic_given_seed():
    observer = weight_observer(QuantScheme(per_channel=True, weight_bits=4))
    runs = []
    for _ in range(2):
        model = small_net()
        runs.append(adaround(model, calibration(), observer, options=AdaRoundOptions(iters=50, lr=3e-2, seed=3)))
    assert runs[0].codes.keys() == runs[1].codes.keys()
    assert all(torch.equal(runs[0].codes[k], runs[1].codes[k]) for k in runs[0].codes)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_model_holds_exactly_the_learned_integers(per_channel, bits):
    scheme = QuantScheme(observer="minmax", per_channel=per_channel, weight_bits=bits)
    fused, _ = fuse(small_net())
    probe, _, _ = prepare_static(fused, scheme, fused=True)
    layers = quantized_weight_layers(probe)
    assert layers == ["body.0", "body.2", "body.4"]
    seen = []
    record = adaround(fused, calibration(), weight_observer(scheme), layers=layers,
                      options=AdaRoundOptions(iters=40, lr=3e-2), on_layer=lambda n, k, total: seen.append((n, k, total)))
    assert seen == [("body.0", 1, 3), ("body.2", 2, 3), ("body.4", 3, 3)]
    prepared, _, _ = prepare_static(fused, scheme, fused=True)
    assert fix_weight_qparams(prepared, record) == layers
    calibrate(prepared, calibration())
    quantized = convert_static(prepared, scheme)
    for name in layers:
        qweight = quantized.get_submodule(name).weight()
        assert torch.equal(qweight.int_repr(), record.codes[name]), name
        low, high = (-8, 7) if bits == 4 else (-128, 127)
        assert int(qweight.int_repr().min()) >= low and int(qweight.int_repr().max()) <= high
    assert sum(s["flipped"] for s in record.layers.values()) > 0  # some weights really left nearest rounding


def test_bn_reestimation_recovers_true_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2), nn.Dropout(0.5)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1))  # channel 0 doubled
    model[1].running_mean.fill_(5.0)  # stale statistics
    model[1].running_var.fill_(9.0)
    model[1].momentum = 0.3
    g = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    batches = [mean.view(1, 2, 1, 1) + std.view(1, 2, 1, 1) * torch.randn(8, 2, 6, 6, generator=g) for _ in range(3)]
    record = reestimate_bn(model, batches)
    # hand-computed: the average over batches of each batch's mean and unbiased variance of the conv output
    outs = [b * torch.tensor([2.0, 1.0]).view(1, 2, 1, 1) for b in batches]
    per_batch_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs])
    per_batch_var = torch.stack([o.transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True) for o in outs])
    assert torch.allclose(model[1].running_mean, per_batch_mean.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, per_batch_var.mean(0), atol=1e-4)
    # ... which is close to the distribution's own (channel 0 scaled by 2)
    assert torch.allclose(model[1].running_mean, torch.tensor([2.0, -2.0]), atol=0.3)
    assert torch.allclose(model[1].running_var, torch.tensor([1.0, 9.0]), rtol=0.2)
    assert record.layers == ["1"] and record.batches == 3 and record.images == 24
    assert record.mean_shift["1"] > 2.0
    assert not model.training and not any(m.training for m in model.modules())
    assert model[1].momentum == 0.3


def test_bn_reestimation_keeps_statistics_without_batches():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)).train()
    model[1].running_mean.fill_(3.0)
    reestimate_bn(model, [])
    assert float(model[1].running_mean) == 3.0 and model.training and model[1].training


def test_pipeline_w4a8_adaround_is_recorded_and_stays_on_16_levels():
    from torch.ao.nn import quantized as nnq

    from qcompress.models import build_detector
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

    torch.manual_seed(0)
    det = build_detector("mb2-ssd-lite", ["BACKGROUND", "a", "b"])
    images = torch.rand(2, 3, 300, 300, generator=torch.Generator().manual_seed(0)) * 1.98 - 0.99
    calls = []
    options = QuantizeOptions(observer="minmax", weight_bits=4, adaround=True, adaround_iters=2,
                              bias_correction="empirical")
    qdet, record = quantize_detector(det, [images], options, on_layer=lambda n, k, total: calls.append((k, total)))
    step = next(s for s in record.steps if s["step"] == "adaround")
    assert step["layers"] == len(calls) == calls[-1][1] > 60
    assert [s["step"] for s in record.steps] == ["bias_correction_empirical", "adaround"]  # after bias correction
    assert record.recipe["weight_bits"] == 4 and record.recipe["adaround"]["iters"] == 2
    convs = [m for m in qdet.model.modules() if isinstance(m, nnq.Conv2d)]
    assert convs and all(-8 <= int(m.weight().int_repr().min()) and int(m.weight().int_repr().max()) <= 7 for m in convs)
    # the reference for per-layer SQNR is the float model before rounding, not the rounded one
    assert record.float_fused is not None
    with pytest.raises(Exception, match="data-free"):
        quantize_detector(det, [], QuantizeOptions(adaround=True, data_free=True))


def test_capture_stops_early_with_the_same_inputs():
    from qcompress.quant.adaround import _capture_inputs, _execution_order

    net, batches = small_net(), calibration()
    order, calls = _execution_order(net, ["body.4", "body.0", "body.2"], batches[:1])
    assert order == ["body.0", "body.2", "body.4"] and calls == {"body.0": 1, "body.2": 1, "body.4": 1}
    layer = layer_of(net.get_submodule("body.2"))
    full, early = _capture_inputs(net, layer, batches), _capture_inputs(net, layer, batches, calls["body.2"])
    assert len(full) == len(early) == 2 and all(torch.equal(a, b) for a, b in zip(full, early))
