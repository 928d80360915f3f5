"""A float twin of an eager int8 network whose ONNX export is a QDQ graph carrying *our* quantization.

Eager int8 (``torch.ao`` convert) holds a uint8 tensor at every activation quantization point: after
``QuantStub``, after each quantized conv / linear (with its fused ReLU or our ReLU6 clamp), after each
quantized ``FloatFunctional`` op, after float modules run on quantized tensors (``nn.ReLU``,
``nn.MaxPool2d``...). The twin runs the same network in float and puts a quantize -> dequantize pair
with the *eager model's own* scale and zero point at each of those points; weights are the eager
model's int8 values behind a ``DequantizeLinear`` (per-channel along axis 0, or per-tensor), biases
int32 at ``input_scale * weight_scale`` (what an int8 kernel adds to its accumulator). Exported with
the TorchScript exporter, each pair becomes ``QuantizeLinear -> DequantizeLinear``: the graph ONNX
Runtime's optimizer fuses into ``QLinearConv`` / ``QLinearAdd``. Nothing is calibrated again.

Ranges. x86 activations are observed with ``reduce_range`` (7 bits: the calibrated range maps to
[0, 127]) but stored as ``quint8``: eager kernels saturate at 0 and 255, and so does a uint8
``QuantizeLinear`` with the same scale and zero point, so the twin reproduces eager saturation
exactly. Our ReLU6 layers (:class:`~qcompress.quant.fuse.QuantizedConvReLU6`) clamp the uint8 result at
``quantize(6)`` after the conv; the twin exports that clamp as a uint8 ``Clip`` between the
``QuantizeLinear`` and ``DequantizeLinear``, so it runs on the int8 tensor as in eager mode.

Float islands (``--skip``) stay float: their layers run as float ONNX ops and their ``Quantize`` is a
QDQ pair. Their ``DeQuantize`` exports as a ``DequantizeLinear`` whose (equal) scale is given per
channel: ONNX Runtime >= 1.20 would otherwise quantize the weights of a float conv fed by a per-tensor
``DequantizeLinear`` itself (its ``WeightBiasQuantization`` pass), undoing the ``--skip``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn import intrinsic as nni
from torch.ao.nn import quantized as nnq
from torch.ao.nn.intrinsic import quantized as nniq

from qcompress._warnings import quiet_torch_ao
from qcompress.errors import QCompressError
from qcompress.quant.fuse import QuantizedConvReLU6
from qcompress.torch_state import torch_state

_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
_FUNCTIONAL_METHODS = ("add", "add_relu", "mul", "cat", "add_scalar", "mul_scalar")
_INT32 = (-(2**31), 2**31 - 1)
# Exact types: other subclasses (ConvAdd2d, Conv1d...) compute something else and are refused.
_CONVS = (nnq.Conv2d, nniq.ConvReLU2d, QuantizedConvReLU6)
_TRANSPOSED_CONVS = (nnq.ConvTranspose2d,)
_LINEARS = (nnq.Linear, nniq.LinearReLU)


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization of one activation: ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int
    dtype: torch.dtype = torch.quint8

    @classmethod
    def of(cls, tensor: torch.Tensor) -> QParams:
        if tensor.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise QCompressError(
                "per-channel activation quantization cannot be exported", "use per-tensor activations"
            )
        return cls(float(np.float32(tensor.q_scale())), int(tensor.q_zero_point()), tensor.dtype)

    @property
    def limits(self) -> tuple[int, int]:
        return (0, 255) if self.dtype == torch.quint8 else (-128, 127)


@dataclass
class TwinRecord:
    """What the twin carries: counts of int8 layers, activation QDQ points and float layers kept."""

    int8_convs: int = 0
    int8_linears: int = 0
    activation_points: int = 0
    float_layers: list[str] = field(default_factory=list)
    weight_granularity: set[str] = field(default_factory=set)


class _QuantDequantFn(torch.autograd.Function):
    """Fake quantization with eager semantics; exports as QuantizeLinear [-> Clip] -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, low: int, high: int, signed: bool):
        full = (-128, 127) if signed else (0, 255)
        y = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, *full)
        if (low, high) != full:  # clamping grid values to grid values: the integer clamp, in float
            y = torch.clamp(y, (low - zero_point) * scale, (high - zero_point) * scale)
        return y

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int, low: int, high: int, signed: bool):
        dtype = torch.int8 if signed else torch.uint8
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
        q = g.op("QuantizeLinear", x, s, z)
        full = (-128, 127) if signed else (0, 255)
        if (low, high) != full:
            lo = g.op("Constant", value_t=torch.tensor(low, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(high, dtype=dtype))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, s, z)


