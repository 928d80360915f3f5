"""What a network costs besides time: parameters, bytes on disk and in memory, MACs, BOPs, peak memory.

MACs are counted by forward hooks on every convolution and linear layer, float or quantized
(``torch.ao.nn.quantized`` modules, our fused ``QuantizedConvReLU6``, QAT and intrinsic wrappers),
from the shapes the layer actually sees: a convolution costs
``output elements * in_channels / groups * kH * kW`` multiply-accumulates (bias adds not counted),
a transposed convolution ``input elements * out_channels / groups * kH * kW`` (each input element is
scattered to that many outputs: ``in_channels / groups * out_channels * kH * kW * H_in * W_in`` in all),
a linear layer ``output elements * in_features``. Everything else (BN, activations, adds, pooling,
box decoding) is not counted, as in the MobileNet and SSD papers' "mult-adds".

BOPs (bit operations, "Bit-Mixer"/"BOPs" convention of van Baalen et al. 2020) weight each MAC by
``weight_bits * activation_bits``: 32 x 32 for float layers, 8 x 8 for int8 ones. Low-bit layers
may declare ``weight_bits`` / ``activation_bits`` attributes, which take precedence.

This is the one MAC / BOPs / parameter counter of qcompress: quantized ``Linear`` layers (whose
weights live in a child) and QAT wrappers count once; ``estimate_bops`` answers "what if these convs
ran at these bits" for a float network with the same per-layer MACs.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompress.torch_state import torch_state

_DTYPE_BITS = {
    torch.qint8: 8,
    torch.quint8: 8,
    torch.qint32: 32,
    torch.quint4x2: 4,
    torch.quint2x4: 2,
}


def dtype_bits(dtype: torch.dtype) -> int:
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype]
    if dtype == torch.bool:
        return 1
    return torch.empty((), dtype=dtype).element_size() * 8


# ------------------------------------------------------------------------------------ parameters
def _module_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight tensor of a float or quantized layer (quantized layers expose it as a method)."""
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        try:
            weight = weight()
        except Exception:  # noqa: BLE001 - quantized modules without weights (e.g. Quantize)
            return None
    return weight if isinstance(weight, torch.Tensor) else None


def _module_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    if callable(bias) and not isinstance(bias, torch.Tensor):
        try:
            bias = bias()
        except Exception:  # noqa: BLE001
            return None
    return bias if isinstance(bias, torch.Tensor) else None


def is_packed(module: nn.Module) -> bool:
    """Quantized layers keep weight and bias packed, outside ``parameters()``."""
    weight = getattr(module, "weight", None)
    return hasattr(module, "_packed_params") or (callable(weight) and not isinstance(weight, torch.Tensor))


def count_parameters(model: nn.Module, nonzero: bool = False) -> int:
    """Learned values: float parameters plus the packed weights and biases of quantized layers; with
    ``nonzero`` only the entries that are not exactly 0 (what unstructured pruning removed)."""

    def size(tensor: torch.Tensor) -> int:
        if not nonzero:
            return tensor.numel()
        values = tensor.dequantize() if tensor.is_quantized else tensor
        return int(torch.count_nonzero(values).item())

    total = 0
    for module in model.modules():
        total += sum(size(p) for p in module.parameters(recurse=False))
        if is_packed(module):
            for tensor in (_module_weight(module), _module_bias(module)):
                if tensor is not None:
                    total += size(tensor)
    return total


def count_buffers(model: nn.Module) -> int:
    return sum(b.numel() for b in model.buffers())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model saves (int8 weights count one byte each)."""
    total = 0
    for value in model.state_dict().values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def file_bytes(path: Path) -> int:
    return Path(path).stat().st_size


# ------------------------------------------------------------------------------------ MACs/BOPs
@dataclass
class LayerCost:
    name: str
    kind: str
    macs: int
    weight_bits: int
    activation_bits: int

    @property
    def bops(self) -> int:
        return self.macs * self.weight_bits * self.activation_bits


@dataclass
class ComputeCost:
    """MACs and BOPs of one forward pass, per image (the count for the batch divided by its size)."""

    macs: int
    bops: int
    input_shape: tuple[int, ...]
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def int8_macs_fraction(self) -> float:
        return sum(l.macs for l in self.layers if l.weight_bits <= 8) / self.macs if self.macs else 0.0

    def as_dict(self, with_layers: bool = False) -> dict[str, Any]:
        data = {"macs": self.macs, "bops": self.bops, "input_shape": list(self.input_shape),
                "int8_macs_fraction": self.int8_macs_fraction}
        if with_layers:
            data["layers"] = [{**asdict(l), "bops": l.bops} for l in self.layers]
        return data


def _conv_like(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("in_channels", "out_channels", "kernel_size", "groups"))


def _linear_like(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def _lowbit_wrapper(module: nn.Module) -> bool:
    """A low-bit fake-quant wrapper (``qcompress.quant.lowbit``): it calls its inner layer's function
    itself, so the inner layer's hooks never fire; the wrapper is counted, at its ``bits``."""
    return hasattr(module, "weight_quantizer") and hasattr(module, "input_quantizer") and hasattr(module, "layer")


