"""Data-free quantization pieces (Nagel et al. 2019): equalization, absorption, bias correction."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from qcompress.models import build_detector
from qcompress.quant.bias_correction import (
    clipped_normal_mean,
    clipped_normal_variance,
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
    _, nodes, _, _ = setup
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
    _, nodes, stats, fused = setup
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
    _, nodes, stats, fused = setup
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


def test_clipped_normal_mean_and_variance_match_numeric_integration():
    mean, std = torch.tensor([-1.0, 0.5, 3.0, 7.0]), torch.tensor([1.0, 2.0, 1.5, 0.5])
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    dz = float(z[1] - z[0])
    for low, high in ((0.0, math.inf), (0.0, 6.0)):
        expected, second = [], []
        for m, s in zip(mean, std):
            x = m + s * z
            pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
            expected.append(float((x.clamp(low, high) * pdf).sum() * dz))
            second.append(float((x.clamp(low, high) ** 2 * pdf).sum() * dz))
        expected, second = torch.tensor(expected), torch.tensor(second)
        assert torch.allclose(clipped_normal_mean(mean, std, low, high), expected, atol=1e-4)
        assert torch.allclose(clipped_normal_variance(mean, std, low, high), second - expected**2, atol=1e-4)


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


# ------------------------------------------------------------------ structures CLE and absorption must respect
def _conv_bn_relu(cin, cout, k=1, stride=1, padding=0):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=padding), nn.BatchNorm2d(cout), nn.ReLU())


def _traced_and_fused(model: nn.Module, shape=(1, 3, 12, 12)):
    model = randomize_bn(model.eval())
    nodes = trace_graph(model, torch.zeros(shape))
    stats = bn_statistics(model, nodes)
    fused, _ = fuse(model)
    return nodes, stats, fused


def _spread_producers(fused: nn.Module, names, seed: int = 0) -> None:
    """Very unequal per-channel ranges (changes the function: the reference is the model afterwards)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            conv = conv_of(fused.get_submodule(name))
            conv.weight.mul_((10 ** (torch.rand(conv.out_channels, generator=g) * 3 - 1.5)).view(-1, 1, 1, 1))


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return [out] if isinstance(out, torch.Tensor) else list(out)


class SharedHead(nn.Module):
    """Two feature levels read by one head conv (a head shared across levels, as in RetinaNet or FCOS)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _conv_bn_relu(3, 8, 3, padding=1)
        self.b = _conv_bn_relu(3, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.a(x)), self.head(self.b(x))


def test_cle_equalizes_a_consumer_shared_by_two_producers_jointly():
    torch.manual_seed(0)
    nodes, stats, fused = _traced_and_fused(SharedHead())
    _spread_producers(fused, ["a.0", "b.0"])
    reference = copy.deepcopy(fused)
    groups = find_equalization_groups(nodes)
    equalize(fused, groups, stats=stats)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    # Each producer rescaling the head's input channels on its own changed the outputs by 93-157 %.
    diff = _max_rel_diff(_outputs(reference, x), _outputs(fused, x))
    assert diff <= 1e-4, diff
    joint = [g for g in groups if "head" in g.consumers]
    assert len(joint) == 1 and sorted(joint[0].producers) == ["a.0", "b.0"]
    # converged: the larger producer range of each channel equals the head's input range
    r1 = torch.maximum(*(output_channel_ranges(conv_of(fused.get_submodule(p))) for p in ("a.0", "b.0")))
    assert torch.allclose(r1, input_channel_ranges(fused.get_submodule("head")), rtol=1e-3)


class GroupedConsumers(nn.Module):
    """A ReLU layer read by a 2-group conv and by a depth-multiplier (x2) depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 8)
        self.grouped = nn.Conv2d(8, 6, 3, groups=2)
        self.multiplier = nn.Conv2d(8, 16, 3, groups=8)

    def forward(self, x):
        y = self.stem(x)
        return self.grouped(y), self.multiplier(y)


