"""Post-training static quantization in eager mode: fuse -> (equalize) -> observe -> calibrate -> convert.

``prepare``/``convert`` return copies; the float model handed in is never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub, convert, prepare

from qcompress._warnings import quiet_torch_ao
from qcompress.errors import QCompressError
from qcompress.quant.fuse import fuse, static_quant_mappings
from qcompress.quant.qconfig import QuantScheme, make_qconfig, transposed_convs_per_tensor, weight_observer


class FloatIsland(nn.Module):
    """Keeps ``module`` in float inside a quantized graph: dequantize in, quantize out."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.dequant = DeQuantStub()
        self.module = module
        self.quant = QuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.module(self.dequant(x)))


def wrap_matching(model: nn.Module, patterns: Sequence[str], wrap) -> tuple[list[str], list[str]]:
    """Replace every module whose name matches a glob by ``wrap(module)`` (topmost match only);
    returns ``(wrapped names, patterns that matched nothing)``."""
    names = [name for name, _ in model.named_modules() if name]
    matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    topmost = [n for n in matched if not any(n.startswith(m + ".") for m in matched if m != n)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    for name in topmost:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrap(getattr(parent, child)))
    return topmost, unmatched


def _float_island(module: nn.Module) -> FloatIsland:
    island = FloatIsland(module)
    island.module.qconfig = None
    return island


def keep_float(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Wrap every module whose name matches a glob in a :class:`FloatIsland` (topmost match only)."""
    if not patterns:
        return []
    wrapped, _ = wrap_matching(model, patterns, _float_island)
    if not wrapped:
        raise QCompressError(
            f"--skip {' '.join(patterns)} matches no layer",
            "use module names such as 'classification_headers.*' (see the report's layer table)",
        )
    return wrapped


def prepare_static(
    float_model: nn.Module,
    scheme: QuantScheme,
    skip: Sequence[str] = (),
    fused: bool = False,
    scopes: Sequence[str] | None = None,
):
    """Fused copy of ``float_model`` with observers attached; returns ``(prepared, fusion_groups, kept_float)``.

    ``scopes``: quantize only these submodules (each carrying its own quant/dequant stubs, see
    :mod:`qcompress.quant.parts`); None quantizes the whole network.
    """
    model = copy.deepcopy(float_model).eval()
    groups: list[list[str]] = []
    if not fused:
        model, record = fuse(model, inplace=True)
        groups = record.groups
    kept = keep_float(model, skip)
    qconfig = make_qconfig(scheme)
    if scopes is None:
        model.qconfig = qconfig
    else:
        for name in scopes:
            model.get_submodule(name).qconfig = qconfig
    for name in kept:
        model.get_submodule(name).module.qconfig = None
    transposed_convs_per_tensor(model, weight_observer(dataclasses.replace(scheme, per_channel=False)))
    torch.backends.quantized.engine = scheme.backend
    with quiet_torch_ao():
        prepare(model, inplace=True)
    return model, groups, kept


@torch.no_grad()  # not inference_mode: QAT keeps training on the observers' buffers afterwards
def calibrate(prepared: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Run images through the observers in eval mode; returns how many images were seen.

    The module's train/eval mode is restored afterwards.
    """
    was_training = prepared.training
    prepared.eval()
    seen = 0
    with quiet_torch_ao():
        for batch in batches:
            prepared(batch)
            seen += batch.shape[0]
    prepared.train(was_training)
    return seen


def convert_static(prepared: nn.Module, scheme: QuantScheme) -> nn.Module:
    torch.backends.quantized.engine = scheme.backend
    with quiet_torch_ao():
        return convert(copy.deepcopy(prepared).eval(), mapping=static_quant_mappings(), inplace=False)


@dataclass
class QuantRecord:
    scheme: dict[str, Any]
    fusion_groups: list[list[str]] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    calib_images: int = 0


def quantize_static(
    float_model: nn.Module,
    calib_batches: Iterable[torch.Tensor],
    scheme: QuantScheme,
    skip: Sequence[str] = (),
) -> tuple[nn.Module, QuantRecord]:
    """Float model -> int8 model calibrated on ``calib_batches`` (preprocessed images)."""
    prepared, groups, kept = prepare_static(float_model, scheme, skip)
    seen = calibrate(prepared, calib_batches)
    if seen == 0:
        raise QCompressError("no calibration images", "pass --calib-images N > 0 or --data-free")
    quantized = convert_static(prepared, scheme)
    return quantized, QuantRecord(scheme.__dict__.copy(), groups, kept, seen)


def quantized_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, "_packed_params") or type(m).__name__.startswith("Quantized")]


def is_int8(module: nn.Module) -> bool:
    """True for a converted quantized module holding int8 weights."""
    weight = getattr(module, "weight", None)
    if callable(weight):
        try:
            return weight().dtype == torch.qint8
        except Exception:  # noqa: BLE001 - some quantized modules have no weight
            return False
    return False
