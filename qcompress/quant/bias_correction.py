"""Bias correction (Nagel et al. 2019, sec. 4.2) and data-free activation statistics.

Quantizing a layer's weights ``W -> W~`` shifts its expected output by ``eps E[x]`` with
``eps = W~ - W``. Subtracting that from the bias removes the systematic part of the error. ``E[x]``
per input channel comes either from data (empirical: mean of the layer's float input over the
calibration images) or, with no data at all, from the batch-norm statistics of the layer that
produced the input (analytic: the mean of a clipped normal, eq. 19-20), propagated through adds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from qcompress.quant.fuse import conv_of
from qcompress.quant.graph import INPUT, Node


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, low: float = 0.0, high: float = math.inf) -> torch.Tensor:
    """E[clip(x, low, high)] for x ~ N(mean, std^2), elementwise (paper eq. 19-20, two-sided)."""
    std = std.clamp(min=1e-12)
    a = (low - mean) / std
    result = low * _Phi(a) + mean * (1 - _Phi(a)) + std * _phi(a)
    if math.isfinite(high):
        b = (high - mean) / std
        # subtract the part above `high` and add it back clipped at `high`
        upper = mean * (1 - _Phi(b)) + std * _phi(b)
        result = result - upper + high * (1 - _Phi(b))
    return result


def clipped_normal_variance(mean: torch.Tensor, std: torch.Tensor, low: float = 0.0, high: float = math.inf) -> torch.Tensor:
    """Var[clip(x, low, high)] for x ~ N(mean, std^2), elementwise."""
    std = std.clamp(min=1e-12)
    a = (low - mean) / std
    if math.isfinite(high):
        b = (high - mean) / std
        inside, phi_b, b_phi_b, above = _Phi(b) - _Phi(a), _phi(b), b * _phi(b), high**2 * (1 - _Phi(b))
    else:
        inside, phi_b, b_phi_b, above = 1 - _Phi(a), 0.0, 0.0, 0.0
    # E[x^2 ; low < x < high] with x = mean + std z, integrated over z in (a, b)
    middle = mean**2 * inside + 2 * mean * std * (_phi(a) - phi_b) + std**2 * (inside + a * _phi(a) - b_phi_b)
    second = low**2 * _Phi(a) + middle + above
    return (second - clipped_normal_mean(mean, std, low, high) ** 2).clamp(min=0)


def expected_inputs(
    nodes: dict[str, Node], stats: dict[str, tuple[torch.Tensor, torch.Tensor]], input_mean: float = 0.0
) -> dict[str, torch.Tensor]:
    """E[output] per channel of every node, propagated in execution order from BN statistics.

    ``stats[conv] = (mean, std)`` of that conv's pre-activation output (its BN's beta, |gamma|).
    Variances travel along: an add sums means and variances (branches taken as independent), and a
    ReLU that does not directly follow a BN (``relu(a + b)``: torchvision's in-place residual, or
    ``FloatFunctional.add_relu``) sees its input as normal with that mean and variance.
    Nodes we cannot reason about (a conv without BN statistics, or anything unknown) get no entry,
    and anything downstream of them none either.
    """
    means: dict[str, torch.Tensor | float] = {INPUT: input_mean}
    variances: dict[str, torch.Tensor] = {}
    pending_act: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def rectify(name: str, mean: torch.Tensor, std: torch.Tensor, high: float) -> None:
        means[name] = clipped_normal_mean(mean, std, 0.0, high)
        variances[name] = clipped_normal_variance(mean, std, 0.0, high)

    for name, node in nodes.items():
        if name == INPUT:
            continue
        srcs = node.inputs
        if node.kind == "conv":
            if name in stats:
                pending_act[name] = stats[name]
                means[name], variances[name] = stats[name][0], stats[name][1] ** 2
        elif node.kind == "bn":
            if srcs and srcs[0] in pending_act:
                pending_act[name] = pending_act[srcs[0]]
                means[name], variances[name] = pending_act[name][0], pending_act[name][1] ** 2
        elif node.kind in ("relu", "relu6"):
            high = 6.0 if node.kind == "relu6" else math.inf
            if len(srcs) == 1 and srcs[0] in pending_act:
                rectify(name, *pending_act[srcs[0]], high)
            elif len(srcs) == 1 and srcs[0] in variances:
                rectify(name, means[srcs[0]], variances[srcs[0]].sqrt(), high)
        elif node.kind in ("add", "add_relu"):
            if len(srcs) != 2 or not all(s in means for s in srcs):
                continue
            mean = means[srcs[0]] + means[srcs[1]]
            if node.kind == "add":
                means[name] = mean
                if all(s in variances for s in srcs):
                    variances[name] = variances[srcs[0]] + variances[srcs[1]]
            elif all(s in variances for s in srcs):
                rectify(name, mean, (variances[srcs[0]] + variances[srcs[1]]).sqrt(), math.inf)
        elif node.kind in ("other",) and len(srcs) == 1 and srcs[0] in means and type(node.module).__name__ in (
            "QuantStub", "Identity", "Dropout"
        ):
            means[name] = means[srcs[0]]
            if srcs[0] in variances:
                variances[name] = variances[srcs[0]]
    return {k: v for k, v in means.items() if isinstance(v, torch.Tensor)}


@torch.inference_mode()
def empirical_input_means(model: nn.Module, conv_names: list[str], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over images and positions of each named conv's float input, per channel."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(conv_names, 0)
    hooks = []
    for name in conv_names:
        conv = conv_of(model.get_submodule(name))

        def hook(mod, inp, name=name):
            x = inp[0].dequantize() if inp[0].is_quantized else inp[0]
            sums[name] = sums.get(name, 0) + x.sum(dim=(0, 2, 3))
            counts[name] += x.shape[0] * x.shape[2] * x.shape[3]

        hooks.append(conv.register_forward_pre_hook(hook))
    try:
        model.eval()
        for batch in batches:
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(name, conv) for every conv, named by its fused module where it was fused."""
    layers, inside_fused = [], set()
    for name, module in model.named_modules():
        if name in inside_fused:
            continue
        conv = conv_of(module)
        if conv is not None:
            layers.append((name, conv))
            if conv is not module:
                inside_fused.update(f"{name}.{child}" for child, _ in module.named_children())
    return layers


