"""Cross-layer equalization and high-bias absorption (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV 2019, sec. 4.1).

For a conv pair ``y = W2 f(W1 x + b1) + b2`` with ``f`` positively homogeneous (ReLU, identity),
scaling output channel i of layer 1 by ``1/s_i`` and input channel i of layer 2 by ``s_i`` leaves the
function unchanged. ``s_i = sqrt(r1_i * r2_i) / r2_i`` makes both layers' ranges equal for channel i
(eq. 10), which minimises the loss of per-tensor weight quantization. A layer feeding several convs
(an SSD source feature feeds the next block and two heads) is scaled against all of them at once.

ReLU6 is *not* positively homogeneous: ``relu6(x / s) * s`` clamps at ``6 s``. Equalizing through it
would silently change the network, so :func:`relu6_to_relu` is an explicit, recorded step that the
pipeline applies first (as the paper did for MobileNetV2), and the report measures its cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qcompress.quant.fuse import conv_of
from qcompress.quant.graph import Node, follow_activation


@dataclass
class EqualizationGroup:
    producer: str
    consumers: list[str]
    activation: str  # "relu" or "identity"


@dataclass
class EqualizeRecord:
    groups: list[EqualizationGroup] = field(default_factory=list)
    iterations: int = 0
    # per producer layer: spread of per-output-channel weight ranges (max/min) before and after
    spread_before: dict[str, float] = field(default_factory=dict)
    spread_after: dict[str, float] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)


def relu6_to_relu(model: nn.Module) -> list[str]:
    """Replace every ReLU6 by ReLU in place; returns the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(module, child_name, nn.ReLU(inplace=child.inplace))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


def find_equalization_groups(nodes: dict[str, Node]) -> list[EqualizationGroup]:
    """Conv -> [BN] -> [ReLU] -> only convs, where every consumer reads the producer's channels 1:1."""
    groups = []
    for name, node in nodes.items():
        if node.kind != "conv":
            continue
        last, passed = follow_activation(nodes, name)
        if "relu6" in passed:
            continue
        consumers = nodes[last].consumers
        if not consumers or any(nodes[c].kind != "conv" for c in consumers):
            continue
        groups.append(EqualizationGroup(name, list(consumers), "relu" if "relu" in passed else "identity"))
    return groups


def output_channel_ranges(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).amax(dim=1)


def input_channel_ranges(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach().abs()
    if conv.groups == 1:
        return w.transpose(0, 1).flatten(1).amax(dim=1)
    if conv.groups == conv.in_channels == conv.out_channels:
        return w.flatten(1).amax(dim=1)
    raise ValueError(f"grouped conv with {conv.groups} groups cannot be equalized")


def range_spread(ranges: torch.Tensor) -> float:
    """max / min of per-channel weight ranges: 1.0 is perfectly balanced."""
    return float(ranges.max() / ranges.clamp(min=1e-12).min())


@torch.no_grad()
def scale_pair(producer: nn.Conv2d, consumers: list[nn.Conv2d], scales: torch.Tensor) -> None:
    """Divide producer output channel i by s_i, multiply consumers' input channel i by s_i."""
    shape = (-1,) + (1,) * (producer.weight.ndim - 1)
    producer.weight.div_(scales.view(shape))
    if producer.bias is not None:
        producer.bias.div_(scales)
    for conv in consumers:
        if conv.groups == 1:
            conv.weight.mul_(scales.view(1, -1, *([1] * (conv.weight.ndim - 2))))
        else:
            conv.weight.mul_(scales.view(shape))


@torch.no_grad()
def equalize(
    fused_model: nn.Module, groups: list[EqualizationGroup], max_iterations: int = 100, tolerance: float = 1e-6,
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> EqualizeRecord:
    """Equalize ``groups`` in place on a BN-folded model, iterating to convergence.

    ``stats`` (producer name -> (mean, std) of its pre-activation output), when given, are rescaled
    with the weights so later data-free steps keep seeing the right distributions.
    """
    record = EqualizeRecord(groups=groups)
    convs = {g.producer: (conv_of(fused_model.get_submodule(g.producer)),
                          [conv_of(fused_model.get_submodule(c)) for c in g.consumers]) for g in groups}
    for g in groups:
        record.spread_before[g.producer] = range_spread(output_channel_ranges(convs[g.producer][0]))
        record.scales[g.producer] = torch.ones(convs[g.producer][0].out_channels)
    for iteration in range(1, max_iterations + 1):
        largest_change = 0.0
        for g in groups:
            producer, consumers = convs[g.producer]
            r1 = output_channel_ranges(producer)
            r2 = torch.stack([input_channel_ranges(c) for c in consumers]).amax(dim=0)
            scales = torch.sqrt(r1 * r2).clamp(min=1e-12) / r2.clamp(min=1e-12)
            scales = torch.where((r1 > 0) & (r2 > 0), scales, torch.ones_like(scales))
            scale_pair(producer, consumers, scales)
            record.scales[g.producer] *= scales
            if stats is not None and g.producer in stats:
                mean, std = stats[g.producer]
                stats[g.producer] = (mean / scales, std / scales)
            largest_change = max(largest_change, float(scales.log().abs().max()))
        record.iterations = iteration
        if largest_change < tolerance:
            break
    for g in groups:
        record.spread_after[g.producer] = range_spread(output_channel_ranges(convs[g.producer][0]))
    return record


@dataclass
class AbsorbRecord:
    absorbed: dict[str, float] = field(default_factory=dict)  # producer -> total bias moved


@torch.no_grad()
def absorb_high_bias(
    fused_model: nn.Module,
    groups: list[EqualizationGroup],
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_std: float = 3.0,
) -> AbsorbRecord:
    """Move ``c = max(0, beta - 3 gamma)`` from a ReLU layer's bias into the next layers' biases (sec. 4.1.2).

    Exact wherever the pre-activation stays above ``c`` (ReLU(x - c) = ReLU(x) - c there), which the BN
    statistics make true for all but ~0.1% of inputs; zero padding at borders is the other deviation.
    """
    record = AbsorbRecord()
    for g in groups:
        if g.activation != "relu" or g.producer not in stats:
            continue
        mean, std = stats[g.producer]
        c = (mean - num_std * std).clamp(min=0)
        if not bool((c > 0).any()):
            continue
        producer = conv_of(fused_model.get_submodule(g.producer))
        if producer.bias is None:
            continue
        producer.bias.sub_(c)
        for name in g.consumers:
            conv = conv_of(fused_model.get_submodule(name))
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
            if conv.groups == 1:
                conv.bias.add_((conv.weight.flatten(2).sum(dim=2) * c.view(1, -1)).sum(dim=1))
            else:
                conv.bias.add_(conv.weight.flatten(1).sum(dim=1) * c)
        stats[g.producer] = (mean - c, std)
        record.absorbed[g.producer] = float(c.sum())
    return record
