"""Eager-mode int8 quantization-aware training: fuse for QAT -> fake-quant -> train -> convert.

Conv+BN+ReLU6 (everywhere in MobileNetV2) has no QAT module in torch. We add one,
:class:`QATConvBnReLU6`: torch's ``ConvBnReLU2d`` (BN statistics still updated in training, weights
fake-quantized per channel after folding BN into them, Jacob et al. 2018 section 3.2) with ReLU6
instead of ReLU. Its activation fake-quant sits *after* the ReLU6, so the learned output range is
that of the clamped activation, exactly as in post-training quantization. On convert it becomes the
same :class:`~qcompress.quant.fuse.QuantizedConvReLU6` PTQ produces, in the same place (BN and
ReLU6 slots become ``Identity``), so a QAT int8 checkpoint has the PTQ state_dict layout and
reloads through :func:`qcompress.quant.io.rebuild_quantized` unchanged.

(The alternative, torch's ``ConvBn2d`` followed by a separate ReLU6 quantized as ``nnq.ReLU6``,
quantizes the signed pre-activation, wasting half of the 7-bit x86 range on values the clamp
discards, and requantizes once more per layer.)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization import (
    QConfig,
    convert,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    fuse_modules_qat,
    get_default_qat_qconfig,
    prepare_qat,
)
from torch.ao.quantization.fake_quantize import (
    FakeQuantizeBase,
    default_per_channel_weight_fake_quant,
    default_weight_fake_quant,
)
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings
from torch.nn.utils import fuse_conv_bn_weights

from qcompress._warnings import quiet_torch_ao
from qcompress.errors import QCompressError
from qcompress.quant.fuse import ConvReLU6, QuantizedConvReLU6, find_fusion_groups, static_quant_mappings
from qcompress.quant.ptq import calibrate
from qcompress.quant.qconfig import BACKENDS, transposed_convs_per_tensor


class ConvBnReLU6(nni._FusedModule):
    """Float Conv2d + BatchNorm2d + ReLU6 kept apart (BN not folded): what QAT fusion produces."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: nn.ReLU6) -> None:
        super().__init__(conv, bn, relu6)


class QATConvBnReLU6(nniqat.ConvBnReLU2d):
    """torch's QAT ConvBnReLU2d with the ReLU6 clamp."""

    _FLOAT_MODULE = ConvBnReLU6  # type: ignore[assignment]
    _FLOAT_RELU_MODULE = nn.ReLU6  # type: ignore[assignment]
    _FUSED_FLOAT_MODULE = ConvReLU6  # type: ignore[assignment]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._forward(input))


class QATConvReLU6(nniqat.ConvReLU2d):
    """torch's QAT ConvReLU2d (no BN) with the ReLU6 clamp."""

    _FLOAT_MODULE = ConvReLU6  # type: ignore[assignment]
    _FLOAT_RELU_MODULE = nn.ReLU6  # type: ignore[assignment]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._conv_forward(input, self.weight_fake_quant(self.weight), self.bias))


class _ConvBnReLU6ToQuantized:
    """convert() target of :class:`QATConvBnReLU6`: fold BN as torch does for ConvBnReLU2d, then
    build the PTQ module (the fake-quant observers give the weight and output qparams)."""

    @staticmethod
    def from_float(mod: QATConvBnReLU6, use_precomputed_fake_quant: bool = False) -> QuantizedConvReLU6:
        mod.weight, mod.bias = fuse_conv_bn_weights(
            mod.weight, mod.bias, mod.bn.running_mean, mod.bn.running_var, mod.bn.eps, mod.bn.weight, mod.bn.bias
        )
        return QuantizedConvReLU6.from_float(mod, use_precomputed_fake_quant=use_precomputed_fake_quant)


def _fuse_conv_bn_relu6_qat(is_qat: bool, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: nn.ReLU6) -> nn.Module:
    if not is_qat:
        raise QCompressError("internal: QAT fusion called for post-training quantization")
    return ConvBnReLU6(conv, bn, relu6)


def _fuse_conv_relu6(is_qat: bool, conv: nn.Conv2d, relu6: nn.ReLU6) -> nn.Module:
    return ConvReLU6(conv, relu6)


QAT_FUSER_METHODS = {
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6): _fuse_conv_bn_relu6_qat,
    (nn.Conv2d, nn.ReLU6): _fuse_conv_relu6,
}
EXTRA_QAT_MAPPINGS = {ConvBnReLU6: QATConvBnReLU6, ConvReLU6: QATConvReLU6}
EXTRA_QAT_CONVERT_MAPPINGS = {QATConvBnReLU6: _ConvBnReLU6ToQuantized, QATConvReLU6: QuantizedConvReLU6}


def qat_module_mappings() -> dict:
    """float fused module -> QAT module (torch's defaults + ReLU6 variants)."""
    mappings = get_default_qat_module_mappings()
    mappings.update(EXTRA_QAT_MAPPINGS)
    return mappings


def qat_convert_mappings() -> dict:
    """QAT module -> quantized module: the PTQ mappings + ReLU6 QAT variants."""
    mappings = static_quant_mappings()
    mappings.update(EXTRA_QAT_CONVERT_MAPPINGS)
    return mappings


def fuse_for_qat(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, list[list[str]]]:
    """Group Conv+BN(+ReLU/ReLU6) without folding BN (QAT keeps BN statistics live)."""
    if not inplace:
        model = copy.deepcopy(model)
    model.train()
    groups = find_fusion_groups(model)
    with quiet_torch_ao():
        if groups:
            fuse_modules_qat(
                model, groups, inplace=True, fuse_custom_config_dict={"additional_fuser_method_mapping": QAT_FUSER_METHODS}
            )
    return model, groups


