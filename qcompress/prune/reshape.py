"""Rebuild a channel-pruned network from the builder's full-width one and the pruned ``state_dict``.

A pruned checkpoint stores no code: the sidecar says ``"pruned": true`` and the tensor shapes in
the weights say the new widths. :func:`resize_to_state_dict` replaces every ``Conv2d`` and
``BatchNorm2d`` whose shape differs by a module of the stored shape, keeping every other setting
(stride, padding, dilation, bias, eps, momentum). A depthwise convolution (``groups ==
in_channels == out_channels``) stays depthwise at its new width.

Quantized checkpoints of pruned models have no BN keys (BN is folded into the conv before
quantization); a BN without keys takes the output width of the convolution registered just before
it, which is the conv it follows in every ``Conv -> BN`` sequence the fuser can fold.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _stored_shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    value = state_dict.get(key)
    if value is None:
        return None
    return tuple(value.shape)


def _resized_conv(conv: nn.Conv2d, out_channels: int, in_per_group: int) -> nn.Conv2d:
    if _is_depthwise(conv):
        groups, in_channels = out_channels, out_channels
    else:
        groups = conv.groups
        in_channels = in_per_group * groups
    new = nn.Conv2d(
        in_channels,
        out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups,
        conv.bias is not None,
        conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    new.train(conv.training)
    return new


def _resized_bn(bn: nn.BatchNorm2d, num_features: int) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
        device=bn.running_mean.device if bn.running_mean is not None else None,
    )
    new.train(bn.training)
    return new


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Give ``model``'s convs and BNs the shapes stored in ``state_dict`` (in place); returns the names changed.

    Works for any architecture built from ``Conv2d``/``BatchNorm2d`` modules: nothing is name specific.
    Only shapes change; load the weights with ``load_state_dict`` afterwards.
    """
    changed: list[str] = []
    replacements: list[tuple[str, nn.Module]] = []
    last_conv_out: int | None = None
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Conv2d):
            shape = _stored_shape(state_dict, prefix + "weight")
            if shape is not None and len(shape) == 4 and tuple(module.weight.shape) != shape:
                replacements.append((name, _resized_conv(module, shape[0], shape[1])))
                changed.append(name)
                last_conv_out = shape[0]
            else:
                last_conv_out = module.out_channels
        elif isinstance(module, nn.BatchNorm2d):
            shape = _stored_shape(state_dict, prefix + "running_mean") or _stored_shape(state_dict, prefix + "weight")
            width = shape[0] if shape is not None else None
            if width is None and not any(k.startswith(prefix) for k in state_dict):
                width = last_conv_out  # folded into the preceding conv (quantized checkpoint)
            if width is not None and width != module.num_features:
                replacements.append((name, _resized_bn(module, width)))
                changed.append(name)
    for name, module in replacements:
        _set_submodule(model, name, module)
    return changed


__all__ = ["resize_to_state_dict"]
