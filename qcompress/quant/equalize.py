"""Cross-layer equalization and high-bias absorption (Nagel et al., "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV 2019, sec. 4.1).

For a conv pair ``y = W2 f(W1 x + b1) + b2`` with ``f`` positively homogeneous (ReLU, identity),
scaling output channel i of layer 1 by ``1/s_i`` and input channel i of layer 2 by ``s_i`` leaves the
function unchanged. ``s_i = sqrt(r1_i * r2_i) / r2_i`` makes both layers' ranges equal for channel i
(eq. 10), which minimises the loss of per-tensor weight quantization. A layer feeding several convs
(an SSD source feature feeds the next block and two heads) is scaled against all of them at once;
several layers feeding one conv (a head shared by all feature levels) share one set of scales.
Grouped, depthwise and depth-multiplier consumers scale the filter slices that read each channel.

ReLU6 is *not* positively homogeneous: ``relu6(x / s) * s`` clamps at ``6 s``. Equalizing through it
would silently change the network, so :func:`relu6_to_relu` is an explicit, recorded step that the
pipeline applies first (as the paper did for MobileNetV2), and the report measures its cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qcompress.quant.fuse import conv_of
from qcompress.quant.graph import Node, follow_activation


@dataclass
class EqualizationGroup:
    """Convs whose output channels share one set of scales, and the convs reading those channels.

    Usually one producer; several when a consumer reads more than one of them (a head conv applied
    to every feature level): all producers feeding one consumer must divide channel i by the same
    ``s_i`` that the consumer multiplies its input channel i by.
    """

    producer: str
    consumers: list[str]
    activation: str  # "relu", "identity", or "mixed" (shared producers with different activations)
    shared_producers: list[str] = field(default_factory=list)

    @property
    def producers(self) -> list[str]:
        return [self.producer, *self.shared_producers]


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
    """Conv -> [BN] -> [ReLU] -> only convs, joined into one group wherever a consumer reads several
    such producers. A consumer that also reads anything else (the input, an add, code outside modules)
    disqualifies every producer it reads."""
    candidates: dict[str, tuple[str, str]] = {}  # producer -> (last node of its chain, activation)
    for name, node in nodes.items():
        if node.kind != "conv":
            continue
        last, passed = follow_activation(nodes, name)
        if "relu6" in passed:
            continue
        consumers = nodes[last].consumers
        if not consumers or any(nodes[c].kind != "conv" for c in consumers):
            continue
        candidates[name] = (last, "relu" if "relu" in passed else "identity")
    producer_of = {last: name for name, (last, _) in candidates.items()}
    root = {name: name for name in candidates}

    def find(name: str) -> str:
        while root[name] != name:
            root[name] = root[root[name]]
            name = root[name]
        return name

    disqualified: set[str] = set()
    for name, (last, _) in candidates.items():
        for consumer in nodes[last].consumers:
            for source in nodes[consumer].inputs:
                other = producer_of.get(source)
                if other is None:
                    disqualified.add(name)
                else:
                    root[find(other)] = find(name)
    members: dict[str, list[str]] = {}
    for name in candidates:  # execution order
        members.setdefault(find(name), []).append(name)
    bad_roots = {find(name) for name in disqualified}
    groups = []
    for group_root, producers in members.items():
        if group_root in bad_roots:
            continue
        consumers: list[str] = []
        for name in producers:
            consumers += [c for c in nodes[candidates[name][0]].consumers if c not in consumers]
        activations = {candidates[name][1] for name in producers}
        activation = activations.pop() if len(activations) == 1 else "mixed"
        groups.append(EqualizationGroup(producers[0], consumers, activation, producers[1:]))
    return groups


def output_channel_ranges(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).amax(dim=1)


def _by_group(conv: nn.Conv2d, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as (groups, out per group, in per group, taps): input channel ``g * in_per_group + j``
    is slice ``j`` of the filters of group ``g`` (plain, grouped, depthwise and depth-multiplier convs)."""
    out, per_group = weight.shape[:2]
    return weight.view(conv.groups, out // conv.groups, per_group, -1)


def input_channel_ranges(conv: nn.Conv2d) -> torch.Tensor:
    """Largest |weight| reading each input channel."""
    return _by_group(conv, conv.weight.detach().abs()).amax(dim=(1, 3)).flatten()


def range_spread(ranges: torch.Tensor) -> float:
    """max / min of per-channel weight ranges: 1.0 is perfectly balanced."""
    return float(ranges.max() / ranges.clamp(min=1e-12).min())


@torch.no_grad()
def scale_pair(
    producers: nn.Conv2d | Sequence[nn.Conv2d], consumers: Sequence[nn.Conv2d], scales: torch.Tensor
) -> None:
    """Divide producers' output channel i by s_i, multiply consumers' input channel i by s_i."""
    for producer in [producers] if isinstance(producers, nn.Conv2d) else producers:
        producer.weight.div_(scales.view((-1,) + (1,) * (producer.weight.ndim - 1)))
        if producer.bias is not None:
            producer.bias.div_(scales)
    for conv in consumers:
        groups, per_group = conv.groups, conv.weight.shape[1]
        _by_group(conv, conv.weight).mul_(scales.view(groups, 1, per_group, 1))


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
    convs = {g.producer: ([conv_of(fused_model.get_submodule(p)) for p in g.producers],
                          [conv_of(fused_model.get_submodule(c)) for c in g.consumers]) for g in groups}
    for g in groups:
        for name, conv in zip(g.producers, convs[g.producer][0]):
            record.spread_before[name] = range_spread(output_channel_ranges(conv))
            record.scales[name] = torch.ones(conv.out_channels)
    for iteration in range(1, max_iterations + 1):
        largest_change = 0.0
        for g in groups:
            producers, consumers = convs[g.producer]
            r1 = torch.stack([output_channel_ranges(p) for p in producers]).amax(dim=0)
            r2 = torch.stack([input_channel_ranges(c) for c in consumers]).amax(dim=0)
            scales = torch.sqrt(r1 * r2).clamp(min=1e-12) / r2.clamp(min=1e-12)
            scales = torch.where((r1 > 0) & (r2 > 0), scales, torch.ones_like(scales))
            scale_pair(producers, consumers, scales)
            for name in g.producers:
                record.scales[name] *= scales
                if stats is not None and name in stats:
                    mean, std = stats[name]
                    stats[name] = (mean / scales, std / scales)
            largest_change = max(largest_change, float(scales.log().abs().max()))
        record.iterations = iteration
        if largest_change < tolerance:
            break
    for g in groups:
        for name, conv in zip(g.producers, convs[g.producer][0]):
            record.spread_after[name] = range_spread(output_channel_ranges(conv))
    return record


@dataclass
class AbsorbRecord:
    absorbed: dict[str, float] = field(default_factory=dict)  # producer -> total bias moved
    shifts: dict[str, torch.Tensor] = field(default_factory=dict)  # producer -> c per channel (output moved by -c)
    skipped: dict[str, str] = field(default_factory=dict)  # producer with a high bias left in place -> why
    # consumers that received W2 c although zero padding makes that inexact (only with allow_padded=True)
    inexact_consumers: list[str] = field(default_factory=list)

    @property
    def border_exact(self) -> bool:
        """False when a zero-padded consumer received ``W2 c`` (only with ``allow_padded=True``)."""
        return not self.inexact_consumers

    @property
    def changes_function(self) -> bool:
        """Any absorption changes the float function where a pre-activation falls below ``c``
        (``relu(p - c) != relu(p) - c`` there): RFB-320's box outputs move to ~38 dB SQNR on real images."""
        return bool(self.absorbed)


def absorption_is_exact(conv: nn.Conv2d) -> bool:
    """Adding ``W2 c`` to the bias equals feeding ``x - c`` only where every tap reads the input: no padding."""
    if isinstance(conv.padding, str):
        return conv.padding == "valid" or all(k == 1 for k in conv.kernel_size)
    return all(p == 0 for p in conv.padding)


@torch.no_grad()
def absorb_high_bias(
    fused_model: nn.Module,
    groups: list[EqualizationGroup],
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_std: float = 3.0,
    allow_padded: bool = False,
) -> AbsorbRecord:
    """Move ``c = max(0, beta - 3 gamma)`` from a ReLU layer's bias into the next layers' biases (sec. 4.1.2).

    ``relu(p - c) = relu(p) - c`` wherever the pre-activation ``p >= c``, which the BN statistics make
    true for all but ~0.13% of inputs (the paper's approximation). The consumers add ``W2 c`` to their
    bias, which equals reading ``x - c`` only where no tap falls into zero padding: a zero-padded
    consumer (a 3x3 conv with padding 1) would see ``-c`` instead of ``0`` at the border, so such groups
    are skipped (recorded with the reason) unless ``allow_padded``, which records them as inexact.
    Groups whose consumers also read other producers are skipped (each producer has its own ``c``).
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
        consumers = {name: conv_of(fused_model.get_submodule(name)) for name in g.consumers}
        padded = [name for name, conv in consumers.items() if not absorption_is_exact(conv)]
        if g.shared_producers:
            record.skipped[g.producer] = f"its consumers also read {', '.join(g.shared_producers)}"
            continue
        if producer.bias is None:
            record.skipped[g.producer] = "the producer has no bias"
            continue
        if padded and not allow_padded:
            conv = consumers[padded[0]]
            record.skipped[g.producer] = (
                f"consumer {padded[0]} zero-pads its input (padding {conv.padding}): its border taps would "
                f"read -c instead of 0"
            )
            continue
        producer.bias.sub_(c)
        for conv in consumers.values():
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
            taps = _by_group(conv, conv.weight).sum(dim=3)  # (groups, out per group, in per group)
            conv.bias.add_((taps * c.view(conv.groups, 1, -1)).sum(dim=2).flatten())
        record.inexact_consumers += padded
        stats[g.producer] = (mean - c, std)
        record.absorbed[g.producer] = float(c.sum())
        record.shifts[g.producer] = c.clone()
    return record
