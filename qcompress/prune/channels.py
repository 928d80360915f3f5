"""Structured channel pruning that removes channels physically and rewrites every dependent layer.

Four separate pieces, as in Torch-Pruning:

- *what must be cut together* — :func:`find_channel_groups` reads the producer/consumer graph of one
  forward pass (:func:`qcompress.quant.graph.trace_graph`) and unions every tensor that shares a
  channel index space: a conv's output space flows unchanged through BN, activations, pooling and
  depthwise convs, and every tensor entering a residual add shares the add's space. A group is
  the set of layers touching one such space: the convs that produce it (output channels), the BNs
  and depthwise convs that carry it, and the convs that read it (input channels).
- *which channels* — :func:`channel_importance`: L1 or L2 norm of each channel's weights in every
  conv of the group (producers' filters, depthwise filters, consumers' input slices), each layer's
  norms divided by their mean so no layer dominates, summed.
- *how much* — a fraction per group (:func:`plan_pruning`), rounded, never below one channel,
  optionally to a multiple of ``round_to``.
- *how to cut one layer* — :func:`apply_pruning` slices weights, biases and BN statistics in place.

Frozen spaces (never pruned): the network input, anything consumed by a module we cannot rewrite
(linear layers, concatenations, grouped non-depthwise convs, unknown modules, modules called more
than once), and the network outputs (e.g. the SSD-Lite head convs: their channels *are* the
predictions). In MobileNetV2-SSD-Lite what remains is every inverted residual's hidden (expanded)
width — pw-expand out + BN + depthwise + BN + projection in — plus the non-residual block outputs and
source features, whose SSD-Lite head depthwise convs and pointwise inputs shrink with them.

Residual adds: every tensor entering an add must keep the same channel set, so the block outputs of
a MobileNetV2 stage form one coupled group (all projection convs of the stage, their BNs, the adds,
and the next blocks' expand inputs). By default such groups are *skipped*: they are the narrow
bottleneck widths (24..320 channels) that carry all the stage's information, and the hidden widths
hold most of the MACs anyway. ``include_residual=True`` prunes them as one coupled group instead.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qcompress.errors import QCompressError
from qcompress.quant.graph import INPUT, Node, trace_graph

log = logging.getLogger(__name__)

# Leaf modules that act on every channel independently: output channel i depends on input channel i only.
_CHANNELWISE = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU,
    nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
)


def _is_quant_stub(module: nn.Module) -> bool:
    from torch.ao.quantization import DeQuantStub, QuantStub

    return isinstance(module, (QuantStub, DeQuantStub))


def is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


@dataclass
class ChannelGroup:
    """Layers sharing one channel index space (module names)."""

    name: str  # the first producing conv
    channels: int
    producers: list[str] = field(default_factory=list)  # convs whose output channels are this space
    carriers: list[str] = field(default_factory=list)  # depthwise convs and BNs (cut on their only axis)
    consumers: list[str] = field(default_factory=list)  # convs whose input channels are this space
    residual: bool = False  # passes through a residual add

    @property
    def members(self) -> list[str]:
        return self.producers + self.carriers + self.consumers


@dataclass
class PruneRecord:
    """What :func:`prune_channels` changed: per group, channels before/after and the removed indices;
    how much of the network's conv output channels were asked for and how much were removed."""

    groups: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # group -> reason
    requested: float = 0.0  # fraction of all conv output channels the amount(s) ask for
    achieved: float = 0.0  # fraction of all conv output channels removed
    shortfall: str | None = None  # why `achieved` stayed well below `requested` (also logged as a warning)

    def widths(self) -> dict[str, tuple[int, int]]:
        return {name: (g["before"], g["after"]) for name, g in self.groups.items()}