class _DequantizeFn(torch.autograd.Function):
    """Integer constant -> float; exports as DequantizeLinear on the integer initializer."""

    @staticmethod
    def forward(ctx, values, scale, zero_point, axis: int):
        if scale.ndim == 0:
            return (values.float() - zero_point.float()) * scale
        shape = [1] * values.ndim
        shape[axis] = -1
        return (values.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, values, scale, zero_point, axis: int):
        return g.op("DequantizeLinear", values, scale, zero_point, axis_i=axis)


class _FloatBoundaryFn(torch.autograd.Function):
    """The identity on values already on the grid; exports as QuantizeLinear (per-tensor) -> DequantizeLinear
    with the same scale repeated per channel (axis 1), so that ONNX Runtime leaves the float layer it
    feeds in float (its WeightBiasQuantization pass would give such a layer int8 weights)."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, channels: int, signed: bool):
        full = (-128, 127) if signed else (0, 255)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, *full)

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int, channels: int, signed: bool):
        dtype = torch.int8 if signed else torch.uint8
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
        scales = g.op("Constant", value_t=torch.full((channels,), scale, dtype=torch.float32))
        zeros = g.op("Constant", value_t=torch.full((channels,), zero_point, dtype=dtype))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), scales, zeros, axis_i=1)


class FloatBoundary(nn.Module):
    """Where eager mode dequantizes into float layers (a ``--skip`` island): exact, and kept float by ORT."""

    def __init__(self, qparams: QParams, channels: int) -> None:
        super().__init__()
        self.qparams = qparams
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qparams
        return _FloatBoundaryFn.apply(x, q.scale, q.zero_point, self.channels, q.dtype == torch.qint8)


class QuantDequant(nn.Module):
    """One activation quantization point; ``clamp`` narrows the integer range (our ReLU6 clamp)."""

    def __init__(self, qparams: QParams, clamp: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.qparams = qparams
        self.low, self.high = clamp if clamp is not None else qparams.limits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qparams
        return _QuantDequantFn.apply(x, q.scale, q.zero_point, self.low, self.high, q.dtype == torch.qint8)

    def extra_repr(self) -> str:
        q = self.qparams
        return f"scale={q.scale:.6g}, zero_point={q.zero_point}, range=[{self.low}, {self.high}]"


class _IntegerWeight(nn.Module):
    """An int8 weight (or int32 bias) with its scale and zero point, as buffers (ONNX initializers)."""

    def __init__(
        self, values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int
    ) -> None:
        super().__init__()
        self.register_buffer("values", values)
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero_point", zero_point)
        self.axis = axis

    @classmethod
    def of_weight(cls, weight: torch.Tensor) -> _IntegerWeight:
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            return cls(
                weight.int_repr(),
                weight.q_per_channel_scales().float(),
                weight.q_per_channel_zero_points().to(torch.int8),
                int(weight.q_per_channel_axis()),
            )
        return cls(
            weight.int_repr(),
            torch.tensor(weight.q_scale(), dtype=torch.float32),
            torch.tensor(weight.q_zero_point(), dtype=torch.int8),
            0,
        )

    @classmethod
    def of_bias(cls, bias: torch.Tensor, input_scale: float, weight: _IntegerWeight) -> _IntegerWeight:
        scale = (torch.tensor(input_scale, dtype=torch.float32) * weight.scale).to(torch.float32)
        values = torch.round(bias.detach().float() / scale).clamp(*_INT32).to(torch.int32)
        return cls(values, scale, torch.zeros_like(scale, dtype=torch.int32), 0)

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1

    def forward(self) -> torch.Tensor:
        return _DequantizeFn.apply(self.values, self.scale, self.zero_point, self.axis)


class QDQConv2d(nn.Module):
    """Quantized Conv2d (+ ReLU, + ReLU6 clamp) as float conv on dequantized int8 weights + output QDQ."""

    def __init__(self, conv: nnq.Conv2d, input_qparams: QParams, output_qparams: QParams) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise QCompressError(
                f"quantized conv with padding_mode={conv.padding_mode!r} cannot be exported",
                "only zero padding is supported",
            )
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        self.weight = _IntegerWeight.of_weight(conv.weight())
        bias = conv.bias()
        self.bias = None if bias is None else _IntegerWeight.of_bias(bias, input_qparams.scale, self.weight)
        self.relu = isinstance(conv, nniq.ConvReLU2d)
        clamp = _relu6_clamp(output_qparams) if isinstance(conv, QuantizedConvReLU6) else None
        self.output = QuantDequant(output_qparams, clamp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias()
        y = F.conv2d(x, self.weight(), bias, self.stride, self.padding, self.dilation, self.groups)
        return self.output(F.relu(y) if self.relu else y)


class QDQConvTranspose2d(nn.Module):
    """Quantized ConvTranspose2d (per-tensor weights: eager mode has no per-channel ones) as float
    transposed conv on dequantized int8 weights + output QDQ."""

    def __init__(self, conv: nnq.ConvTranspose2d, input_qparams: QParams, output_qparams: QParams) -> None:
        super().__init__()
        self.stride, self.padding, self.output_padding = conv.stride, conv.padding, conv.output_padding
        self.groups, self.dilation = conv.groups, conv.dilation
        self.weight = _IntegerWeight.of_weight(conv.weight())
        if self.weight.per_channel:
            raise QCompressError("per-channel transposed-conv weights cannot be exported", "use per-tensor weights")
        bias = conv.bias()
        self.bias = None if bias is None else _IntegerWeight.of_bias(bias, input_qparams.scale, self.weight)
        self.output = QuantDequant(output_qparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias()
        y = F.conv_transpose2d(x, self.weight(), bias, self.stride, self.padding, self.output_padding, self.groups,
                               self.dilation)
        return self.output(y)


class QDQLinear(nn.Module):
    """Quantized Linear (+ ReLU) as float linear on dequantized int8 weights + output QDQ."""

    def __init__(self, linear: nnq.Linear, input_qparams: QParams, output_qparams: QParams) -> None:
        super().__init__()
        self.weight = _IntegerWeight.of_weight(linear.weight())
        bias = linear.bias()
        self.bias = None if bias is None else _IntegerWeight.of_bias(bias, input_qparams.scale, self.weight)
        self.relu = isinstance(linear, nniq.LinearReLU)
        # A linear layer usually follows a flatten: re-marking its (exact) input lets ORT fuse it.
        self.input = QuantDequant(input_qparams)
        self.output = QuantDequant(output_qparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.input(x), self.weight(), None if self.bias is None else self.bias())
        return self.output(F.relu(y) if self.relu else y)


class QDQFunctional(nn.Module):
    """``FloatFunctional`` ops in float, each followed by the QDQ pair eager mode requantized to."""

    def __init__(self, outputs: dict[str, QParams]) -> None:
        super().__init__()
        self.outputs = nn.ModuleDict({name: QuantDequant(q) for name, q in outputs.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("call add / add_relu / mul / cat / add_scalar / mul_scalar instead")

    def _out(self, method: str, y: torch.Tensor) -> torch.Tensor:
        return self.outputs[method](y) if method in self.outputs else y

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._out("add", x + y)

    def add_relu(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._out("add_relu", F.relu(x + y))

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._out("mul", x * y)

    def cat(self, xs: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
        return self._out("cat", torch.cat(list(xs), dim=dim))

    def add_scalar(self, x: torch.Tensor, y: float) -> torch.Tensor:
        return self._out("add_scalar", x + y)

    def mul_scalar(self, x: torch.Tensor, y: float) -> torch.Tensor:
        return self._out("mul_scalar", x * y)


class Requantized(nn.Module):
    """A module without weights run in float, then the QDQ pair of its eager (quantized) output."""

    def __init__(self, module: nn.Module, output_qparams: QParams) -> None:
        super().__init__()
        self.module = module
        self.output = QuantDequant(output_qparams)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.output(self.module(*args, **kwargs))


def _relu6_clamp(qparams: QParams) -> tuple[int, int]:
    """The integer range the eager ``hardtanh(0, 6)`` leaves: ``[quantize(0), quantize(6)]``."""
    q = torch.quantize_per_tensor(torch.tensor([0.0, 6.0]), qparams.scale, qparams.zero_point, qparams.dtype)
    low, high = (int(v) for v in q.int_repr().tolist())
    return low, high


def _float_equivalent(module: nn.Module) -> nn.Module | None:
    """The float module computing what a weightless quantized module computes, or None if unknown."""
    if isinstance(module, nnq.ReLU6):
        return nn.ReLU6()
    if isinstance(module, nnq.Hardswish):
        return nn.Hardswish()
    if isinstance(module, nnq.LeakyReLU):
        return nn.LeakyReLU(module.negative_slope)
    if isinstance(module, nnq.ELU):
        return nn.ELU(module.alpha)
    if isinstance(module, nnq.Sigmoid):
        return nn.Sigmoid()
    if isinstance(module, nnq.Dropout):
        return nn.Identity()
    if isinstance(module, nnq.BatchNorm2d):  # an unfused BN (e.g. after a transposed conv in QAT)
        norm = nn.BatchNorm2d(module.num_features, module.eps).eval()
        norm.load_state_dict({k: v for k, v in module.state_dict().items() if k in norm.state_dict()}, strict=False)
        return norm
    if type(module).__module__.startswith(_QUANTIZED_PACKAGES):
        return None
    return module  # a float module (ReLU, MaxPool2d, Upsample...) that also runs on quantized tensors


def is_eager_int8(model: nn.Module) -> bool:
    """True for a converted eager int8 network (it quantizes its input somewhere)."""
    return any(isinstance(m, nnq.Quantize) for m in model.modules())


def quantized_engine(backend: str | None) -> contextlib.AbstractContextManager[int]:
    """Set ``torch.backends.quantized.engine`` for the block and restore it afterwards."""
    return torch_state(engine=backend)


@dataclass
class _Observed:
    inputs: dict[str, QParams] = field(default_factory=dict)
    outputs: dict[str, QParams] = field(default_factory=dict)
    functional: dict[str, dict[str, QParams]] = field(default_factory=dict)
    # DeQuantize modules: (input quantization, channels), None when called with several quantizations.
    boundaries: dict[str, tuple[QParams, int] | None] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)

    def note_boundary(self, key: str, x: torch.Tensor) -> None:
        if not (isinstance(x, torch.Tensor) and x.is_quantized and x.ndim >= 2):
            return
        value = (QParams.of(x), int(x.shape[1]))
        if key in self.boundaries and self.boundaries[key] != value:
            value = None
        self.boundaries[key] = value

    def note(self, table: dict, key: str, value: QParams | None, label: str | None = None) -> None:
        if value is None:
            return
        if key in table and table[key] != value:
            self.conflicts.append(label or key)
        table[key] = value


def _first_tensor(args: Sequence) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            found = _first_tensor(a)
            if found is not None:
                return found
    return None


def _qparams_of(value) -> QParams | None:
    return QParams.of(value) if isinstance(value, torch.Tensor) and value.is_quantized else None


@torch.inference_mode()
def _observe(model: nn.Module, sample: torch.Tensor) -> _Observed:
    """Run the eager int8 model once and note the quantization of each leaf's input and output and of
    each ``FloatFunctional`` op's output."""
    seen = _Observed()
    handles = []
    patched: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nnq.QFunctional):
            table = seen.functional.setdefault(name, {})

            def wrap(method: str, fn: Callable, key: str = name, table: dict = table):
                def recorded(*args, **kwargs):
                    out = fn(*args, **kwargs)
                    seen.note(table, method, _qparams_of(out), f"{key}.{method}")
                    return out

                return recorded

            for method in _FUNCTIONAL_METHODS:
                setattr(module, method, wrap(method, getattr(module, method)))
            patched.append(module)
            continue
        if isinstance(module, nnq.DeQuantize):
            handles.append(
                module.register_forward_pre_hook(lambda m, args, key=name: seen.note_boundary(key, args[0]))
            )
            continue
        weighted = type(module) in _CONVS + _TRANSPOSED_CONVS + _LINEARS
        if list(module.children()) and not weighted:  # quantized Linear keeps its packed params in a child
            continue
        if weighted:  # their int32 bias scale depends on the input scale
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, key=name: seen.note(seen.inputs, key, _qparams_of(_first_tensor(args)))
                )
            )
        handles.append(
            module.register_forward_hook(
                lambda m, args, out, key=name: seen.note(seen.outputs, key, _qparams_of(out))
            )
        )
    try:
        with quiet_torch_ao():
            model(sample)
    finally:
        for h in handles:
            h.remove()
        for module in patched:
            for method in _FUNCTIONAL_METHODS:
                module.__dict__.pop(method, None)
    return seen


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def qdq_twin(int8_model: nn.Module, sample: torch.Tensor) -> tuple[nn.Module, TwinRecord]:
    """Float twin of a converted eager int8 network (see the module docstring); ``int8_model`` is untouched.

    ``sample`` is one preprocessed batch: the int8 model runs on it once so that every quantization
    point's scale and zero point is read off the tensors the eager kernels produce.
    """
    model = int8_model.eval()
    seen = _observe(model, sample)
    if seen.conflicts:
        raise QCompressError(
            "layers run more than once with different quantization: "
            + ", ".join(sorted(set(seen.conflicts))[:5]),
            "ONNX export needs one scale per layer output; do not share quantized layers",
        )
    with quiet_torch_ao():
        return _build_twin(model, seen)