def costed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers to count. Not "leaf modules": a quantized Linear keeps its weights in a
    child (``_packed_params``) and a QAT ConvBn2d holds its BN as a child; a wrapper whose
    descendant is itself a conv/linear layer is skipped so nothing counts twice. Low-bit wrappers
    are counted instead of the layer they hold."""
    modules = list(model.named_modules())
    wrappers = [n for n, m in modules if _lowbit_wrapper(m)]
    candidates = [(n, m) for n, m in modules if (_conv_like(m) or _linear_like(m))
                  and not any(n.startswith(w + ".") for w in wrappers)]
    names = [n for n, _ in candidates]
    keep = {n for n, m in candidates if not any(o.startswith(n + ".") if n else o for o in names if o != n)}
    keep |= set(wrappers)
    return [(n, m) for n, m in modules if n in keep]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _kernel_elements(module: nn.Module) -> int:
    kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,)
    k = 1
    for size in kernel:
        k *= int(size)
    return k


def layer_macs(module: nn.Module, input: torch.Tensor, output: torch.Tensor) -> int:
    """MACs of one call of a conv/linear layer (whole batch), from the tensors it saw."""
    if _conv_like(module):
        if getattr(module, "transposed", False) or "Transpose" in type(module).__name__:
            # a transposed conv scatters each input element to out_channels/groups * k outputs
            return input.numel() * (int(module.out_channels) // int(module.groups)) * _kernel_elements(module)
        return output.numel() * (int(module.in_channels) // int(module.groups)) * _kernel_elements(module)
    return output.numel() * int(module.in_features)


def _bits(module: nn.Module, inputs: tuple) -> tuple[int, int]:
    weight = _module_weight(module)
    weight_bits = getattr(module, "weight_bits", None) or (dtype_bits(weight.dtype) if weight is not None else 32)
    x = _first_tensor(inputs)
    activation_bits = getattr(module, "activation_bits", None) or (dtype_bits(x.dtype) if x is not None else 32)
    return int(weight_bits), int(activation_bits)


@contextmanager
def _hooks(model: nn.Module, layers: list[LayerCost]) -> Iterator[None]:
    handles = []
    for name, module in costed_layers(model):

        def hook(mod: nn.Module, inputs: tuple, output: Any, name: str = name) -> None:
            out, x = _first_tensor(output), _first_tensor(inputs)
            if out is None or x is None:
                return
            layer = mod.layer if _lowbit_wrapper(mod) else mod
            macs = layer_macs(layer, x, out)
            wb, ab = mod.bits if _lowbit_wrapper(mod) else _bits(mod, inputs)
            layers.append(LayerCost(name, type(layer).__name__, int(macs), int(wb), int(ab)))

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def count_macs(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> ComputeCost:
    """MACs and BOPs per image of ``model`` on an input of ``input_shape`` (batch first)."""
    model.eval()
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    layers: list[LayerCost] = []
    with _hooks(model, layers):
        model(x)
    batch = max(1, int(input_shape[0]))
    for layer in layers:
        layer.macs //= batch
    return ComputeCost(
        macs=sum(l.macs for l in layers),
        bops=sum(l.bops for l in layers),
        input_shape=tuple(input_shape),
        layers=layers,
    )


# The layer kinds low-bit QAT quantizes (qcompress.quant.lowbit's wrappers), as count_macs names them.
LOWBIT_KINDS = ("Conv2d", "ConvTranspose2d", "Linear")


def conv_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs per image of every ``nn.Conv2d``, ``nn.ConvTranspose2d`` and ``nn.Linear`` (the layers low-bit QAT
    quantizes) of a float model, by module name (from :func:`count_macs`)."""
    return {layer.name: layer.macs for layer in count_macs(model, input_shape).layers
            if layer.kind in LOWBIT_KINDS}


@dataclass
class BopsEstimate:
    """Bit-operations ``sum MACs * bits_w * bits_a`` (Baskin et al. / BiDet's BOPs) of one configuration."""

    per_layer: dict[str, dict[str, int]]  # name -> {macs, bits_w, bits_a, bops}
    total_bops: int
    float_bops: int  # the same network with every layer at 32 x 32 bits

    @property
    def speedup(self) -> float:
        return self.float_bops / self.total_bops if self.total_bops else float("nan")


