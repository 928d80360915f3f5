"""The quantize recipe as one function: float detector + calibration images -> int8 detector.

Steps, each optional and recorded: ReLU6 -> ReLU (only where equalization needs it), BN folding +
fusion, cross-layer equalization, high-bias absorption, bias correction, observers, calibration
(images, or BN-statistics sampling with ``data_free``), convert. ``adaround`` learns the rounding
of every quantized layer's weights after bias correction, before the observers; ``weight_bits=4``
restricts weights to 16 levels inside the int8 kernels (W4A8).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qcompress.errors import QCompressError
from qcompress.models.detector import Detector
from qcompress.quant.adaround import AdaRoundOptions, adaround, fix_weight_qparams, layer_of, summarize
from qcompress.quant.bias_correction import (
    conv_input_means,
    correct_bias,
    empirical_input_means,
    expected_inputs,
)
from qcompress.quant.equalize import absorb_high_bias, equalize, find_equalization_groups, relu6_to_relu
from qcompress.quant.fuse import conv_of, fuse
from qcompress.quant.graph import trace_graph
from qcompress.quant.parts import float_parts, prepare_int8_parts
from qcompress.quant.ptq import calibrate, convert_static, keep_float, prepare_static
from qcompress.quant.qconfig import QuantScheme, weight_observer

BIAS_CORRECTION_MODES = ("analytic", "empirical")


@dataclass(frozen=True)
class QuantizeOptions:
    backend: str = "x86"
    observer: str = "histogram"
    per_channel: bool = True
    skip: Sequence[str] = ()
    equalize: bool = False
    absorb_bias: bool = False
    bias_correction: str | None = None
    data_free: bool = False
    data_free_batches: int = 8
    weight_bits: int = 8  # 4: W4A8 (16 weight levels held in int8 kernels)
    adaround: bool = False
    adaround_iters: int = 500
    adaround_lr: float = 1e-2  # the paper's 1e-3 is for 10k iterations; V must travel ~5 in adaround_iters
    seed: int = 0

    def scheme(self) -> QuantScheme:
        return QuantScheme(self.backend, self.observer, self.per_channel, self.weight_bits)

    def validate(self, have_data: bool) -> None:
        self.scheme().validate()
        if self.bias_correction not in (None, *BIAS_CORRECTION_MODES):
            raise QCompressError(f"unknown bias correction {self.bias_correction!r}", "use analytic or empirical")
        if self.data_free and self.bias_correction == "empirical":
            raise QCompressError("--data-free uses no images, so bias correction cannot be empirical", "use --bias-correction analytic")
        if self.adaround and self.data_free:
            raise QCompressError("AdaRound learns from calibration images; --data-free has none", "drop --data-free")
        if self.adaround and self.adaround_iters <= 0:
            raise QCompressError(f"--adaround-iters must be positive, got {self.adaround_iters}", "e.g. 500")
        if not self.data_free and not have_data:
            raise QCompressError("no calibration images", "pass --calib-images N > 0 or use --data-free")


@dataclass
class PipelineRecord:
    recipe: dict[str, Any]
    float_fused: nn.Module  # the *transformed* float model right before observers
    steps: list[dict[str, Any]] = field(default_factory=list)
    # The ORIGINAL float function with the int8 model's module names (see float_reference): compare
    # against this one, so that per-layer SQNR includes what ReLU6 -> ReLU, absorption and bias
    # correction cost.
    float_reference: nn.Module | None = None
    # layer -> (scale, shift) per output channel: equalization divided the layer's output by `scale`
    # and absorption moved it by -shift, so the original output is (output + shift) * scale. Pass it as
    # layer_sqnr(..., align=...) to compare those layers with float_reference.
    channel_maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def float_reference(detector: Detector, options: QuantizeOptions = QuantizeOptions()) -> nn.Module:
    """``detector``'s float model with only the function-preserving structure of :func:`quantize_detector`
    (FloatFunctional twins and int8-part wrappers, BN folded into fused conv modules, float islands
    for ``options.skip``), so every quantized layer of the int8 model has a same-named float twin that
    computes the original function (BN folding aside, equal up to rounding). No ReLU6 -> ReLU, no
    equalization, absorption or bias correction: use it as the reference of
    :func:`qcompress.quant.sqnr.layer_sqnr`."""
    model = copy.deepcopy(detector.model).eval()
    prepare_int8_parts(model, detector.spec.arch)
    fused, _ = fuse(model, inplace=True)
    keep_float(fused, options.skip)
    return fused.eval()


def bn_statistics(model: nn.Module, nodes) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """conv name -> (beta, |gamma|) of the BN right after it: its pre-activation output distribution."""
    stats = {}
    for name, node in nodes.items():
        if node.kind == "conv" and len(node.consumers) == 1 and nodes[node.consumers[0]].kind == "bn":
            bn = nodes[node.consumers[0]].module
            stats[name] = (bn.bias.detach().clone(), bn.weight.detach().abs().clone())
    return stats


@torch.no_grad()
def calibrate_from_bn_statistics(
    prepared: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]], input_shape, batches: int, seed: int = 0
) -> None:
    """Data-free ranges: every BN-followed conv emits samples of N(beta, gamma^2) per channel, so the
    observers downstream (activations, adds, heads) see the distributions BN statistics imply."""
    generator = torch.Generator().manual_seed(seed)
    hooks = []
    for name, (mean, std) in stats.items():
        conv = conv_of(prepared.get_submodule(name))

        def replace(mod, inp, out, mean=mean, std=std):
            noise = torch.randn(out.shape, generator=generator)
            return mean.view(1, -1, 1, 1) + std.view(1, -1, 1, 1) * noise

        hooks.append(conv.register_forward_hook(replace, prepend=True))
    try:
        n, c, h, w = input_shape
        # Images normalised as (x - 127) / 128 lie in [-0.99, 1]: cover that range at the input.
        images = [torch.rand((n, c, h, w), generator=generator) * 1.99 - 0.99 for _ in range(batches)]
        calibrate(prepared, images)
    finally:
        for h in hooks:
            h.remove()


def quantize_detector(
    detector: Detector,
    calib_batches: Sequence[torch.Tensor],
    options: QuantizeOptions,
    on_layer: Callable[[str, int, int], object] | None = None,
) -> tuple[Detector, PipelineRecord]:
    """int8 copy of ``detector`` following ``options``; ``detector`` itself is untouched.
    ``on_layer(name, k, n)``: AdaRound progress, called before each of the ``n`` layers."""
    options.validate(have_data=bool(calib_batches))
    scheme = options.scheme()
    model = copy.deepcopy(detector.model).eval()
    parts = prepare_int8_parts(model, detector.spec.arch)  # None: the whole network is quantizable
    h, w = detector.spec.input_size
    steps: list[dict[str, Any]] = []
    needs_graph = options.equalize or options.absorb_bias or options.bias_correction or options.data_free
    if options.equalize or options.absorb_bias:
        replaced = relu6_to_relu(model)
        if replaced:
            steps.append({"step": "relu6_to_relu", "changes_function": True, "layers": len(replaced),
                          "summary": f"{len(replaced)} ReLU6 -> ReLU so that equalization preserves the function"})
    nodes = trace_graph(model, torch.zeros(1, 3, h, w)) if needs_graph else {}
    stats = bn_statistics(model, nodes) if needs_graph else {}
    fused, fusion = fuse(model, inplace=True)
    groups = find_equalization_groups(nodes) if (options.equalize or options.absorb_bias) else []
    if options.equalize:
        eq = equalize(fused, groups, stats=stats)
        before = sum(eq.spread_before.values()) / max(1, len(eq.spread_before))
        after = sum(eq.spread_after.values()) / max(1, len(eq.spread_after))
        steps.append({"step": "equalize", "changes_function": False, "pairs": len(groups), "iterations": eq.iterations,
                      "mean_range_spread_before": before, "mean_range_spread_after": after,
                      "spread_before": eq.spread_before, "spread_after": eq.spread_after,
                      "summary": f"{len(groups)} layer groups, {eq.iterations} iterations, mean per-channel range "
                                 f"spread {before:.1f} -> {after:.1f}"})
    channel_maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if options.equalize:
        channel_maps.update((name, (scale.clone(), torch.zeros_like(scale))) for name, scale in eq.scales.items())
    if options.absorb_bias:
        ab = absorb_high_bias(fused, groups, stats)
        for name, shift in ab.shifts.items():
            channel_maps[name] = (channel_maps[name][0] if name in channel_maps else torch.ones_like(shift), shift)
        steps.append({"step": "absorb_bias", "layers": len(ab.absorbed), "changes_function": ab.changes_function,
                      "absorbed": ab.absorbed, "skipped": ab.skipped,
                      "summary": f"high bias moved forward in {len(ab.absorbed)} layers (exact where the "
                                 f"pre-activation >= beta - 3 gamma), {len(ab.skipped)} left in place"})
    before_bias_correction = copy.deepcopy(fused) if options.adaround and options.bias_correction else None
    if options.bias_correction:
        if options.bias_correction == "analytic":
            means = conv_input_means(nodes, expected_inputs(nodes, stats))
        else:
            conv_names = [n for n, node in nodes.items() if node.kind == "conv"]
            means = empirical_input_means(fused, conv_names, calib_batches)
        bc = correct_bias(fused, means, weight_observer(scheme), options.bias_correction)
        steps.append({"step": f"bias_correction_{options.bias_correction}", "changes_function": True,
                      "layers": len(bc.corrected),
                      "skipped": bc.skipped,
                      "summary": f"{len(bc.corrected)} layers corrected, {len(bc.skipped)} without input statistics"})
    float_fused = fused
    rounding = None
    if options.adaround:
        float_fused = copy.deepcopy(fused)
        probe, _, _ = prepare_static(fused, scheme, options.skip, fused=True, scopes=parts)
        layers = quantized_weight_layers(probe)
        del probe
        ar_options = AdaRoundOptions(iters=options.adaround_iters, lr=options.adaround_lr, seed=options.seed)
        rounding = adaround(fused, list(calib_batches), weight_observer(scheme), layers=layers,
                            reference=before_bias_correction, options=ar_options, on_layer=on_layer)
        summary = summarize(rounding)
        steps.append({"step": "adaround", "changes_function": True, "layers": summary["layers"],
                      "iters": options.adaround_iters, "lr": options.adaround_lr, "weight_bits": options.weight_bits,
                      **summary, "per_layer": rounding.layers,
                      "summary": f"learned rounding of {summary['layers']} layers ({options.weight_bits}-bit weights, "
                                 f"{options.adaround_iters} iterations each): layer output error "
                                 f"{summary.get('loss_ratio', float('nan')):.3f} x nearest rounding's, "
                                 f"{100 * summary.get('mean_flipped', 0.0):.1f} % of weights rounded the other way"})
    prepared, _, kept = prepare_static(fused, scheme, options.skip, fused=True, scopes=parts)
    if rounding is not None:
        fix_weight_qparams(prepared, rounding)
    if options.data_free:
        calibrate_from_bn_statistics(prepared, stats, (8, 3, h, w), options.data_free_batches)
        steps.append({"step": "data_free_ranges", "summary": "activation ranges from BN statistics (no images)"})
    else:
        calibrate(prepared, calib_batches)
    quantized = convert_static(prepared, scheme)
    recipe = {
        "scheme": "int8-eager-static",
        "backend": options.backend,
        "observer": options.observer,
        "per_channel": options.per_channel,
        "equalize": options.equalize,
        "absorb_bias": options.absorb_bias,
        "bias_correction": options.bias_correction,
        "data_free": options.data_free,
        "weight_bits": options.weight_bits,
        "adaround": {"iters": options.adaround_iters, "lr": options.adaround_lr, "seed": options.seed,
                     "input": "quantized preceding layers", "loss": "pre-activation output"} if options.adaround else None,
        "relu6": "relu" if (options.equalize or options.absorb_bias) else "fused-clamp",
        "kept_float": kept,
        "int8_parts": parts,
        "float_parts": float_parts(model, parts),
        "fusion_groups": len(fusion.groups),
    }
    reference = float_reference(detector, options)
    return detector.with_model(quantized), PipelineRecord(recipe, float_fused, steps, reference, channel_maps)


def quantized_weight_layers(prepared: nn.Module) -> list[str]:
    """Names of the conv/linear (possibly fused) modules of a prepared model that will be quantized."""
    names = []
    for name, module in prepared.named_modules():
        parent = name.rpartition(".")[0]
        inside_fused = bool(name) and "." in name and layer_of(prepared.get_submodule(parent)) is not None
        if layer_of(module) is not None and not inside_fused and getattr(module, "qconfig", None) is not None:
            names.append(name)
    return names
