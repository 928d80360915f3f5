"""Observer and qconfig choices, named as users choose them on the command line."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.ao.quantization import QConfig
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
)

from qcompress.errors import QCompressError

BACKENDS = ("x86", "qnnpack", "fbgemm")
OBSERVERS = ("minmax", "moving-avg", "histogram", "percentile")


class PercentileObserver(HistogramObserver):
    """Activation range = the [p, 100-p] percentiles of the observed histogram (outliers clipped)."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(**kwargs)
        self.percentile = percentile

    @torch.jit.export
    def calculate_qparams(self):
        if self.histogram.sum() == 0 or self.min_val.numel() == 0 or torch.isinf(self.min_val):
            return super().calculate_qparams()
        cdf = torch.cumsum(self.histogram, 0) / self.histogram.sum()
        edges = torch.linspace(self.min_val.item(), self.max_val.item(), self.bins + 1)
        tail = (100.0 - self.percentile) / 100.0
        low_bin = int(torch.searchsorted(cdf, torch.tensor(tail)))
        high_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail)))
        low, high = edges[low_bin], edges[min(high_bin + 1, self.bins)]
        return self._calculate_qparams(torch.minimum(low, torch.tensor(0.0)), torch.maximum(high, torch.tensor(0.0)))


@dataclass(frozen=True)
class QuantScheme:
    backend: str = "x86"
    observer: str = "histogram"
    per_channel: bool = True
    # 4: W4A8, weights on 16 levels [-8, 7] held in the int8 kernel's qint8 tensor (the int8 kernel still
    # runs; only the grid is coarser).
    weight_bits: int = 8

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise QCompressError(f"unknown backend {self.backend!r}", f"use one of: {', '.join(BACKENDS)}")
        if self.observer not in OBSERVERS:
            raise QCompressError(f"unknown observer {self.observer!r}", f"use one of: {', '.join(OBSERVERS)}")
        if not 2 <= self.weight_bits <= 8:
            raise QCompressError(f"weight bits must be 2..8, got {self.weight_bits}", "use 8 (W8A8) or 4 (W4A8)")

    @property
    def reduce_range(self) -> bool:
        # x86/fbgemm kernels accumulate u8*s8 pairs in int16: 7-bit activations avoid overflow.
        return self.backend in ("x86", "fbgemm")


def activation_observer(scheme: QuantScheme):
    common = {"dtype": torch.quint8, "qscheme": torch.per_tensor_affine, "reduce_range": scheme.reduce_range}
    if scheme.observer == "minmax":
        return MinMaxObserver.with_args(**common)
    if scheme.observer == "moving-avg":
        return MovingAverageMinMaxObserver.with_args(averaging_constant=0.01, **common)
    if scheme.observer == "histogram":
        return HistogramObserver.with_args(**common)
    return PercentileObserver.with_args(**common)


def weight_range(bits: int) -> tuple[int, int]:
    """Signed integer grid of ``bits``-bit weights: [-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_observer(scheme: QuantScheme):
    low_bit = {} if scheme.weight_bits == 8 else dict(zip(("quant_min", "quant_max"), weight_range(scheme.weight_bits)))
    if scheme.per_channel:
        return PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, **low_bit)
    return MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, **low_bit)


def make_qconfig(scheme: QuantScheme) -> QConfig:
    scheme.validate()
    return QConfig(activation=activation_observer(scheme), weight=weight_observer(scheme))


def transposed_convs_per_tensor(model: nn.Module, weight) -> list[str]:
    """Eager mode has no per-channel int8 weights for transposed convolutions: each ``ConvTranspose``
    that would inherit a qconfig gets the same one with ``weight`` (a per-tensor observer or fake
    quant) instead. Call after setting the qconfigs, before ``prepare``; returns the names changed."""
    changed = []
    inherited: dict[str, QConfig | None] = {}
    for name, module in model.named_modules():  # parents come before their children
        parent = inherited.get(name.rpartition(".")[0]) if name else None
        qconfig = getattr(module, "qconfig", parent)
        inherited[name] = qconfig
        if isinstance(module, nn.modules.conv._ConvTransposeNd) and qconfig is not None:
            module.qconfig = QConfig(activation=qconfig.activation, weight=weight)
            inherited[name] = module.qconfig
            changed.append(name)
    return changed