def qat_qconfig(backend: str = "x86") -> QConfig:
    """Activations: torch's QAT default for ``backend`` (fused moving-average observer + fake quant,
    7-bit on x86 like PTQ's reduce_range). Weights: per-channel symmetric int8 with the *unfused*
    FakeQuantize: torch's fused per-channel kernel scales by max/128 while convert uses the
    observer's max/127.5, so the int8 weights would differ from the trained ones by 0.4%."""
    if backend not in BACKENDS:
        raise QCompressError(f"unknown backend {backend!r}", f"use one of: {', '.join(BACKENDS)}")
    return QConfig(activation=get_default_qat_qconfig(backend).activation, weight=default_per_channel_weight_fake_quant)


def prepare_qat_model(
    float_model: nn.Module, backend: str = "x86", arch: str | None = None
) -> tuple[nn.Module, list[list[str]], list[str] | None]:
    """A fused, fake-quantized copy of ``float_model`` in training mode; returns
    ``(prepared, fusion_groups, int8_parts)``. For architectures quantized in parts (torchvision's,
    see :mod:`qcompress.quant.parts`) only those parts get fake quantization; ``int8_parts`` is None
    when the whole network is quantized."""
    from qcompress.quant.parts import prepare_int8_parts

    model = copy.deepcopy(float_model)
    parts = prepare_int8_parts(model, arch) if arch else None
    model, groups = fuse_for_qat(model, inplace=True)
    if parts is None:
        model.qconfig = qat_qconfig(backend)
    else:
        for name in parts:
            model.get_submodule(name).qconfig = qat_qconfig(backend)
    transposed_convs_per_tensor(model, default_weight_fake_quant)  # no per-channel transposed convs
    torch.backends.quantized.engine = backend
    with quiet_torch_ao():
        prepare_qat(model, mapping=qat_module_mappings(), inplace=True)
    return model, groups, parts


def observe(prepared: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Initialise the activation ranges from images (eval mode: BN uses its running statistics)."""
    return calibrate(prepared, batches)


def freeze_bn(model: nn.Module) -> int:
    """BN of every QAT conv uses (and stops updating) its running statistics; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nniqat.ConvBn2d):  # also ConvBnReLU2d and QATConvBnReLU6
            module.freeze_bn_stats()
            count += 1
    return count


def _count_fake_quants(model: nn.Module) -> int:
    return sum(isinstance(m, FakeQuantizeBase) for m in model.modules())


def freeze_observers(model: nn.Module) -> int:
    """Stop updating quantization ranges (scales and zero points stay as they are); returns how many."""
    model.apply(disable_observer)
    return _count_fake_quants(model)


def set_fake_quant(model: nn.Module, enabled: bool, observers: bool | None = None) -> None:
    """Switch fake quantization (and optionally the observers) on or off everywhere."""
    model.apply(enable_fake_quant if enabled else disable_fake_quant)
    if observers is not None:
        model.apply(enable_observer if observers else disable_observer)


@contextlib.contextmanager
def observers_disabled(model: nn.Module) -> Iterator[None]:
    """Fake-quant observers off inside the block (ranges stay as they are), each one's state restored after."""
    fakes = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    states = [m.observer_enabled.clone() for m in fakes]
    try:
        model.apply(disable_observer)
        yield
    finally:
        for module, state in zip(fakes, states):
            module.observer_enabled.copy_(state)


@dataclass(frozen=True)
class FreezeSchedule:
    """After ``bn_epoch`` epochs BN statistics freeze; after ``observer_epoch`` the ranges do (None: never)."""

    bn_epoch: int | None = 1
    observer_epoch: int | None = 1

    def apply(self, model: nn.Module, epochs_done: int) -> list[str]:
        """Freeze what is due once ``epochs_done`` epochs are complete; returns what was frozen."""
        events = []
        if self.bn_epoch is not None and epochs_done >= self.bn_epoch:
            events.append(f"bn statistics frozen ({freeze_bn(model)} layers)")
        if self.observer_epoch is not None and epochs_done >= self.observer_epoch:
            events.append(f"observers frozen ({freeze_observers(model)} fake-quant modules)")
        return events


def convert_qat(prepared: nn.Module, backend: str = "x86") -> nn.Module:
    """Real int8 copy of a QAT model (eval mode); ``prepared`` is untouched."""
    torch.backends.quantized.engine = backend
    model = copy.deepcopy(prepared).eval()
    model.apply(disable_observer)  # convert reads the trained ranges, not one more observation
    with quiet_torch_ao():
        return convert(model, mapping=qat_convert_mappings(), inplace=True)


def qat_recipe(backend: str, groups: int, schedule: FreezeSchedule, int8_parts: list[str] | None = None,
               float_parts: list[str] | None = None) -> dict:
    """The sidecar's quantization recipe: the PTQ structure (so rebuild_quantized reloads it) + how it was trained."""
    return {
        "int8_parts": int8_parts,
        "float_parts": float_parts,
        "scheme": "int8-eager-qat",
        "qat": True,
        "backend": backend,
        "observer": "moving-avg",
        "per_channel": True,
        "relu6": "fused-clamp",
        "kept_float": [],
        "fusion_groups": groups,
        "freeze_bn_epoch": schedule.bn_epoch,
        "freeze_observer_epoch": schedule.observer_epoch,
    }


__all__ = [
    "ConvBnReLU6",
    "FreezeSchedule",
    "QATConvBnReLU6",
    "QATConvReLU6",
    "convert_qat",
    "freeze_bn",
    "freeze_observers",
    "fuse_for_qat",
    "observe",
    "prepare_qat_model",
    "qat_convert_mappings",
    "qat_module_mappings",
    "qat_qconfig",
    "qat_recipe",
    "set_fake_quant",
]
