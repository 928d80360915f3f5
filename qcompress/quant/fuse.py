"""Module fusion: Conv + BN (+ ReLU / ReLU6) folded into one module before quantization.

Eager-mode fusion knows Conv+BN+ReLU but not ReLU6, which MobileNetV2 uses everywhere. Replacing
ReLU6 by ReLU (what torchvision's quantizable MobileNetV2 does) changes the function of a trained
model. Instead we fuse Conv+BN+ReLU6 into :class:`ConvReLU6`, which stays exactly ReLU6 in float
and converts to a quantized conv+relu whose output range is the observed range of the ReLU6 output
(at most 6), followed by an int8 clamp at 6.

Fusion groups are found from the module structure (consecutive children of a ``Sequential``), so
every architecture built from Conv/BN/ReLU sequences gets them without name lists.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.nn.intrinsic import quantized as nniq
from torch.ao.nn.quantized import functional as quantized_functional
from torch.ao.quantization import fuse_modules
from torch.ao.quantization.fuser_method_mappings import fuse_conv_bn
from torch.ao.quantization.quantization_mappings import get_default_static_quant_module_mappings

from qcompress._warnings import quiet_torch_ao


class ConvReLU6(nni._FusedModule):
    """Float Conv2d followed by ReLU6 (BN already folded into the conv)."""

    def __init__(self, conv: nn.Conv2d, relu6: nn.ReLU6) -> None:
        super().__init__(conv, relu6)


class QuantizedConvReLU6(nniq.ConvReLU2d):
    """Quantized conv + ReLU + clamp at 6.

    The output scale comes from the range observed after ReLU6 (at most 6), but with x86's 7-bit
    activations (reduce_range) quint8 only saturates at twice that range, so the clamp is explicit:
    a quantized hardtanh on the channels-last int8 output (~0.1 ms for a 144x75x75 map).
    """

    _FLOAT_MODULE = ConvReLU6  # type: ignore[assignment]
    _NNI_CONV_RELU_MODULE = ConvReLU6  # type: ignore[assignment]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return quantized_functional.hardtanh(super().forward(input), 0.0, 6.0)

    def _get_name(self) -> str:
        return "QuantizedConvReLU6"


def _fuse_conv_bn_relu6(is_qat: bool, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: nn.ReLU6) -> nn.Module:
    return ConvReLU6(fuse_conv_bn(is_qat, conv, bn), relu6)


def _fuse_conv_relu6(is_qat: bool, conv: nn.Conv2d, relu6: nn.ReLU6) -> nn.Module:
    return ConvReLU6(conv, relu6)


EXTRA_FUSER_METHODS = {
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6): _fuse_conv_bn_relu6,
    (nn.Conv2d, nn.ReLU6): _fuse_conv_relu6,
}

# What our fused float modules become on convert (added to torch's default static mappings).
EXTRA_QUANT_MAPPINGS = {ConvReLU6: QuantizedConvReLU6}

_PATTERNS = [
    (nn.Conv2d, nn.BatchNorm2d, (nn.ReLU, nn.ReLU6)),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv2d, (nn.ReLU, nn.ReLU6)),
    (nn.Linear, nn.ReLU),
]


def static_quant_mappings() -> dict:
    mappings = get_default_static_quant_module_mappings()
    mappings.update(EXTRA_QUANT_MAPPINGS)
    return mappings


@dataclass
class FusionRecord:
    groups: list[list[str]] = field(default_factory=list)


def _matches(modules: list[nn.Module], pattern: tuple) -> bool:
    return len(modules) == len(pattern) and all(isinstance(m, t) for m, t in zip(modules, pattern))


def _runs_children_in_order(module: nn.Module) -> bool:
    from torchvision.models._utils import IntermediateLayerGetter  # a ModuleDict run in order

    return isinstance(module, (nn.Sequential, IntermediateLayerGetter))


def find_fusion_groups(model: nn.Module) -> list[list[str]]:
    """Names of consecutive (conv, bn[, relu]) children in every module that runs its children in
    order (Sequential, torchvision's IntermediateLayerGetter), longest match first, plus the groups a
    module declares itself in ``qcompress_fusion_groups`` (blocks whose forward wires attributes)."""
    groups: list[list[str]] = []
    for prefix, module in model.named_modules():
        declared = getattr(module, "qcompress_fusion_groups", None)
        if declared:
            groups += [[f"{prefix}.{n}" if prefix else n for n in group] for group in declared]
            continue
        if not _runs_children_in_order(module):
            continue
        names = list(module._modules)
        i = 0
        while i < len(names):
            for pattern in _PATTERNS:
                window = [module._modules[n] for n in names[i : i + len(pattern)]]
                if _matches(window, pattern):
                    groups.append([f"{prefix}.{n}" if prefix else n for n in names[i : i + len(pattern)]])
                    i += len(pattern)
                    break
            else:
                i += 1
    return groups


def fuse(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, FusionRecord]:
    """Fold BN into convs and fuse activations; the float function is preserved (up to rounding)."""
    if not inplace:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    groups = find_fusion_groups(model)
    with quiet_torch_ao():
        if groups:
            fuse_modules(
                model,
                groups,
                inplace=True,
                fuse_custom_config_dict={"additional_fuser_method_mapping": EXTRA_FUSER_METHODS},
            )
    model.train(was_training)
    return model, FusionRecord(groups)


def is_fused_conv(module: nn.Module) -> bool:
    return isinstance(module, (ConvReLU6, nni.ConvReLU2d))


def conv_of(module: nn.Module) -> nn.Conv2d | None:
    """The Conv2d inside a (possibly fused) module, else None."""
    if isinstance(module, nn.Conv2d):
        return module
    if is_fused_conv(module):
        return module[0]
    return None


__all__ = ["ConvReLU6", "FusionRecord", "QuantizedConvReLU6", "find_fusion_groups", "fuse", "static_quant_mappings"]