def estimate_bops(macs: Mapping[str, int], bits: Mapping[str, tuple[int, int]]) -> BopsEstimate:
    """BOPs with ``bits[name] = (bits_w, bits_a)`` for quantized layers, 32 x 32 for the others."""
    per_layer = {}
    for name, m in macs.items():
        bw, ba = bits.get(name, (32, 32))
        per_layer[name] = {"macs": int(m), "bits_w": bw, "bits_a": ba, "bops": int(m) * bw * ba}
    total = sum(v["bops"] for v in per_layer.values())
    return BopsEstimate(per_layer, total, sum(macs.values()) * 32 * 32)


BINARY_FLOP_DIVISOR = 64  # one 64-bit XNOR + popcount does 64 binary MACs (Bi-Real Net, XNOR-Net, ReActNet)


def equivalent_flops(macs: Mapping[str, int], binary: Iterable[str]) -> float:
    """The binary-network literature's equivalent FLOPs: MACs of the float (and int8) layers + MACs of the
    ``binary`` (1-bit weights and activations) layers / 64."""
    binary = set(binary)
    return float(sum(m / BINARY_FLOP_DIVISOR if name in binary else m for name, m in macs.items()))


def weight_compression(model: nn.Module, bits: Mapping[str, tuple[int, int]]) -> float:
    """fp32 parameter bits / parameter bits when the listed convs' weights use ``bits_w`` (biases,
    BN and float layers stay 32-bit). ``model`` is the float model (names of its convs)."""
    total = quantized = 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            n = p.numel()
            total += n * 32
            quantized += n * (bits[name][0] if name in bits and pname == "weight" else 32)
    return total / quantized if quantized else float("nan")


# --------------------------------------------------------------------------------- peak memory
@dataclass(frozen=True)
class PeakMemory:
    """Extra resident memory (bytes) a forward pass needed on top of what the process held before it.

    ``method`` says how it was measured:
    - ``vmhwm``: Linux. Free heap memory is first returned to the OS (``malloc_trim``), the
      kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), one forward pass runs, and
      the value is ``VmHWM - VmRSS(before)``: activations, workspaces, weight re-packing: exact to a
      page, whatever ran earlier in the process.
    - ``ru_maxrss``: elsewhere. The growth of the process-lifetime peak RSS, a lower bound
      (0 when an earlier step of the process already peaked higher).
    ``resident_bytes`` is the process RSS just before the pass (model weights included).
    """

    batch_size: int
    peak_bytes: int
    resident_bytes: int
    method: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _proc_status() -> dict[str, int] | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # kB
    return values if len(values) == 2 else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux


@torch.inference_mode()
def peak_forward_memory(
    model: nn.Module, input_shape: tuple[int, ...], threads: int | None = None, seed: int = 0
) -> PeakMemory:
    """Peak extra resident memory of one forward pass at ``input_shape`` (see :class:`PeakMemory`)."""
    model.eval()
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    with torch_state(threads):
        gc.collect()
        _malloc_trim()
        status = _proc_status()
        if status is not None and _reset_peak_rss():
            before = _proc_status() or status
            model(x)
            after = _proc_status() or before
            return PeakMemory(int(input_shape[0]), max(0, after["VmHWM"] - before["VmRSS"]), before["VmRSS"], "vmhwm")
        before_peak = _maxrss_bytes()
        model(x)
        resident = status["VmRSS"] if status else before_peak
        return PeakMemory(int(input_shape[0]), max(0, _maxrss_bytes() - before_peak), resident, "ru_maxrss")


PEAK_MEMORY_NOTE = (
    "extra resident memory one forward pass needs on top of what the process held before it. On Linux, free "
    "heap memory is first returned to the OS (malloc_trim), the kernel's peak-RSS mark is reset "
    "(/proc/self/clear_refs), one pass runs, and the value is VmHWM minus the RSS before: activations, workspaces "
    "and weight re-packing, exact to a page. Elsewhere the growth of the process-lifetime peak RSS, a lower bound."
)


def describe_peak_memory() -> str:
    """How peak memory is measured, as one plain sentence for reports."""
    return PEAK_MEMORY_NOTE


__all__ = [
    "ComputeCost",
    "LayerCost",
    "PeakMemory",
    "count_buffers",
    "count_macs",
    "count_parameters",
    "dtype_bits",
    "equivalent_flops",
    "file_bytes",
    "peak_forward_memory",
    "state_dict_bytes",
]