class _Spaces:
    """Union-find over channel spaces with a frozen flag per root."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: list[bool] = []
        self.residual: list[bool] = []

    def new(self, frozen: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.frozen.append(frozen)
        self.residual.append(False)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.frozen[ra] = self.frozen[ra] or self.frozen[rb]
            self.residual[ra] = self.residual[ra] or self.residual[rb]
        return ra

    def freeze(self, i: int) -> None:
        self.frozen[self.find(i)] = True


def find_channel_groups(
    model: nn.Module, example: torch.Tensor, nodes: Mapping[str, Node] | None = None
) -> list[ChannelGroup]:
    """Every prunable channel space of ``model`` (frozen ones excluded), in execution order.

    Residual-coupled groups are included with ``residual=True``; the caller decides whether to cut them.
    """
    nodes = nodes if nodes is not None else trace_graph(model, example)
    spaces = _Spaces()
    out_space: dict[str, int] = {INPUT: spaces.new(frozen=True)}
    roles: list[tuple[int, str, str]] = []  # (space, role, module name)
    for name in _dependency_order(nodes):
        node = nodes[name]
        ins = [out_space.get(src, out_space[INPUT]) for src in node.inputs]  # unknown: treat as frozen
        module = node.module
        if node.kind in ("add", "add_relu"):
            space = ins[0]
            for other in ins[1:]:
                space = spaces.union(space, other)
            spaces.residual[spaces.find(space)] = True
            out_space[name] = space
            continue
        if node.kind == "cat" or module is None or len(ins) != 1:  # also: modules run on several inputs
            for s in ins:
                spaces.freeze(s)
            out_space[name] = spaces.new(frozen=True)
            continue
        (space,) = ins
        if isinstance(module, nn.Conv2d):
            if is_depthwise(module):
                roles.append((space, "carrier", name))
                out_space[name] = space
            elif module.groups == 1:
                roles.append((space, "consumer", name))
                new = spaces.new()
                roles.append((new, "producer", name))
                out_space[name] = new
            else:
                spaces.freeze(space)
                out_space[name] = spaces.new(frozen=True)
        elif isinstance(module, nn.BatchNorm2d):
            roles.append((space, "carrier", name))
            out_space[name] = space
        elif isinstance(module, _CHANNELWISE) or _is_quant_stub(module):
            if isinstance(module, nn.PReLU) and module.num_parameters > 1:
                spaces.freeze(space)
            out_space[name] = space
        else:
            spaces.freeze(space)
            out_space[name] = spaces.new(frozen=True)
    for name, node in nodes.items():
        if name != INPUT and not node.consumers:
            spaces.freeze(out_space[name])  # a network output (or read by code we cannot see)
        if node.module is not None and len(node.inputs) > 1:
            # A module called on several tensors (torchvision's Bottleneck shares one ReLU): in the
            # loop above its later inputs may not have had a space yet; freeze them all now.
            for src in node.inputs:
                if src in out_space:
                    spaces.freeze(out_space[src])
    groups: dict[int, ChannelGroup] = {}
    for space, role, name in roles:
        root = spaces.find(space)
        if spaces.frozen[root]:
            continue
        group = groups.setdefault(root, ChannelGroup(name="", channels=0, residual=spaces.residual[root]))
        getattr(group, f"{role}s").append(name)
    result = []
    for group in groups.values():
        if not group.producers:
            continue
        widths = {model.get_submodule(p).out_channels for p in group.producers}
        if len(widths) != 1:
            continue  # inconsistent; cannot happen in a network that ran
        group.name, group.channels = group.producers[0], widths.pop()
        result.append(group)
    return result


def _dependency_order(nodes: Mapping[str, Node]) -> list[str]:
    """Node names with every node after all of its inputs (a module run several times is recorded at
    its first call, possibly before producers of its later inputs)."""
    done, order = {INPUT}, []
    pending = [n for n in nodes if n != INPUT]
    while pending:
        ready = [n for n in pending if all(src in done for src in nodes[n].inputs)]
        if not ready:  # a cycle cannot come from one forward pass; be safe anyway
            ready = pending[:1]
        for n in ready:
            done.add(n)
            order.append(n)
        pending = [n for n in pending if n not in done]
    return order


def channel_importance(model: nn.Module, group: ChannelGroup, criterion: str = "l1") -> torch.Tensor:
    """Per-channel importance of ``group``: summed, mean-normalised L1/L2 norms of its conv weights."""
    if criterion not in ("l1", "l2"):
        raise QCompressError(f"unknown pruning criterion {criterion!r}", "use --criterion l1 or l2")
    p = 1 if criterion == "l1" else 2
    total = torch.zeros(group.channels)
    with torch.no_grad():
        slices = [(n, 0) for n in group.producers + group.carriers] + [(n, 1) for n in group.consumers]
        for name, dim in slices:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Conv2d):
                continue
            w = module.weight.detach().float().transpose(0, dim)
            norms = w.reshape(w.shape[0], -1).norm(p=p, dim=1)
            mean = norms.mean()
            total += norms / mean if mean > 0 else norms
    return total


def channels_to_keep(channels: int, amount: float, round_to: int | None = None) -> int:
    """How many of ``channels`` survive removing ``amount`` of them: rounded, >= 1, optionally a multiple."""
    if not 0.0 <= amount < 1.0:
        raise QCompressError(f"pruning amount must be in [0, 1), got {amount}", "e.g. --amount 0.2 removes 20%")
    keep = channels - round(channels * amount)
    if round_to and round_to > 1 and keep != channels:
        keep = max(round_to, round(keep / round_to) * round_to)
    return int(min(channels, max(1, keep)))


def amount_for(group: ChannelGroup, default: float, amounts: Mapping[str, float] | None) -> float:
    """The group's amount: an exact group or member name in ``amounts``, else a glob pattern, else ``default``."""
    if not amounts:
        return default
    for key in [group.name, *group.members]:
        if key in amounts:
            return float(amounts[key])
    for pattern, value in amounts.items():
        if any(fnmatch.fnmatchcase(n, pattern) for n in [group.name, *group.members]):
            return float(value)
    return default


