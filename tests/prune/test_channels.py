"""Structured channel pruning: dependency groups, exact rewrites, function preservation."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from qcompress.bench.size import count_macs, count_parameters
from qcompress.errors import QCompressError
from qcompress.models import build_detector
from qcompress.prune.channels import (
    apply_pruning,
    channels_to_keep,
    find_channel_groups,
    plan_pruning,
    prune_channels,
)
from qcompress.prune.sensitivity import sensitivity_scan

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("BACKGROUND", "a", "b")


@pytest.fixture(scope="module")
def ssd() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(build_detector("mb2-ssd-lite", CLASSES).model)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 192, 192, generator=torch.Generator().manual_seed(1))  # any size runs; 300 is slower


@pytest.fixture(scope="module")
def groups(ssd, x):
    return find_channel_groups(ssd, x[:1])


def _run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model.eval()(x)


def test_groups_cover_hidden_widths_heads_and_flag_residuals(groups):
    by_name = {g.name: g for g in groups}
    hidden = by_name["base_net.2.conv.0"]  # pw-expand -> BN -> ReLU6 -> dw -> BN -> ReLU6 -> project
    assert hidden.channels == 96 and not hidden.residual
    assert hidden.carriers == ["base_net.2.conv.1", "base_net.2.conv.3", "base_net.2.conv.4"]
    assert hidden.consumers == ["base_net.2.conv.6"]
    tap = by_name["base_net.14.conv.0"]  # 576-wide expansion also feeds both first SSD-Lite heads
    assert {"classification_headers.0.0", "classification_headers.0.1", "regression_headers.0.0"} <= set(tap.carriers)
    assert {"base_net.14.conv.6", "classification_headers.0.3", "regression_headers.0.3"} == set(tap.consumers)
    stage = by_name["base_net.4.conv.6"]  # 32-wide stage: three block outputs joined by two adds
    assert stage.residual and stage.producers == ["base_net.4.conv.6", "base_net.5.conv.6", "base_net.6.conv.6"]
    producers = {p for g in groups for p in g.producers}
    for head in ("classification_headers", "regression_headers"):  # head outputs are predictions: frozen
        assert f"{head}.5" not in producers and all(f"{head}.{i}.3" not in producers for i in range(5))
    assert "base_net.0.0" in by_name and all("base_net.0.0" not in g.consumers for g in groups)  # image input frozen


def test_zero_amount_is_identity(ssd, x):
    model = copy.deepcopy(ssd)
    record = prune_channels(model, x[:1], 0.0)
    assert record.groups == {}
    for a, b in zip(_run(ssd, x), _run(model, x)):
        assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(ssd.state_dict().values(), model.state_dict().values()))


def test_pruned_model_runs_with_expected_shapes(ssd, x, groups):
    model = copy.deepcopy(ssd)
    record = prune_channels(model, x[:1], 0.5, round_to=0)
    hidden = model.base_net[2].conv
    assert hidden[0].out_channels == 48 and hidden[1].num_features == 48
    assert hidden[3].in_channels == hidden[3].out_channels == hidden[3].groups == 48
    assert hidden[3].weight.shape == (48, 1, 3, 3) and hidden[4].running_var.shape == (48,)
    assert hidden[6].in_channels == 48 and hidden[6].weight.shape == (24, 48, 1, 1)  # residual width kept
    head = model.classification_headers[0]
    assert head[0].groups == head[0].out_channels == 288 and head[3].weight.shape == (6 * len(CLASSES), 288, 1, 1)
    assert model.classification_headers[1][3].in_channels == 640  # 1280-wide source feature halved
    assert model.regression_headers[5].in_channels == 32 and model.regression_headers[5].out_channels == 24
    assert set(record.skipped) == {g.name for g in groups if g.residual}
    before, after = _run(ssd, x), _run(model, x)
    assert [t.shape for t in after] == [t.shape for t in before]
    assert all(torch.isfinite(t).all() for t in after)
    assert count_parameters(model) < 0.6 * count_parameters(ssd)
    assert count_macs(model, x[:1].shape).macs < 0.6 * count_macs(ssd, x[:1].shape).macs


def _kill_channels(model: nn.Module, groups, fraction: float, seed: int) -> dict[str, list[int]]:
    """Zero every weight touching a random subset of each group's channels; return them per group."""
    g = torch.Generator().manual_seed(seed)
    dead = {}
    with torch.no_grad():
        for group in groups:
            k = int(group.channels * fraction)
            idx = torch.randperm(group.channels, generator=g)[:k].sort().values
            for name in group.producers:
                model.get_submodule(name).weight[idx] = 0
            for name in group.carriers:
                module = model.get_submodule(name)
                if isinstance(module, nn.Conv2d):
                    module.weight[idx] = 0
            for name in group.consumers:
                model.get_submodule(name).weight[:, idx] = 0
            dead[group.name] = idx.tolist()
    return dead


