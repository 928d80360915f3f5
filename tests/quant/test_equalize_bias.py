"""Data-free quantization pieces (Nagel et al. 2019): equalization, absorption, bias correction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import randomize_bn
from qcompress.models import build_detector
from qcompress.quant.bias_correction import (
    clipped_normal_mean,
    conv_input_means,
    correct_bias,
    empirical_input_means,
    expected_inputs,
    expected_output_shift,
    quantization_error,
)
from qcompress.quant.equalize import (
    absorb_high_bias,
    equalize,
    find_equalization_groups,
    input_channel_ranges,
    output_channel_ranges,
    range_spread,
    relu6_to_relu,
    scale_pair,
)
from qcompress.quant.fuse import conv_of, fuse
from qcompress.quant.graph import trace_graph
from qcompress.quant.pipeline import bn_statistics
from qcompress.quant.qconfig import QuantScheme, weight_observer


def relu_model(seed: int = 0) -> nn.Module:
    """mb2-ssd-lite with ReLU in place of ReLU6 (positively homogeneous) and random BN statistics."""
    torch.manual_seed(seed)
    model = build_detector("mb2-ssd-lite", ["BACKGROUND", "a", "b"]).model
    randomize_bn(model, seed)
    relu6_to_relu(model)
    return model.eval()


def unbalance(fused: nn.Module, groups, seed: int = 0) -> None:
    """The inverse of equalization with random scales over 3 decades: same function, very unequal ranges."""
    g = torch.Generator().manual_seed(seed)
    for group in groups:
        producer = conv_of(fused.get_submodule(group.producer))
        scales = 10 ** (torch.rand(producer.out_channels, generator=g) * 3 - 1.5)
        scale_pair(producer, [conv_of(fused.get_submodule(c)) for c in group.consumers], scales)


def images(n=2, seed=1):
    return torch.rand(n, 3, 300, 300, generator=torch.Generator().manual_seed(seed)) * 1.98 - 0.99


@pytest.fixture(scope="module")
def setup():
    model = relu_model()
    nodes = trace_graph(model, torch.zeros(1, 3, 300, 300))
    stats = bn_statistics(model, nodes)
    fused, _ = fuse(model)
    unbalance(fused, find_equalization_groups(nodes))
    return model, nodes, stats, fused


def _max_rel_diff(a, b):
    return max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(a, b))


def test_unbalancing_kept_the_function(setup):
    model, _, _, fused = setup
    x = images()
    with torch.no_grad():
        assert _max_rel_diff(model(x), fused(x)) <= 1e-4


def test_groups_found_from_the_graph(setup):
    model, nodes, _, _ = setup
    groups = {g.producer: g for g in find_equalization_groups(nodes)}
    # expand -> depthwise inside a block, and the SSD source feature feeding a block and two heads
    assert groups["base_net.2.conv.0"].consumers == ["base_net.2.conv.3"]
    assert sorted(groups["base_net.14.conv.0"].consumers) == [
        "base_net.14.conv.3", "classification_headers.0.0", "regression_headers.0.0"]
    # heads' depthwise -> pointwise
    assert groups["classification_headers.1.0"].consumers == ["classification_headers.1.3"]
    # a projection conv feeding a residual add is not a pair
    assert "base_net.3.conv.6" not in groups


def test_equalization_preserves_the_function_and_balances_ranges(setup):
    model, nodes, stats, fused = setup
    import copy

    eq_model = copy.deepcopy(fused)
    groups = find_equalization_groups(nodes)
    record = equalize(eq_model, groups, stats=dict(stats))
    x = images()
    with torch.no_grad():
        assert _max_rel_diff(fused(x), eq_model(x)) <= 1e-4
    for g in groups:
        assert record.spread_after[g.producer] <= record.spread_before[g.producer] + 1e-6
    mean_before = sum(record.spread_before.values()) / len(groups)
    mean_after = sum(record.spread_after.values()) / len(groups)
    assert mean_after < 0.2 * mean_before
    # converged: each pair's producer output ranges equal its consumers' input ranges
    g = next(g for g in groups if len(g.consumers) == 1)
    r1 = output_channel_ranges(conv_of(eq_model.get_submodule(g.producer)))
    r2 = input_channel_ranges(conv_of(eq_model.get_submodule(g.consumers[0])))
    assert torch.allclose(r1, r2, rtol=1e-3)


def test_high_bias_absorption_preserves_the_function_where_bn_says_it_must(setup):
    import copy

    model, nodes, stats, fused = setup
    absorbed_model = copy.deepcopy(fused)
    # make some channels "always on": large positive beta relative to gamma
    groups = find_equalization_groups(nodes)
    stats_copy = {k: (m.clone(), s.clone()) for k, (m, s) in stats.items()}
    target = next(g for g in groups if g.activation == "relu" and conv_of(absorbed_model.get_submodule(g.consumers[0])).kernel_size == (1, 1))
    conv = conv_of(absorbed_model.get_submodule(target.producer))
    with torch.no_grad():
        conv.bias.add_(10.0)
        conv_of(fused.get_submodule(target.producer)).bias.add_(10.0)
    stats_copy[target.producer] = (stats_copy[target.producer][0] + 10.0, stats_copy[target.producer][1])
    record = absorb_high_bias(absorbed_model, [target], stats_copy)
    assert record.absorbed[target.producer] > 0
    # Where the pre-activation p stays above the absorbed constant c, ReLU(p - c) = ReLU(p) - c and the
    # consumer's new bias adds back W2 c: the consumer sees the same function.
    ref_bias = conv_of(fused.get_submodule(target.producer)).bias
    c = (ref_bias - conv.bias).detach()
    assert float(c.min()) >= 0 and float(c.max()) > 0
    p = c.view(1, -1, 1, 1) + torch.rand(1, c.numel(), 5, 5)
    consumer_ref = conv_of(fused.get_submodule(target.consumers[0]))
    consumer_new = conv_of(absorbed_model.get_submodule(target.consumers[0]))
    with torch.no_grad():
        assert torch.allclose(consumer_ref(torch.relu(p)), consumer_new(torch.relu(p - c.view(1, -1, 1, 1))), rtol=1e-4, atol=1e-4)


def test_clipped_normal_mean_matches_numeric_integration():
    mean, std = torch.tensor([-1.0, 0.5, 3.0, 7.0]), torch.tensor([1.0, 2.0, 1.5, 0.5])
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    dz = float(z[1] - z[0])
    for low, high in ((0.0, math.inf), (0.0, 6.0)):
        expected = []
        for m, s in zip(mean, std):
            x = m + s * z
            pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
            expected.append(float((x.clamp(low, high) * pdf).sum() * dz))
        assert torch.allclose(clipped_normal_mean(mean, std, low, high), torch.tensor(expected), atol=1e-4)


def test_expected_output_shift_by_hand():
    conv = nn.Conv2d(2, 2, 1)
    error = torch.tensor([[[[0.1]], [[-0.2]]], [[[0.0]], [[0.3]]]])
    mean = torch.tensor([2.0, 1.0])
    # eps @ E[x] = [0.1*2 - 0.2*1, 0 + 0.3*1]
    assert torch.allclose(expected_output_shift(conv, error, mean), torch.tensor([0.0, 0.3]))
    dw = nn.Conv2d(2, 2, 3, groups=2)
    error = torch.ones(2, 1, 3, 3) * torch.tensor([0.01, -0.02]).view(2, 1, 1, 1)
    assert torch.allclose(expected_output_shift(dw, error, mean), torch.tensor([0.18, -0.18]))


def test_analytic_bias_correction_computes_the_expected_shift():
    """conv1 -> BN -> ReLU -> conv2: conv2's bias moves by eps @ E[relu(N(beta, gamma^2))]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1)).eval()
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    nodes = trace_graph(model, torch.zeros(1, 3, 4, 4))
    stats = bn_statistics(model, nodes)
    means = conv_input_means(nodes, expected_inputs(nodes, stats))
    expected_mean = clipped_normal_mean(torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([1.0, 2.0, 0.5, 1.5]))
    assert torch.allclose(means["3"], expected_mean)
    fused, _ = fuse(model)
    observer = weight_observer(QuantScheme(per_channel=False))
    eps = quantization_error(fused[3].weight.detach(), observer)
    before = fused[3].bias.detach().clone()
    correct_bias(fused, {"3": means["3"]}, observer, "analytic")
    assert torch.allclose(before - fused[3].bias.detach(), eps.flatten(1) @ expected_mean, atol=1e-6)


def test_empirical_bias_correction_zeroes_the_mean_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 6, 1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(torch.logspace(-2, 1, 6).view(-1, 1, 1, 1))  # coarse per-tensor grid
    fused, _ = fuse(model)
    data = [torch.rand(4, 3, 16, 16) * 2]
    observer = weight_observer(QuantScheme(per_channel=False))
    means = empirical_input_means(fused, ["0", "2"], data)
    layer = conv_of(fused.get_submodule("2"))
    x = torch.relu(conv_of(fused.get_submodule("0"))(data[0]))

    def mean_error():
        q_weight = layer.weight + quantization_error(layer.weight, observer)
        q_out = nn.functional.conv2d(x, q_weight, layer.bias)
        return (q_out - reference).mean(dim=(0, 2, 3)).abs().max()

    with torch.no_grad():
        reference = layer(x)
        before = mean_error()
        correct_bias(fused, {"2": means["2"]}, observer, "empirical")
        after = mean_error()
    assert before > 1e-3 and after < 1e-5
