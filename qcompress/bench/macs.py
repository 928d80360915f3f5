"""Multiply-accumulates and parameter counts of a network, measured from one forward pass.

MACs are counted with forward hooks on every leaf convolution and linear layer (float or
quantized: anything with ``in_channels``/``kernel_size``/``groups``, or ``in_features``):

- convolution: ``output elements * in_channels / groups * kH * kW``
- linear: ``output elements * in_features``

Everything else (BN, activations, adds, pooling) is ignored: it is memory-bound and small next to
the convolutions of a detector. Counts are per image: the probe is a batch of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MacCount:
    total: int
    per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.total / 1e9


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int | None:
    elements = output.numel() // max(1, output.shape[0])  # per image
    if hasattr(module, "kernel_size") and hasattr(module, "in_channels") and hasattr(module, "groups"):
        kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,)
        return elements * (module.in_channels // module.groups) * math.prod(kernel)
    if hasattr(module, "in_features"):
        return elements * int(module.in_features)
    return None


@torch.inference_mode()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> MacCount:
    """MACs per image of ``model(torch.zeros(input_shape))``, total and per layer name."""
    per_layer: dict[str, int] = {}
    hooks = []

    def hook(module: nn.Module, inputs, output, name: str) -> None:
        if isinstance(output, torch.Tensor):
            macs = _layer_macs(module, output)
            if macs is not None:
                per_layer[name] = per_layer.get(name, 0) + macs

    for name, module in model.named_modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name)))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_shape[1:])))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return MacCount(sum(per_layer.values()), per_layer)


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameters (float modules); with ``nonzero`` only the entries that are not exactly 0."""
    total = 0
    for p in model.parameters():
        total += int(torch.count_nonzero(p).item()) if nonzero else p.numel()
    return total


__all__ = ["MacCount", "count_macs", "count_params"]
