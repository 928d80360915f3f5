"""Where quantization hurts: per-layer SQNR of the int8 model against its float twin."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||ref||^2 / ||ref - test||^2)."""
    noise = (reference - test).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def _as_float(x):
    if isinstance(x, torch.Tensor):
        return x.dequantize() if x.is_quantized else x
    if isinstance(x, (tuple, list)):
        return [_as_float(v) for v in x]
    return x


@torch.inference_mode()
def layer_sqnr(
    float_model: nn.Module,
    quant_model: nn.Module,
    batches: Iterable[torch.Tensor],
    align: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """SQNR (dB) of each quantized layer's output vs the same-named layer of ``float_model`` (fused).

    ``align[name] = (scale, shift)`` per output channel maps that layer's output back to
    ``float_model``'s: ``(output + shift) * scale`` (a layer whose channels cross-layer equalization
    rescaled and bias absorption shifted, when ``float_model`` is the untransformed original: see
    :func:`qcompress.quant.pipeline.float_reference` and ``PipelineRecord.channel_maps``).
    Errors accumulate through the network, so this is the error *at* each layer, not caused *by* it.
    """
    float_modules = dict(float_model.named_modules())
    names = [n for n, m in quant_model.named_modules() if n in float_modules and hasattr(m, "scale") and not list(m.children())]
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    align = align or {}
    # A module may run several times per forward (a head shared by all feature levels): the i-th
    # quantized call is compared with the i-th float call.
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def save(name):
        # a copy: an in-place activation after the layer (torchvision's Hardswish(inplace=True)) would
        # otherwise overwrite the reference before it is compared
        return lambda mod, inp, out: captured.setdefault(name, []).append(_as_float(out).detach().float().clone())

    def compare(name):
        def hook(mod, inp, out):
            ref, q = captured[name].pop(0), _as_float(out).float()
            if name in align:
                scale, shift = (t.view(1, -1, *([1] * (q.ndim - 2))) for t in align[name])
                q = (q + shift) * scale
            signal[name] += ref.pow(2).sum().item()
            noise[name] += (ref - q).pow(2).sum().item()

        return hook

    for name in names:
        hooks.append(float_modules[name].register_forward_hook(save(name)))
        hooks.append(quant_model.get_submodule(name).register_forward_hook(compare(name)))
    try:
        float_model.eval()
        quant_model.eval()
        for batch in batches:
            captured.clear()
            float_model(batch)
            quant_model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: (math.inf if noise[n] == 0 else 10 * math.log10(max(signal[n], 1e-30) / noise[n])) for n in names}


def output_sqnr(float_outputs, quant_outputs) -> list[float]:
    """SQNR per raw head output (e.g. confidences, locations); empty for models that return
    post-processed detections (torchvision's), whose per-layer SQNR covers the int8 parts."""
    pairs = list(zip(float_outputs, quant_outputs))
    if not all(isinstance(f, torch.Tensor) and isinstance(q, torch.Tensor) for f, q in pairs):
        return []
    return [sqnr_db(f.float(), q.float()) for f, q in pairs]
