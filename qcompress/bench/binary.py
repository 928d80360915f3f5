"""What the bitpacked binary engine buys on a binary-QAT model: per binarized layer, the engine against
torch fp32 and eager int8 convolutions (Linear layers: fp32 and static int8 Linear) of the same
shape, and the whole network fp32 (fake-quant simulation) against the engine, all timed interleaved in
one run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from qcompress._warnings import quiet_torch_ao
from qcompress.bench.latency import interleaved_latency
from qcompress.quant.lowbit import (
    BinaryActivationQuantizer,
    BinaryWeightQuantizer,
    LowBitConv2d,
    LowBitConvTranspose2d,
    LowBitLinear,
)
from qcompress.torch_state import torch_state


@dataclass
class BinaryLayerTiming:
    name: str
    kernel: str  # "3x3" / "1x1" and the stride; "linear" for a Linear
    in_channels: int  # a Linear's in and out features
    out_channels: int
    out_hw: list[int]  # a Linear: [rows]
    engine_ms: float
    fp32_ms: float
    int8_ms: float
    speedup_vs_fp32: float
    speedup_vs_int8: float
    max_abs_diff: float  # engine vs the fake-quant float layer on the same input, relative to its output scale


@dataclass
class BinaryEngineReport:
    kernel: str
    instruction_sets: dict[str, bool]
    cpu: str
    threads: int
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    layers: list[BinaryLayerTiming] = field(default_factory=list)
    model_fp32_ms: float = float("nan")  # the fake-quant (simulated) network in torch fp32
    model_engine_ms: float = float("nan")
    max_abs_diff: float = float("nan")  # worst relative layer difference

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model_speedup"] = self.model_fp32_ms / self.model_engine_ms if self.model_engine_ms else None
        return data


def has_binary_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (LowBitConv2d, LowBitConvTranspose2d, LowBitLinear))
               and isinstance(m.weight_quantizer, BinaryWeightQuantizer)
               and isinstance(m.input_quantizer, BinaryActivationQuantizer) for m in model.modules())


def _int8_twin(layer: nn.Conv2d | nn.Linear) -> nnq.Conv2d | nnq.Linear:
    w = layer.weight.detach()
    scales = w.abs().flatten(1).amax(dim=1).clamp_min(1e-8) / 127
    qweight = torch.quantize_per_channel(w, scales.double(), torch.zeros(len(scales), dtype=torch.long), 0,
                                         torch.qint8)
    if isinstance(layer, nn.Linear):
        qlinear = nnq.Linear(layer.in_features, layer.out_features)
        qlinear.set_weight_bias(qweight, None if layer.bias is None else layer.bias.detach())
        return qlinear
    conv = layer
    qconv = nnq.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation)
    qconv.set_weight_bias(qweight, None if conv.bias is None else conv.bias.detach())
    return qconv


@torch.inference_mode()
def measure_binary_engine(model: nn.Module, input_shape: tuple[int, int, int, int], runs: int = 20,
                          threads: int | None = 1, seed: int = 0) -> BinaryEngineReport:
    """Convert ``model``'s binary layers to the engine and time layers and network (see the module doc)."""
    from qcompress.runtime.binary import convert_binary, cpu_info, resolve_kernel

    info = cpu_info()
    model = model.eval()
    engine_model, record = convert_binary(model)
    report = BinaryEngineReport(resolve_kernel("auto"), dict(info.instruction_sets), info.model, threads or 1,
                                list(record.converted), dict(record.skipped))
    # Inputs each binary layer sees, from the float simulation on one random image.
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: inputs.__setitem__(n, args[0].detach().clone())) for n in record.converted]
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    worst = 0.0
    engines = torch.backends.quantized.supported_engines
    # torch_state sets the engine's numba threads with torch's
    with torch_state(threads or 1, "x86" if "x86" in engines else None):
        for name in record.converted:
            fake, engine = model.get_submodule(name), engine_model.get_submodule(name)
            a = inputs[name]
            reference, out = fake(a), engine(a)
            scale = float(reference.abs().max()) or 1.0
            diff = float((out - reference).abs().max()) / scale
            worst = max(worst, diff)
            layer = fake.layer
            with quiet_torch_ao():
                qlayer = _int8_twin(layer)
                qa = torch.quantize_per_tensor(a, float(a.abs().max() or 1.0) / 127, 128, torch.quint8)
            calls = [_Call(engine, a), _Call(layer, a), _Call(qlayer, qa)]
            stats = interleaved_latency(calls, (1, 1, 1, 1), runs=runs, warmup=3, threads=threads, seed=seed)
            engine_ms, fp32_ms, int8_ms = (s.median_ms for s in stats)
            if isinstance(layer, nn.Linear):
                kind, sizes = "linear", (layer.in_features, layer.out_features, [out.shape[0]])
            else:
                kind = f"{layer.kernel_size[0]}x{layer.kernel_size[1]}/s{layer.stride[0]}"
                sizes = (layer.in_channels, layer.out_channels, list(out.shape[-2:]))
            report.layers.append(BinaryLayerTiming(name, kind, *sizes, engine_ms, fp32_ms, int8_ms,
                                                   fp32_ms / engine_ms, int8_ms / engine_ms, diff))
        if record.converted:
            whole = interleaved_latency([model, engine_model], input_shape, runs=runs, warmup=3, threads=threads,
                                        seed=seed)
            report.model_fp32_ms, report.model_engine_ms = whole[0].median_ms, whole[1].median_ms
    report.max_abs_diff = worst
    return report


class _Call(nn.Module):
    """A module called on a fixed input (interleaved_latency passes its own input, ignored here)."""

    def __init__(self, module: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.module, self.x = module, x

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.module(self.x)


__all__ = ["BinaryEngineReport", "BinaryLayerTiming", "has_binary_layers", "measure_binary_engine"]