def plan_pruning(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    amount: float,
    criterion: str = "l1",
    amounts: Mapping[str, float] | None = None,
    round_to: int | None = None,
    include_residual: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Channel indices to *remove* per group name (lowest importance first), and the groups skipped."""
    plan: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for group in groups:
        if group.residual and not include_residual:
            skipped[group.name] = "residual-coupled (block outputs across adds)"
            continue
        group_amount = amount_for(group, amount, amounts)
        keep = channels_to_keep(group.channels, group_amount, round_to)
        if keep == group.channels:
            continue
        importance = channel_importance(model, group, criterion)
        # Stable sort: ties (e.g. all-zero channels) go by index, so the plan is deterministic.
        order = torch.sort(importance, stable=True).indices
        plan[group.name] = torch.sort(order[: group.channels - keep]).values
    return plan, skipped


def _slice_param(param: torch.Tensor | None, keep: torch.Tensor, dim: int) -> nn.Parameter | None:
    if param is None:
        return None
    return nn.Parameter(param.detach().index_select(dim, keep).clone(), requires_grad=param.requires_grad)


def _cut_conv_out(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    conv.weight = _slice_param(conv.weight, keep, 0)
    if conv.bias is not None:
        conv.bias = _slice_param(conv.bias, keep, 0)
    conv.out_channels = keep.numel()


def _cut_conv_in(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    conv.weight = _slice_param(conv.weight, keep, 1)
    conv.in_channels = keep.numel()


def _cut_depthwise(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    _cut_conv_out(conv, keep)
    conv.in_channels = conv.groups = keep.numel()


def _cut_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    if bn.affine:
        bn.weight = _slice_param(bn.weight, keep, 0)
        bn.bias = _slice_param(bn.bias, keep, 0)
    if bn.track_running_stats:
        bn.running_mean = bn.running_mean.index_select(0, keep).clone()
        bn.running_var = bn.running_var.index_select(0, keep).clone()
    bn.num_features = keep.numel()


def apply_pruning(model: nn.Module, groups: Sequence[ChannelGroup], plan: Mapping[str, torch.Tensor]) -> PruneRecord:
    """Remove the planned channel indices from every member of each group, in place."""
    record = PruneRecord()
    by_name = {g.name: g for g in groups}
    for name, remove in plan.items():
        group = by_name[name]
        remove = torch.as_tensor(remove, dtype=torch.long)
        mask = torch.ones(group.channels, dtype=torch.bool)
        mask[remove] = False
        keep = mask.nonzero().flatten()
        if keep.numel() == 0:
            raise QCompressError(f"pruning would remove every channel of {name}", "use a smaller amount")
        for member in group.producers:
            _cut_conv_out(model.get_submodule(member), keep)
        for member in group.carriers:
            module = model.get_submodule(member)
            if isinstance(module, nn.BatchNorm2d):
                _cut_bn(module, keep)
            else:
                _cut_depthwise(module, keep)
        for member in group.consumers:
            _cut_conv_in(model.get_submodule(member), keep)
        record.groups[name] = {
            "before": group.channels,
            "after": int(keep.numel()),
            "removed": [int(i) for i in remove.tolist()],
            "residual": group.residual,
            "members": group.members,
        }
    return record


def prune_channels(
    model: nn.Module,
    example: torch.Tensor,
    amount: float,
    criterion: str = "l1",
    amounts: Mapping[str, float] | None = None,
    round_to: int | None = None,
    include_residual: bool = False,
) -> PruneRecord:
    """Remove ``amount`` of the channels of every prunable group of ``model`` (in place), by weight norm.

    ``example`` is one input batch used to trace the graph and to check that the pruned network still
    produces outputs of the original shapes. Known torchvision blocks (ResNet bottlenecks, MobileNetV3
    blocks, FPN) are first given their ``FloatFunctional`` twins in place
    (:func:`qcompress.quant.parts.make_functional_ops_quantizable`: same parameters, keys and function).
    The record says which fraction of all conv output channels was asked for and removed; when far less
    could be removed (frozen or residual-coupled groups), ``record.shortfall`` says why and a warning is
    logged.
    """
    if not 0.0 <= amount < 1.0:
        raise QCompressError(f"--amount must be in [0, 1) for channel pruning, got {amount}", "e.g. --amount 0.2")
    from qcompress.quant.parts import make_functional_ops_quantizable

    # torchvision blocks add in place and share one ReLU module: their FloatFunctional twins (same
    # parameters and state_dict keys, same function) make every channel dependency visible.
    make_functional_ops_quantizable(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = _shapes(model(example))
    widths_before = _conv_widths(model)
    groups = find_channel_groups(model, example)
    plan, skipped = plan_pruning(model, groups, amount, criterion, amounts, round_to, include_residual)
    record = apply_pruning(model, groups, plan)
    record.skipped = skipped
    _check_reached(record, widths_before, _conv_widths(model), amount, amounts, groups)
    try:
        with torch.no_grad():
            after = _shapes(model(example))
    except RuntimeError as exc:
        raise QCompressError(
            f"channel pruning broke the network ({str(exc).splitlines()[0][:160]})",
            "this architecture reads a pruned tensor outside its modules; use --method l1-unstructured",
        ) from None
    if after != reference:
        raise QCompressError("channel pruning changed the network's output shapes", "use --method l1-unstructured")
    model.train(was_training)
    return record


SHORTFALL = 0.5  # warn when less than this fraction of the requested channels could be removed


def _conv_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _check_reached(
    record: PruneRecord,
    before: Mapping[str, int],
    after: Mapping[str, int],
    amount: float,
    amounts: Mapping[str, float] | None,
    groups: Sequence[ChannelGroup],
) -> None:
    """Fill ``requested`` / ``achieved`` and warn when the network could not give what was asked."""
    total = sum(before.values())
    if not total:
        return
    requested = 0.0
    for name, width in before.items():
        requested += width * amount_for(ChannelGroup(name, width, producers=[name]), amount, amounts)
    record.requested = requested / total
    record.achieved = 1.0 - sum(after.values()) / total
    if record.requested > 0 and record.achieved < SHORTFALL * record.requested:
        def share(selected: Sequence[ChannelGroup]) -> float:
            return sum(before.get(m, 0) for g in selected for m in g.producers + g.carriers) / total

        cut = share([g for g in groups if g.name in record.groups])
        residual = share([g for g in groups if g.name in record.skipped])
        record.shortfall = (
            f"asked for {record.requested:.1%} of the conv output channels, removed {record.achieved:.1%}: the "
            f"pruned groups hold {cut:.0%} of them, residual-coupled groups {residual:.0%} (skipped unless "
            f"include_residual), the other {max(0.0, 1 - cut - residual):.0%} feed network outputs, "
            f"concatenations or code outside modules"
        )
        log.warning("channel pruning fell short: %s", record.shortfall)


def _shapes(outputs) -> list[tuple[int, ...]]:
    if isinstance(outputs, torch.Tensor):
        return [tuple(outputs.shape)]
    if isinstance(outputs, Mapping):
        return [s for k in sorted(outputs) for s in _shapes(outputs[k])]
    if isinstance(outputs, (list, tuple)):
        return [s for o in outputs for s in _shapes(o)]
    return []


__all__ = [
    "ChannelGroup",
    "PruneRecord",
    "amount_for",
    "apply_pruning",
    "channel_importance",
    "channels_to_keep",
    "find_channel_groups",
    "is_depthwise",
    "plan_pruning",
    "prune_channels",
]