def test_cle_handles_grouped_and_depth_multiplier_consumers():
    torch.manual_seed(0)
    nodes, stats, fused = _traced_and_fused(GroupedConsumers())
    _spread_producers(fused, ["stem.0"])
    reference = copy.deepcopy(fused)
    groups = find_equalization_groups(nodes)
    assert [sorted(g.consumers) for g in groups] == [["grouped", "multiplier"]]
    record = equalize(fused, groups, stats=stats)  # raised "grouped conv with 2 groups cannot be equalized"
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    diff = _max_rel_diff(_outputs(reference, x), _outputs(fused, x))
    assert diff <= 1e-4, diff
    assert record.spread_after["stem.0"] < 0.1 * record.spread_before["stem.0"]
    # Input channel i of the 2-group conv is slice i % 4 of the filters of group i // 4; of the
    # multiplier conv, filters 2i and 2i + 1.
    grouped = fused.grouped.weight.detach().abs().view(2, 3, 4, 9).amax(dim=(1, 3)).flatten()
    multiplier = fused.multiplier.weight.detach().abs().view(8, 2, 9).amax(dim=(1, 2))
    r1 = output_channel_ranges(conv_of(fused.get_submodule("stem.0")))
    assert torch.allclose(r1, torch.maximum(grouped, multiplier), rtol=1e-3)