def _build_twin(model: nn.Module, seen: _Observed) -> tuple[nn.Module, TwinRecord]:
    twin = copy.deepcopy(model)
    record = TwinRecord()
    unsupported: list[str] = []
    replaced: tuple[str, ...] = ()
    for name, module in list(model.named_modules()):
        if not name or name.startswith(replaced):
            continue
        if type(module) in _CONVS + _TRANSPOSED_CONVS + _LINEARS or isinstance(module, nnq.QFunctional):
            replaced += (name + ".",)  # their children (packed params, observers) go with them
        output = seen.outputs.get(name)
        if isinstance(module, nnq.QFunctional):
            _replace(twin, name, QDQFunctional(seen.functional.get(name, {})))
            record.activation_points += len(seen.functional.get(name, {}))
        elif isinstance(module, nnq.Quantize):
            qparams = QParams(
                float(np.float32(module.scale.item())), int(module.zero_point.item()), module.dtype
            )
            _replace(twin, name, QuantDequant(qparams))
            record.activation_points += 1
        elif isinstance(module, nnq.DeQuantize):
            boundary = seen.boundaries.get(name)
            _replace(twin, name, FloatBoundary(*boundary) if boundary else nn.Identity())
        elif type(module) in _CONVS:
            if name not in seen.inputs or output is None:
                continue  # never ran on the sample: nothing to export
            twin_conv = QDQConv2d(module, seen.inputs[name], output)
            _replace(twin, name, twin_conv)
            record.int8_convs += 1
            record.activation_points += 1
            record.weight_granularity.add("per-channel" if twin_conv.weight.per_channel else "per-tensor")
        elif type(module) in _TRANSPOSED_CONVS:
            if name not in seen.inputs or output is None:
                continue
            _replace(twin, name, QDQConvTranspose2d(module, seen.inputs[name], output))
            record.int8_convs += 1
            record.activation_points += 1
            record.weight_granularity.add("per-tensor")
        elif type(module) in _LINEARS:
            if name not in seen.inputs or output is None:
                continue
            twin_linear = QDQLinear(module, seen.inputs[name], output)
            _replace(twin, name, twin_linear)
            record.int8_linears += 1
            record.activation_points += 1
            record.weight_granularity.add("per-channel" if twin_linear.weight.per_channel else "per-tensor")
        elif list(module.children()):
            continue
        elif isinstance(module, (nn.Identity, nn.Dropout)):
            continue  # the quantized tensor passes through unchanged
        else:
            equivalent = _float_equivalent(module)
            if equivalent is None:
                unsupported.append(f"{name} ({type(module).__name__})")
            elif output is not None:
                _replace(twin, name, Requantized(equivalent, output))
                record.activation_points += 1
            elif isinstance(module, (nn.Conv2d, nn.Linear, nni.ConvReLU2d, nni.LinearReLU)) or any(
                True for _ in module.parameters(recurse=False)
            ):
                record.float_layers.append(name)
    if unsupported:
        raise QCompressError(
            f"cannot export these int8 layers to ONNX: {', '.join(unsupported[:6])}"
            + (f" and {len(unsupported) - 6} more" if len(unsupported) > 6 else ""),
            "keep them float with --skip, or export the float model",
        )
    return twin.eval(), record


__all__ = [
    "FloatBoundary",
    "QDQConv2d",
    "QDQConvTranspose2d",
    "QDQFunctional",
    "QDQLinear",
    "QParams",
    "QuantDequant",
    "Requantized",
    "TwinRecord",
    "is_eager_int8",
    "qdq_twin",
    "quantized_engine",
]