@pytest.mark.parametrize("criterion, include_residual", [("l1", False), ("l2", True)])
def test_removing_dead_channels_keeps_outputs(ssd, x, groups, criterion, include_residual):
    """Channels whose weights are all zero (incl. the next conv's input slice) are the ones picked,
    and removing them everywhere (BN, depthwise partner, next conv, heads, across adds) changes nothing."""
    model = copy.deepcopy(ssd)
    targets = [g for g in groups if include_residual or not g.residual]
    dead = _kill_channels(model, targets, 0.25, seed=3)
    reference = _run(model, x)
    amounts = {g.name: len(dead[g.name]) / g.channels for g in targets}
    plan, _ = plan_pruning(model, groups, 0.0, criterion, amounts, None, include_residual)
    assert {name: idx.tolist() for name, idx in plan.items()} == dead
    record = apply_pruning(model, groups, plan)
    assert all(v["after"] == v["before"] - len(dead[k]) for k, v in record.groups.items())
    if include_residual:
        assert model.base_net[3].conv[6].out_channels == 24 - 6 and model.base_net[4].conv[0].in_channels == 24 - 6
    for a, b in zip(reference, _run(model, x)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_amounts_by_group_name_and_glob(ssd, x):
    model = copy.deepcopy(ssd)
    record = prune_channels(model, x[:1], 0.0, amounts={"base_net.2.conv.0": 0.5, "extras.*": 0.25}, round_to=0)
    assert record.groups["base_net.2.conv.0"]["after"] == 48
    assert record.groups["extras.0.conv.0"]["after"] == 192 and "base_net.3.conv.0" not in record.groups


@pytest.mark.parametrize(
    "channels, amount, round_to, keep",
    [(96, 0.2, None, 77), (96, 0.2, 16, 80), (32, 0.2, 16, 32), (64, 0.9, 16, 16), (4, 0.99, None, 1), (10, 0.0, 16, 10)],
)
def test_channels_to_keep_rounding(channels, amount, round_to, keep):
    assert channels_to_keep(channels, amount, round_to) == keep


@pytest.mark.parametrize("amount", [1.0, 1.5, -0.1])
def test_invalid_amount(amount):
    with pytest.raises(QCompressError):
        prune_channels(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.zeros(1, 3, 4, 4), amount)


class _CatNet(nn.Module):
    """conv a -> (cat with conv b) -> conv c; plus conv d -> e -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.cat = FloatFunctional()
        self.c = nn.Conv2d(16, 12, 1)
        self.bn = nn.BatchNorm2d(12)
        self.act = nn.ReLU()
        self.d = nn.Conv2d(12, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = self.cat.cat([self.a(x), self.b(x)], dim=1)
        return self.fc(self.flat(self.pool(self.d(self.act(self.bn(self.c(y)))))))


def test_generic_graph_freezes_cat_and_linear_inputs():
    torch.manual_seed(0)
    net = randomize_bn(_CatNet())
    x = torch.randn(2, 3, 8, 8)
    groups = find_channel_groups(net, x)
    assert [g.name for g in groups] == ["c"]  # a/b feed a cat, d feeds a linear layer through flatten
    before = _run(net, x)
    prune_channels(net, x, 0.5, round_to=0)
    assert net.c.out_channels == net.bn.num_features == net.d.in_channels == 6
    assert _run(net, x).shape == before.shape


def test_sensitivity_scan_tabulates_drops(ssd, x, groups):
    small = [g for g in groups if g.name in ("base_net.2.conv.0", "extras.3.conv.0")]
    reference = _run(ssd, x[:1])[0]

    def prune_one(model, name, amount):
        group = next(g for g in small if g.name == name)
        plan, _ = plan_pruning(model, [group], amount, "l1", None, None, True)
        apply_pruning(model, [group], plan)

    def score(model):  # higher is better: negative distance to the unpruned logits
        return -float((_run(model, x[:1])[0] - reference).abs().mean())

    scan = sensitivity_scan(ssd, [g.name for g in small], (0.0, 0.5), prune_one, score)
    assert scan.baseline == 0.0
    drops = scan.drops()
    assert all(drops[name][0.0] == 0.0 and drops[name][0.5] > 0 for name in drops)
    assert scan.suggest(0.0) == {name: 0.0 for name in drops}
    assert len(scan.rows()) == 2 and len(scan.rows()[0]) == 3


class _SelfResidual(nn.Module):
    """x -> a -> a + conv(a) -> c: the 1x1 conv both reads and writes the coupled channel space."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.skip = FloatFunctional()

    def forward(self, x):
        y = self.a(x)
        return self.c(self.skip.add(y, self.b(y)))


def test_coupled_group_where_one_conv_reads_and_writes_it():
    torch.manual_seed(0)
    net = _SelfResidual().eval()
    x = torch.randn(2, 3, 8, 8)
    (group,) = find_channel_groups(net, x)
    assert group.residual and group.producers == ["a", "b"] and group.consumers == ["b", "c"]
    dead = _kill_channels(net, [group], 0.25, seed=0)
    reference = _run(net, x)
    record = prune_channels(net, x, 0.25, round_to=0, include_residual=True)
    assert record.groups["a"]["removed"] == dead["a"]
    assert net.b.weight.shape == (6, 6, 1, 1) and net.c.in_channels == 6
    torch.testing.assert_close(_run(net, x), reference, rtol=1e-5, atol=1e-5)


def test_library_pruning_sees_through_torchvision_resnet_blocks_and_says_what_it_could_not_reach(caplog):
    """The library entry point applies the FloatFunctional twins itself (the CLI used to, before calling
    it): without them a ResNet's shared ReLU and in-place adds hide all but 7 groups (1.6% of channels)."""
    from qcompress.models.registry import build_detector as build_any

    torch.manual_seed(0)
    model = build_any("retinanet_resnet50_fpn", CLASSES, input_size=128).model.eval()
    keys = set(model.state_dict())
    widths_before = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    with caplog.at_level("WARNING", logger="qcompress.prune.channels"):
        record = prune_channels(model, torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)), 0.3)
    # both hidden widths of all 16 bottlenecks (conv1 -> conv2 and conv2 -> conv3)
    hidden = [n for n in record.groups if n.startswith("backbone.body.layer") and n.endswith(("conv1", "conv2"))]
    assert len(hidden) == 32
    assert all(record.groups[n]["after"] == record.groups[n]["before"] - round(0.3 * record.groups[n]["before"])
               for n in hidden)
    assert set(model.state_dict()) == keys  # the twins add no parameters or buffers
    # Block outputs are residual-coupled and skipped by default, so 30% of all channels is out of reach.
    widths_after = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    assert record.requested == pytest.approx(0.3)
    assert record.achieved == pytest.approx(1 - widths_after / widths_before)
    assert record.achieved < 0.15 and "residual-coupled" in record.shortfall
    assert "channel pruning fell short" in caplog.text