def test_equalization_rescales_bn_statistics_with_the_weights(setup):
    """Later data-free steps read the statistics: they must describe the *equalized* layer's output."""
    _, nodes, stats, fused = setup
    eq_model = copy.deepcopy(fused)
    groups = find_equalization_groups(nodes)
    new_stats = {k: (m.clone(), s.clone()) for k, (m, s) in stats.items()}
    equalize(eq_model, groups, stats=new_stats)
    checked = 0
    for g in groups:
        if g.producer not in stats:
            continue
        before = conv_of(fused.get_submodule(g.producer)).bias.detach()
        after = conv_of(eq_model.get_submodule(g.producer)).bias.detach()
        # The folded bias scales by 1 / s_i only (the weights also carry the previous group's input scales).
        ok = before.abs() > 1e-3
        ratio = after[ok] / before[ok]
        assert torch.allclose(new_stats[g.producer][0][ok], stats[g.producer][0][ok] * ratio, rtol=1e-4, atol=1e-6)
        assert torch.allclose(new_stats[g.producer][1][ok], stats[g.producer][1][ok] * ratio, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked > 20


class AlwaysOn(nn.Module):
    """ReLU layers whose pre-activation never drops below beta - 3 gamma (tiny weights, beta 5, gamma 0.3),
    each read by one kind of consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.p_pointwise, self.pointwise = _conv_bn_relu(3, 8), nn.Conv2d(8, 5, 1)
        self.p_padded, self.padded = _conv_bn_relu(3, 8), nn.Conv2d(8, 5, 3, padding=1)
        self.p_depthwise, self.depthwise = _conv_bn_relu(3, 8), nn.Conv2d(8, 8, 3, groups=8)
        self.p_multiplier, self.multiplier = _conv_bn_relu(3, 8), nn.Conv2d(8, 16, 3, groups=8)

    def forward(self, x):
        return (self.pointwise(self.p_pointwise(x)), self.padded(self.p_padded(x)),
                self.depthwise(self.p_depthwise(x)), self.multiplier(self.p_multiplier(x)))


def _always_on():
    torch.manual_seed(0)
    model = AlwaysOn().eval()
    with torch.no_grad():
        for seq in (model.p_pointwise, model.p_padded, model.p_depthwise, model.p_multiplier):
            seq[0].weight.mul_(0.01)
    nodes = trace_graph(model, torch.zeros(1, 3, 10, 10))
    with torch.no_grad():
        for seq in (model.p_pointwise, model.p_padded, model.p_depthwise, model.p_multiplier):
            seq[1].bias.fill_(5.0)
            seq[1].weight.fill_(0.3)
    stats = bn_statistics(model, nodes)
    fused, _ = fuse(model)
    return nodes, stats, fused


def test_high_bias_absorption_is_exact_and_skips_zero_padded_consumers():
    nodes, stats, fused = _always_on()
    reference = copy.deepcopy(fused)
    record = absorb_high_bias(fused, find_equalization_groups(nodes), stats)
    x = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref, out = _outputs(reference, x), _outputs(fused, x)
    c = 5.0 - 3 * 0.3
    assert record.absorbed == {"p_pointwise.0": pytest.approx(8 * c), "p_depthwise.0": pytest.approx(8 * c),
                               "p_multiplier.0": pytest.approx(8 * c)}
    # A 3x3 zero-padded consumer would see -c instead of 0 at the border taps: not absorbed, and said why.
    assert "padding" in record.skipped["p_padded.0"]
    assert torch.equal(conv_of(fused.get_submodule("p_padded.0")).bias, conv_of(reference.get_submodule("p_padded.0")).bias)
    for r, o in zip(ref, out):
        assert float((r - o).abs().max() / r.abs().max()) <= 1e-5
    assert record.border_exact and record.changes_function  # exact here only because p >= c everywhere
    # Forcing it: the interior stays exact, the border ring is off by the padded taps' W2 c.
    nodes, stats, forced = _always_on()
    record = absorb_high_bias(forced, [g for g in find_equalization_groups(nodes) if g.producer == "p_padded.0"],
                              stats, allow_padded=True)
    assert not record.border_exact and record.inexact_consumers == ["padded"]
    ref_padded, out_padded = _outputs(reference, x)[1], _outputs(forced, x)[1]
    assert torch.allclose(ref_padded[..., 1:-1, 1:-1], out_padded[..., 1:-1, 1:-1], atol=1e-4)
    assert float((ref_padded[..., 0, :] - out_padded[..., 0, :]).abs().max()) > 0.1


class TwoBranchAddRelu(nn.Module):
    """a = BN(conv_a(x)), b = BN(conv_b(x)) with orthogonal filters (independent for white-noise x),
    then relu(a + b) through FloatFunctional.add_relu, read by a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(16, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(16, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.join = FloatFunctional()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.join.add_relu(self.a(x), self.b(x)))


def test_analytic_mean_of_add_relu_is_the_rectified_sum():
    torch.manual_seed(0)
    model = TwoBranchAddRelu().eval()
    q, _ = torch.linalg.qr(torch.randn(16, 8))
    with torch.no_grad():
        model.a[0].weight.copy_(q[:, :4].T.reshape(4, 16, 1, 1))
        model.b[0].weight.copy_(q[:, 4:].T.reshape(4, 16, 1, 1))
        for seq, beta in ((model.a, [-1.0, 0.5, -0.2, 2.0]), (model.b, [-0.5, -1.5, 0.1, 1.0])):
            seq[1].running_mean.zero_()
            seq[1].running_var.fill_(1.0 - seq[1].eps)  # unit-norm filters on N(0, 1) inputs: var 1
            seq[1].bias.copy_(torch.tensor(beta))
            seq[1].weight.copy_(torch.tensor([1.0, 0.7, 1.5, 0.4]))
    nodes = trace_graph(model, torch.zeros(1, 16, 4, 4))
    join = next(n for n in nodes.values() if n.name == "join")
    means = expected_inputs(nodes, bn_statistics(model, nodes))
    x = torch.randn(64, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        empirical = torch.relu(model.a(x) + model.b(x)).mean(dim=(0, 2, 3))
    # Before: E[a] + E[b] = [-1.5, -1.0, -0.1, 3.0], negative means after a ReLU.
    assert torch.allclose(means[join.name], empirical, atol=0.01)
    assert torch.allclose(conv_input_means(nodes, means)["head"], empirical, atol=0.01)