def conv_input_means(nodes: dict[str, Node], means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """E[input] of each conv = E[output] of the node that feeds it."""
    return {
        name: means[node.inputs[0]]
        for name, node in nodes.items()
        if node.kind == "conv" and len(node.inputs) == 1 and node.inputs[0] in means
    }


def quantization_error(weight: torch.Tensor, weight_observer) -> torch.Tensor:
    """``Q(W) - W`` with the same observer (granularity, range) that convert will use."""
    observer = weight_observer()
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    if observer.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine):
        q = torch.fake_quantize_per_channel_affine(
            weight, scale.float(), zero_point.int(), observer.ch_axis, observer.quant_min, observer.quant_max
        )
    else:
        q = torch.fake_quantize_per_tensor_affine(
            weight, float(scale), int(zero_point), observer.quant_min, observer.quant_max
        )
    return q - weight


def expected_output_shift(conv: nn.Conv2d, error: torch.Tensor, input_mean: torch.Tensor) -> torch.Tensor:
    """``eps E[x]`` per output channel, treating E[x] as constant over positions (borders ignored)."""
    summed = error.flatten(2).sum(dim=2)  # (out, in/groups)
    if conv.groups == 1:
        return summed @ input_mean
    per_group = conv.in_channels // conv.groups
    x = input_mean.view(conv.groups, per_group)
    out_per_group = conv.out_channels // conv.groups
    return (summed.view(conv.groups, out_per_group, per_group) * x[:, None, :]).sum(dim=2).flatten()


@dataclass
class BiasCorrectionRecord:
    mode: str
    corrected: dict[str, float] = field(default_factory=dict)  # layer -> max |shift| removed
    skipped: list[str] = field(default_factory=list)


@torch.no_grad()
def correct_bias(
    fused_model: nn.Module,
    input_means: dict[str, torch.Tensor],
    weight_observer,
    mode: str,
) -> BiasCorrectionRecord:
    """Subtract the expected weight-quantization shift from every conv whose input mean is known."""
    record = BiasCorrectionRecord(mode)
    for name, conv in conv_layers(fused_model):
        if name not in input_means:
            record.skipped.append(name)
            continue
        shift = expected_output_shift(conv, quantization_error(conv.weight.detach(), weight_observer), input_means[name])
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        conv.bias.sub_(shift)
        record.corrected[name] = float(shift.abs().max())
    return record
