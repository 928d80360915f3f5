"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Rounding every weight to the nearest grid point minimises each weight's own error, not the layer's
output error. AdaRound learns, per weight, whether to round down or up: ``W~ = s * clip(floor(W/s) +
h(V), qmin, qmax)`` with the rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
(eq. 23), minimising ``||W x - W~ x~||^2 + lambda sum(1 - |2 h(V) - 1|^beta)`` (eq. 21/25) where the
regulariser, with ``beta`` annealed from 20 to 2, drives every ``h(V)`` to exactly 0 or 1.

Layers are rounded one after the other in execution order. ``x`` is the layer's input in the float
reference model, ``x~`` its input in the model being rounded, whose preceding layers already carry
their learned rounding (the paper's asymmetric reconstruction, sec. 5): later layers compensate the
error of earlier ones. Activations are not fake-quantized while learning (their ranges are observed
after rounding, on the rounded model). The loss is on the pre-activation output (the conv/linear
itself, before any fused ReLU).

The result is exact in the int8 model: every rounded layer's float weight is set to ``s * q`` and
:func:`fix_weight_qparams` gives its converted module a weight observer that returns ``s``, so eager
``convert`` stores exactly the integers ``q`` (``AdaRoundRecord.codes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import QConfig
from torch.ao.quantization.observer import ObserverBase

from qcompress.quant.fuse import conv_of

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundOptions:
    iters: int = 500
    batch_size: int = 8  # images per optimisation step
    lr: float = 1e-3
    reg_weight: float = 0.01  # lambda
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2  # fraction of iterations without the regulariser
    seed: int = 0


@dataclass
class AdaRoundRecord:
    # layer -> {"loss_nearest", "loss_adaround" (what is kept), "loss_learned", "fallback_to_nearest" (1.0 when
    #           the learned rounding was worse than nearest on the calibration data, so nearest is kept),
    #           "flipped" (fraction rounded differently from nearest),
    #           "undecided" (fraction of h(V) not within 0.01 of 0 or 1 before the final threshold)}
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> chosen integers (int8)
    # layer -> (scale, qscheme, quant_min, quant_max): what the converted module must use
    qparams: dict[str, tuple[torch.Tensor, torch.qscheme, int, int]] = field(default_factory=dict)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _initial_v(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = rest (the fractional part), so learning starts from nearest-ish rounding."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _beta(step: int, iters: int, options: AdaRoundOptions) -> float | None:
    warm = int(options.warm_start * iters)
    if step < warm:
        return None
    progress = (step - warm) / max(1, iters - warm)
    return options.beta_end + (options.beta_start - options.beta_end) * max(0.0, 1.0 - progress)


def layer_of(module: nn.Module) -> nn.Conv2d | nn.Linear | None:
    """The conv or linear computing a (possibly fused) module's weights, else None."""
    conv = conv_of(module)
    if conv is not None:
        return conv
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, nn.Sequential) and len(module) and type(module).__name__ == "LinearReLU":
        return module[0]
    return None


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


def weight_grid(weight: torch.Tensor, observer_factory) -> tuple[torch.Tensor, torch.qscheme, int, int]:
    """(scale shaped to broadcast over ``weight``, qscheme, qmin, qmax) from the observer convert would use."""
    observer = observer_factory()
    observer(weight.detach())
    scale, zero_point = observer.calculate_qparams()
    if int(zero_point.abs().max()) != 0:
        raise ValueError("AdaRound expects symmetric weight quantization (zero point 0)")
    return scale.float(), observer.qscheme, int(observer.quant_min), int(observer.quant_max)


def _broadcast(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scale.view(-1, *([1] * (weight.ndim - 1))) if scale.numel() > 1 else scale.view(*([1] * weight.ndim))


class _Captured(Exception):
    """Raised by the capture hook once a layer has seen all its calls of a forward: the rest of the
    network need not run (halves the cost of collecting inputs on average)."""


@torch.no_grad()
def _capture_inputs(
    model: nn.Module, layer: nn.Module, batches: Sequence[torch.Tensor], calls_per_forward: int = 0
) -> list[torch.Tensor]:
    chunks: list[torch.Tensor] = []

    def hook(mod, inp):
        chunks.append(inp[0].detach().clone())
        if calls_per_forward and len(chunks) % calls_per_forward == 0:
            raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            try:
                model(batch)
            except _Captured:
                pass
    finally:
        handle.remove()
    return chunks


def _reconstruction(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # squared error summed over output channels, averaged over images and positions (channel dim 1)
    return (pred - target).pow(2).sum(1).mean()


def round_layer(
    layer: nn.Module,
    reference_layer: nn.Module,
    inputs: list[torch.Tensor],
    reference_inputs: list[torch.Tensor],
    grid: tuple[torch.Tensor, torch.qscheme, int, int],
    options: AdaRoundOptions,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Learn the rounding of one layer; returns (integer codes, stats). ``layer`` is not modified."""
    scale, _, qmin, qmax = grid
    weight = reference_layer.weight.detach()
    ref_bias = None if reference_layer.bias is None else reference_layer.bias.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    s = _broadcast(scale, weight)
    floor = torch.floor(weight / s)
    nearest = torch.clamp(torch.round(weight / s), qmin, qmax)
    v = nn.Parameter(_initial_v(weight / s - floor))
    optimizer = torch.optim.Adam([v], lr=options.lr)

    def soft_weight() -> torch.Tensor:
        return s * torch.clamp(floor + rectified_sigmoid(v), qmin, qmax)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        i = int(torch.randint(len(inputs), (1,), generator=generator))
        x, x_ref = inputs[i], reference_inputs[i]
        if x.shape[0] > options.batch_size:
            pick = torch.randperm(x.shape[0], generator=generator)[: options.batch_size]
            x, x_ref = x[pick], x_ref[pick]
        return x, x_ref

    @torch.no_grad()
    def full_loss(codes: torch.Tensor) -> float:
        total = count = 0.0
        for x, x_ref in zip(inputs, reference_inputs):
            target = _apply(reference_layer, x_ref, weight, ref_bias)
            total += _reconstruction(_apply(layer, x, s * codes, bias), target).item() * x.shape[0]
            count += x.shape[0]
        return total / max(count, 1)

    for step in range(options.iters):
        x, x_ref = sample()
        with torch.no_grad():
            target = _apply(reference_layer, x_ref, weight, ref_bias)
        loss = _reconstruction(_apply(layer, x, soft_weight(), bias), target)
        beta = _beta(step, options.iters, options)
        if beta is not None:
            h = rectified_sigmoid(v)
            loss = loss + options.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        h = rectified_sigmoid(v)
        codes = torch.clamp(floor + (h >= 0.5).float(), qmin, qmax)
        loss_nearest, loss_learned = full_loss(nearest), full_loss(codes)
        # Never worse than nearest on the calibration data (a too-short schedule can end worse).
        fallback = loss_learned > loss_nearest
        stats = {
            "loss_nearest": loss_nearest,
            "loss_adaround": min(loss_learned, loss_nearest),
            "loss_learned": loss_learned,
            "fallback_to_nearest": float(fallback),
            "flipped": 0.0 if fallback else float((codes != nearest).float().mean()),
            "undecided": float(((h > 0.01) & (h < 0.99)).float().mean()),
        }
    return (nearest if fallback else codes), stats


def adaround(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    observer_factory,
    layers: Sequence[str] | None = None,
    reference: nn.Module | None = None,
    options: AdaRoundOptions = AdaRoundOptions(),
    on_layer: Callable[[str, int, int], Any] | None = None,
) -> AdaRoundRecord:
    """Learn the rounding of every conv/linear of ``model`` (in place): each weight becomes ``s * q``
    with integers ``q`` on the grid of ``observer_factory`` (e.g. ``weight_observer(scheme)``).

    ``layers``: module names to round (fused modules allowed), in execution order; None: every
    conv/linear. ``reference``: the float model with the same module names whose outputs are the
    targets (default: ``model`` as it is on entry); pass the model before bias correction to let
    AdaRound see the corrected bias as part of the quantized layer. ``on_layer(name, k, n)`` is
    called before layer ``k`` (1-based) of ``n``. Deterministic given ``options.seed``.
    """
    import copy

    reference = copy.deepcopy(model) if reference is None else reference
    was_training = (model.training, reference.training)
    model.eval()
    reference.eval()
    if layers is None:
        layers = [name for name, m in model.named_modules() if layer_of(m) is not None and not _inside_fused(name, model)]
    order, calls = _execution_order(model, layers, batches[:1])
    generator = torch.Generator().manual_seed(options.seed)
    record = AdaRoundRecord()
    try:
        for k, name in enumerate(order, 1):
            if on_layer is not None:
                on_layer(name, k, len(order))
            layer = layer_of(model.get_submodule(name))
            ref_layer = layer_of(reference.get_submodule(name))
            inputs = _capture_inputs(model, layer, batches, calls.get(name, 0))
            ref_inputs = _capture_inputs(reference, ref_layer, batches, calls.get(name, 0))
            grid = weight_grid(ref_layer.weight, observer_factory)
            with torch.enable_grad():
                codes, stats = round_layer(layer, ref_layer, inputs, ref_inputs, grid, options, generator)
            with torch.no_grad():
                layer.weight.copy_(_broadcast(grid[0], codes) * codes)
            record.layers[name] = stats
            record.codes[name] = codes.to(torch.int8)
            record.qparams[name] = grid
            del inputs, ref_inputs
    finally:
        model.train(was_training[0])
        reference.train(was_training[1])
    return record


def _inside_fused(name: str, model: nn.Module) -> bool:
    parent, _, _ = name.rpartition(".")
    return bool(parent) and layer_of(model.get_submodule(parent)) is not None


@torch.no_grad()
def _execution_order(
    model: nn.Module, layers: Sequence[str], probe: Sequence[torch.Tensor]
) -> tuple[list[str], dict[str, int]]:
    """Layers in the order a forward runs them, and how many times one forward calls each."""
    seen: list[str] = []
    calls: dict[str, int] = {}
    hooks = []
    for name in layers:
        def hook(mod, inp, name=name):
            calls[name] = calls.get(name, 0) + 1
            if name not in seen:
                seen.append(name)

        hooks.append(layer_of(model.get_submodule(name)).register_forward_pre_hook(hook))
    try:
        for batch in probe:
            model(batch[:1])
    finally:
        for h in hooks:
            h.remove()
    # never-run layers: rounded last (on no data)
    return seen + [n for n in layers if n not in seen], {n: c // len(probe) for n, c in calls.items()}


class FixedWeightObserver(ObserverBase):
    """Weight 'observer' that returns given qparams, so that convert quantizes a weight already on its
    grid (``s * q``) to exactly ``q``."""

    def __init__(self, scale: torch.Tensor, qscheme=torch.per_channel_symmetric, quant_min: int = -128,
                 quant_max: int = 127, ch_axis: int = 0, dtype=torch.qint8) -> None:
        super().__init__(dtype=dtype)
        self.qscheme = qscheme
        self.quant_min, self.quant_max, self.ch_axis = quant_min, quant_max, ch_axis
        self.register_buffer("scale", scale.detach().flatten().clone().float())
        self.register_buffer("zero_point", torch.zeros_like(self.scale, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self):
        if self.qscheme in (torch.per_tensor_symmetric, torch.per_tensor_affine):
            return self.scale.view(()), self.zero_point.view(())
        return self.scale, self.zero_point


def fix_weight_qparams(prepared: nn.Module, record: AdaRoundRecord) -> list[str]:
    """Give every rounded layer of ``prepared`` (observers attached, same names) a weight observer
    returning the scale AdaRound used, so eager ``convert`` reproduces ``record.codes`` exactly."""
    fixed = []
    for name, (scale, qscheme, qmin, qmax) in record.qparams.items():
        try:
            module = prepared.get_submodule(name)
        except AttributeError:
            continue
        layer = layer_of(module)
        if layer is None or getattr(module, "qconfig", None) is None:
            continue
        weight = FixedWeightObserver.with_args(scale=scale, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
        for target in {id(module): module, id(layer): layer}.values():
            if getattr(target, "qconfig", None) is not None:
                target.qconfig = QConfig(activation=target.qconfig.activation, weight=weight)
        fixed.append(name)
    return fixed


def summarize(record: AdaRoundRecord) -> dict[str, float]:
    stats = list(record.layers.values())
    if not stats:
        return {"layers": 0}
    before = sum(s["loss_nearest"] for s in stats)
    after = sum(s["loss_adaround"] for s in stats)
    return {
        "layers": len(stats),
        "loss_nearest_sum": before,
        "loss_adaround_sum": after,
        "improved_layers": sum(s["loss_adaround"] < s["loss_nearest"] for s in stats),
        "fallback_layers": int(sum(s["fallback_to_nearest"] for s in stats)),
        "mean_flipped": sum(s["flipped"] for s in stats) / len(stats),
        "loss_ratio": after / before if before > 0 else math.nan,
    }


__all__ = [
    "AdaRoundOptions",
    "AdaRoundRecord",
    "FixedWeightObserver",
    "adaround",
    "fix_weight_qparams",
    "rectified_sigmoid",
    "round_layer",
    "summarize",
    "weight_grid",
]
