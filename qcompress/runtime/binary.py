"""Bitpacked XNOR-popcount convolution for the binary layers of :mod:`qcompress.quant.lowbit`.

:class:`BinaryConv2d` computes what a binary :class:`~qcompress.quant.lowbit.LowBitConv2d` computes,
and :class:`BinaryLinear` what a binary :class:`~qcompress.quant.lowbit.LowBitLinear` computes, with
1-bit operations instead of a float convolution (matrix product) of fake-quantized tensors.

The identity. The fake-quantized input is ``a = K s + mu_c`` with ``s = sign((x - mu_c) / K)`` in
{-1, +1} (0 -> +1, as ``sign_ste``) inside the image, and ``a = 0`` at the taps that zero padding
adds: the conv pads *after* quantizing, so a padded tap is 0, not ``mu_c +- K``. The weight is
``alpha_o w`` with ``w = sign(W)`` (0 -> +1) and ``alpha_o = mean|W_o|`` (or XNOR-Net++'s learned scale,
``--binary-scale learned``). Over the taps ``t`` that lie inside the image at output position ``p``::

    out[o, p] = alpha_o * (K * sum_valid s w  +  sum_valid mu_c w) + bias_o

- ``sum_valid s w`` is integer. Bits are 1 for +1, channels packed 64 to a ``uint64`` word, and
  padded taps packed as all-zero words. For a tap inside the image ``sum_c s w = C - 2 popcount(x ^ w)``
  (channels past ``C`` are 0 in both words, so they never count); a padded tap adds
  ``popcount(w_t)``, the number of +1 weights of tap ``t``, to the popcount sum ``P``. So
  ``sum_valid s w = C * n_valid(p) + 2 * sum_{t padded at p} popcount(w_t) - 2 P[o, p]``. The first
  two terms depend only on the position, and are computed once per input size.
- ``sum_valid mu_c w`` does not depend on the input: ``sum_{t valid at p} m[o, t]`` with
  ``m[o, t] = sum_c mu_c w[o, c, t]``, a one-channel float64 conv of an all-ones image (the zero
  padding of that conv removes the padded taps), also once per input size.

Per input size this leaves ``out = offset[o, p] + alpha_o K * (sums[p] - 2 P[o, p])``: the
bracket is an exact integer (float32 holds integers below 2**24 exactly), ``offset`` is
``alpha_o * sum_valid mu_c w + bias_o``, both maps are computed in float64 and kept in the output
dtype, so the only roundings are the final multiply and add (the fake-quant reference rounds
more: every product of its float conv). Where all taps lie inside the image both maps are one
number per output channel, and the kernels read the maps only at the borders. The kernels are in
:mod:`qcompress.runtime._binary_kernels`.

Linear layers. A Linear on ``N`` rows of ``C`` features is a 1x1 conv without padding whose ``N`` output
positions are the rows: ``out[m, o] = alpha_o * (K * (C - 2 P[o, m]) + sum_c mu_c w_oc) + bias_o``,
every position interior, so no border map is needed. :class:`BinaryLinear` packs the rows word-major
(word ``k`` of row ``m`` at ``k * N + m``: one "image" of ``N x 1`` pixels whose taps are its words),
so the conv kernels take 8 rows x 4 output features per register block and split the rows into
parallel jobs; one small kernel of its own binarizes and packs the (N, C) rows in place of a
transpose to channels-first. Rows per job: about 128 KiB of packed input (40 rows of fc6's 25088
features), so that the rows stay in L2 while all output features pass over them.

Why ``K`` must be one number per layer. ``sum_c K_c s_c w_c`` with a different ``K_c`` per input
channel is a weighted count: no popcount of XNOR bits computes it, and folding ``K_c`` into the
weights makes them non-binary. Splitting ``K_c`` into bit planes would be exact only to the number
of planes and cost one popcount pass per plane. So the engine converts only layers whose
activation scale is shared by all input channels (``mu`` may differ per channel: it only enters the
precomputed map), which is XNOR-Net's form and ``BinaryActivationQuantizer(calibrate=False)``'s
(``K = 1``). With ``shared_scale=False`` the quantizer gives every channel its own ``K``: such layers
are refused by :meth:`BinaryConv2d.from_lowbit` (and :meth:`BinaryLinear.from_lowbit`) and left as
they are by :func:`convert_binary`, which says why. Running them on this engine needs a model trained
with a shared scale.

Spatial scale (``qat --binary-scale spatial``, XNOR-Net's ``K(x)``): the layer multiplies the integer sums
by one float per output position, the input's channel mean of ``|x - mu|`` box-filtered over the taps
(Linear: per row), so ``out = offset[o, p] + alpha_o K(x)[p] sum_valid s w``: one numba pass computes ``K(x)`` (the
channel mean of ``|x - mu|``, box-filtered; a Linear: the row means) and the conv kernels' epilogue applies it
(``(sums - 2 P) * K(x) * alpha_o + offset``, no pass of its own).

Column grouping: a layer whose kernel row of channels fits one word (``C * KW <= 64``, stride and dilation 1
across: VGG's 16-channel 3x3 layers of a narrow network) packs ``KW`` adjacent pixels into each word and runs as
a ``KH x 1`` conv of ``KW * C`` channels, ``KW`` times fewer popcounts; the border maps stay per original tap.

ReLU: :func:`convert_binary` moves a ``nn.ReLU`` that follows a converted layer in a ``nn.Sequential`` into its
epilogue (``relu=True``; the ReLU becomes Identity): the kernels clamp each output as they write it.

Transposed convs (:class:`BinaryConvTranspose2d`): output ``Y = s m + a`` of a stride-``s`` transposed conv
reads inputs ``i = m + q - t`` through taps ``ky = s t + r`` (``q, r`` from ``a + padding``), a plain
correlation per output phase; so the layer runs as ``s_h x s_w`` :class:`BinaryConv2d` (each with the
layer's ``alpha``, ``mu``, ``K``, bias) whose outputs interleave. Inputs outside the image add nothing,
which is the engine's zero padding after quantization.

BatchNorm (:func:`fold_batchnorm`, ``convert_binary(fold_bn=True)``): a BN after a binary conv folds into
its ``alpha`` (``|g|``), weight signs (``sign g``) and bias, exactly; the epilogue then applies it.

Kernels (``kernel=`` or the environment variable ``QCOMPRESS_BINARY_KERNEL``): ``vector`` (default)
uses 4 x 64-bit vectors of LLVM, counting per byte (AVX2 ``vpshufb`` look-ups) or, on CPUs with
AVX512-VPOPCNTDQ, per 64-bit lane (``vector-wide``; ``vector-bytes`` forces the byte counting);
``portable`` is plain scalar code, slower, for checking and for CPUs where the vector code is a
problem. Compiled kernels are cached on disk by numba. Thread count: numba's
(``numba.set_num_threads``), as the caller sets it. Inference only: no gradient flows through.

Speed (``benchmarks/binary_conv.py --clock cpu``, 1 thread, AMD EPYC Zen 3 with AVX2 and no
AVX-512): 3x3 convs of 128-512 channels at 19x19-38x38 run 4.4-5.9x faster than torch's fp32 conv
and 2.5-3.1x faster than its eager int8 conv; 1x1 convs of 256-512 channels 2.8-4.0x faster than
fp32. Without a vector popcount, AVX2 counts 256 bits with 8 vector operations (two ``vpshufb``
nibble look-ups and their masks, shifts and adds); the XNOR-popcount loop alone measures about
5 x 10**9 words (320 binary GMAC) a second, against 40-45 GMAC for fp32, so it cannot reach 8x
fp32 on such a CPU; 1x1 layers also pay for binarizing and packing every input value (about half
the time of their popcounts). With AVX512-VPOPCNTDQ, ``vector-wide`` counts a 4-word vector in one
``vpopcntq`` (not measured here). Linear layers (``--layers linear``, same CPU, under load): fc6 of
Faster R-CNN VGG16 on 300 RoIs (300 x 25088 -> 4096) 122.8 ms against 944.5 ms for fp32 ``F.linear``
(7.7x) and 458 ms for torch's static int8 Linear (3.7x); fc7 (300 x 4096 -> 4096) 6.3x and 3.0x.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcompress.errors import QCompressError
from qcompress.quant.lowbit import (
    BinaryActivationQuantizer,
    BinaryWeightQuantizer,
    LowBitConv2d,
    LowBitConvTranspose2d,
    LowBitLinear,
    _out_channels_first,
)

KERNELS = ("auto", "vector", "vector-bytes", "vector-wide", "portable")
KERNEL_ENV = "QCOMPRESS_BINARY_KERNEL"
INSTRUCTION_SETS = ("popcnt", "avx2", "avx512f", "avx512_vpopcntdq", "avx512_bitalg", "avx512_vnni")
_MAX_PLANS = 8
# output positions a parallel job covers at most: its packed rows and counts stay in L1/L2 while
# every output block passes over them (fewer, longer jobs measured faster up to a whole 38x38 map)
_POSITIONS_PER_JOB = 4096
# packed input bytes a parallel job of a Linear covers at most: its rows stay in L2 while every block
# of output features passes over them (300 x 25088 -> 4096: 40-row jobs measured ~20 % faster than
# one 300-row job; 300 x 4096 -> 4096 slower in 16-row jobs, which re-read all weights more often)
_LINEAR_JOB_BYTES = 128 * 1024


# ------------------------------------------------------------------------------------- the CPU
@dataclass(frozen=True)
class CpuInfo:
    """The CPU model and which of :data:`INSTRUCTION_SETS` it has."""

    model: str
    instruction_sets: dict[str, bool]


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """CPU model and instruction sets, from ``/proc/cpuinfo`` or else from LLVM's host features."""
    model, flags = "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    if not flags:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
        llvm_names = {
            "avx512_vpopcntdq": "avx512vpopcntdq",
            "avx512_bitalg": "avx512bitalg",
            "avx512_vnni": "avx512vnni",
        }
        flags = {name for name in INSTRUCTION_SETS if features.get(llvm_names.get(name, name), False)}
        model = model if model != "unknown" else llvm.get_host_cpu_name()
    return CpuInfo(model, {name: name in flags for name in INSTRUCTION_SETS})


def resolve_kernel(kernel: str = "auto") -> str:
    """The kernel ``kernel`` means here: ``auto`` reads ``QCOMPRESS_BINARY_KERNEL``, then picks
    ``vector-wide`` where AVX512-VPOPCNTDQ counts 64-bit lanes in one instruction, else ``vector-bytes``."""
    if kernel == "auto":
        kernel = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    if kernel not in KERNELS:
        raise QCompressError(f"unknown binary kernel {kernel!r}", f"use one of: {', '.join(KERNELS)}")
    if kernel in ("auto", "vector"):
        return "vector-wide" if cpu_info().instruction_sets["avx512_vpopcntdq"] else "vector-bytes"
    return kernel


# ---------------------------------------------------------------------------------- the layer
def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _output_scale(w: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """The per-output-channel weight scale: ``alpha`` when given (learned, XNOR-Net++), else mean|W_o|."""
    if alpha is None:
        return w.abs().mean(dim=tuple(range(1, w.ndim)))
    alpha = alpha.detach().float().cpu().reshape(-1).clone()
    if alpha.numel() != w.shape[0]:
        raise QCompressError(f"alpha has {alpha.numel()} values for {w.shape[0]} outputs",
                             "pass one per output channel")
    return alpha


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            raise QCompressError(
                "padding='same' with an even receptive field pads one side more", "pad explicitly"
            )
        return totals[0] // 2, totals[1] // 2
    return _pair(conv.padding)


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot run on the engine (a :class:`LowBitConv2d` on :class:`BinaryConv2d`, a
    :class:`LowBitLinear` on :class:`BinaryLinear`), or None when it can."""
    if not isinstance(layer, (LowBitConv2d, LowBitConvTranspose2d, LowBitLinear)):
        return "not a LowBitConv2d, LowBitConvTranspose2d or LowBitLinear"
    wq, aq = layer.weight_quantizer, layer.input_quantizer
    if not isinstance(wq, BinaryWeightQuantizer) or not isinstance(aq, BinaryActivationQuantizer):
        return "weight and input quantizers are not both binary"
    if isinstance(layer, LowBitConvTranspose2d):
        conv = layer.conv
        if conv.groups != 1 or tuple(conv.dilation) != (1, 1):
            return f"transposed conv with groups={conv.groups}, dilation={tuple(conv.dilation)} (the engine: 1, (1, 1))"
        if any(k < s for k, s in zip(conv.kernel_size, conv.stride)):
            return f"transposed conv kernel {tuple(conv.kernel_size)} smaller than its stride {tuple(conv.stride)}"
    if isinstance(layer, LowBitConv2d):
        conv = layer.conv
        if conv.groups != 1:
            return f"groups={conv.groups} (grouped and depthwise convs stay float)"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} (only zero padding)"
    if not bool(aq.initialized):
        return "the input quantizer saw no data yet (mu and K are not set)"
    scale = aq.scale.detach()
    if not bool((scale == scale.reshape(-1)[0]).all()):
        return (
            f"per-channel activation scale K ({float(scale.min()):.4g}..{float(scale.max()):.4g}): "
            "XNOR-popcount needs one K per layer"
        )
    return None


def _refuse_unsupported(layer: nn.Module) -> None:
    """from_lowbit's check: the layer must have an exact XNOR-popcount form (see the module docstring)."""
    reason = unsupported_reason(layer)
    if reason is not None:
        raise QCompressError(
            f"cannot run this layer on the binary engine: {reason}",
            "leave it float (convert_binary does) or train with one activation scale per layer",
        )


class _EngineLayer(nn.Module):
    """What the engine's layers share: the input checks, the per-dtype binarizer arrays and the caches
    dropped when buffers move or load. Subclasses set ``_inputs`` (channels or features) and
    ``_clear_caches``."""

    _inputs: int

    def _clear_caches(self) -> None:
        self._binarizers: dict[torch.dtype, tuple[np.ndarray, np.ndarray]] = {}

    def _apply(self, fn, recurse=True):
        self._clear_caches()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._clear_caches()
        super()._load_from_state_dict(*args, **kwargs)

    spatial: bool = False
    relu: bool = False  # the ReLU after the layer, applied in its epilogue (convert_binary sets it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, counts=False)

    def _run(self, x: torch.Tensor, counts: bool) -> torch.Tensor:
        raise NotImplementedError

    def _epilogue_args(self, dtype: np.dtype, counts: bool, kmap: np.ndarray | None = None,
                       alpha: np.ndarray | None = None) -> tuple:
        """The kernels' ``scaled`` argument: the spatial form's ``K(x)`` map and ``alpha`` (or empty arrays for the
        affine form) and the floor every output is clamped to (0 for a fused ReLU, -inf for none; counts: none)."""
        floor = np.array([0.0 if self.relu and not counts else -np.inf], dtype)
        if kmap is None:
            empty = np.zeros(0, dtype)
            return (empty, empty, floor, False)
        return (kmap, alpha, floor, True)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the layer computes in (``x``'s promoted with the buffers'); refuses other devices and
        dtypes."""
        if x.device.type != "cpu":
            raise QCompressError(
                f"the binary engine runs on the CPU, got a {x.device.type} tensor", "call .cpu()"
            )
        dtype = torch.promote_types(x.dtype, self.mu.dtype)
        if dtype not in (torch.float32, torch.float64):
            raise QCompressError(f"the binary engine takes float32 or float64 input, got {x.dtype}", "")
        return dtype

    # mu and K per input channel in dtype, as numpy arrays (cached)
    def _binarizer(self, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._binarizers.get(dtype)
        if arrays is None:
            mu = self.mu.to(dtype).numpy()
            scale = self.scale.to(dtype).expand(self._inputs).contiguous().numpy()
            arrays = self._binarizers[dtype] = (mu, scale)
        return arrays


class BinaryConv2d(_EngineLayer):
    """A binary conv on bitpacked XNOR-popcount kernels; same output as the fake-quant layer.

    Input: float (N, C, H, W) on the CPU. Output: (N, O, OH, OW) in the input's dtype (after
    promotion with the layer's buffers, as the fake-quant layer). Inference only.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        mu: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        kernel: str = "auto",
        spatial: bool = False,
        alpha: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spatial = spatial
        if weight.ndim != 4:
            raise QCompressError(
                f"weight must be (O, C, KH, KW), got {tuple(weight.shape)}", "pass a conv weight"
            )
        if scale <= 0:
            raise QCompressError(f"activation scale K must be positive, got {scale}", "check the quantizer")
        resolve_kernel(kernel)
        self.out_channels, self.in_channels, kh, kw = weight.shape
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.kernel = kernel
        w = weight.detach().float().cpu()
        signs = w >= 0
        # Column grouping: where a whole kernel row of channels fits one word (C * KW <= 64, stride and
        # dilation 1 across), a packed word holds KW adjacent pixels and each kernel row is one word-tap,
        # KW times fewer popcounts; the weights are those of a (KH x 1) conv on KW * C channels.
        self._group = kw if kw > 1 and self.in_channels * kw <= 64 and self.stride[1] == self.dilation[1] == 1 else 1
        word_signs = signs if self._group == 1 else signs.permute(0, 3, 1, 2).reshape(
            self.out_channels, kw * self.in_channels, kh, 1)
        packed = _pack_weight(word_signs.numpy())
        self.register_buffer("packed_weight", torch.from_numpy(packed.view(np.int64)))
        self.register_buffer("alpha", _output_scale(w, alpha))
        self.register_buffer("mu", mu.detach().float().cpu().reshape(-1).clone())
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().cpu().clone())
        plus = signs.double()
        self.register_buffer("plus_taps", plus.sum(dim=1))  # (O, KH, KW): +1 weights per tap
        self.register_buffer("mu_taps", torch.einsum("c,ocij->oij", self.mu.double(), 2 * plus - 1))
        if self.mu.numel() != self.in_channels:
            raise QCompressError(f"mu has {self.mu.numel()} values for {self.in_channels} channels", "")
        self._clear_caches()

    @classmethod
    def from_lowbit(cls, layer: LowBitConv2d, kernel: str = "auto") -> BinaryConv2d:
        """The engine's twin of a binary ``layer`` (weights packed once); raises QCompressError when
        the layer has no exact XNOR-popcount form (see the module docstring)."""
        _refuse_unsupported(layer)
        conv = layer.conv
        aq = layer.input_quantizer
        return cls(
            conv.weight,
            aq.offset,
            float(aq.scale.reshape(-1)[0]),
            conv.bias,
            conv.stride,
            _conv_padding(conv),
            conv.dilation,
            kernel,
            aq.spatial,
            layer.weight_quantizer.output_scale(conv.weight),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, kernel={self.kernel!r}"
            + (", spatial scale" if self.spatial else "")
            + (", relu" if self.relu else "")
        )

    @property
    def _inputs(self) -> int:
        return self.in_channels

    def _clear_caches(self) -> None:
        super()._clear_caches()
        self._plans: dict[tuple[int, int], _Plan] = {}

    # ------------------------------------------------------------------------------ forward

    def xnor_counts(self, x: torch.Tensor) -> torch.Tensor:
        """sum over in-image taps and channels of s * w (the integer part of the conv), int64
        (N, O, OH, OW); computed by the same popcount kernels as :meth:`forward`."""
        if self.in_channels * self.kernel_size[0] * self.kernel_size[1] >= 2**24:
            raise QCompressError("counts of this layer do not fit float32's integers", "")
        return self._run(x, counts=True).round().to(torch.int64)

    def _run(self, x: torch.Tensor, counts: bool) -> torch.Tensor:
        from qcompress.runtime import _binary_kernels as kernels

        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise QCompressError(
                f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}",
                "check the model's input",
            )
        dtype = self._compute_dtype(x)
        n, _, height, width = x.shape
        plan = self._plan(height, width)
        xs = x.detach().to(dtype).contiguous().numpy().reshape(n, self.in_channels, height * width)
        packed = self._pack(xs, width, plan)
        # counts are integers below 2**24: exact in float32, and no extra compiled kernel
        out_dtype = np.dtype(np.float32) if counts else xs.dtype
        out = np.empty((n, self.out_channels, plan.out_h, plan.out_w), out_dtype)
        weights = self.packed_weight.numpy().view(np.uint64)
        rows = _rows_per_job(n, plan.out_h, plan.wq)
        if self.spatial and not counts:
            # XNOR-Net's scaled form (:func:`~qcompress.quant.lowbit.binary_spatial`): ``offset + alpha_o *
            # K(x)[p] * sum_valid s w``, K(x) the box-filtered channel mean of |x - mu|, applied in the kernels'
            # epilogue
            mu, alpha, geometry = plan.spatial_arrays(self, dtype)
            kmap = np.empty(n * plan.out_h * plan.out_w, out_dtype)
            _spatial_scale_map()(xs, width, mu, *geometry, kmap.reshape(n, plan.out_h, plan.out_w))
            scaled = self._epilogue_args(out_dtype, counts, kmap, alpha)
        else:
            scaled = self._epilogue_args(out_dtype, counts)
        args = (packed, weights, plan.offsets, plan.wq, rows, plan.affine(out_dtype, counts), out)
        kind = resolve_kernel(self.kernel)
        if kind == "portable":
            kernels.conv_portable(*args, scaled)
        else:
            kernels.conv_vector(*args, kind == "vector-wide", scaled)
        return torch.from_numpy(out)

    def _pack(self, xs: np.ndarray, width: int, plan: _Plan) -> np.ndarray:
        """(N, C, H * W) input values -> (N, plan.words) packed signs in the kernels' layout."""
        from qcompress.runtime import _binary_kernels as kernels

        mu, scale = self._binarizer(torch.from_numpy(xs[:0]).dtype)
        packed = np.zeros((xs.shape[0], plan.words), np.uint64)
        (ph, pw), (sh, sw) = self.padding, self.stride
        kernels.pack_input(xs, width, mu, scale, ph, pw, sh, sw, plan.hq, plan.wq, packed)
        if self._group == 1:
            return packed
        grouped = np.empty_like(packed)
        kernels.group_columns(packed, self.in_channels, self._group, grouped)
        return grouped

    def _plan(self, height: int, width: int) -> _Plan:
        plan = self._plans.get((height, width))
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[(height, width)] = self._make_plan(height, width)
        return plan

    @torch.no_grad()
    def _make_plan(self, height: int, width: int) -> _Plan:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        hp, wp = height + 2 * ph, width + 2 * pw
        out_h, out_w = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
        if out_h < 1 or out_w < 1:
            raise QCompressError(f"input {height}x{width} is smaller than the receptive field", "")
        hq, wq = -(-hp // sh), -(-wp // sw)
        plane = hq * wq
        n_words = -(-self.in_channels // 64)
        offsets = np.array(
            [
                ((word * sh + ky * dh % sh) * sw + kx * dw % sw) * plane
                + (ky * dh // sh) * wq
                + kx * dw // sw
                for ky in range(kh)
                for kx in range(0, kw, self._group)  # grouped: one word-tap per kernel row
                for word in range(n_words)
            ],
            np.int64,
        )
        # the last stream block reads up to 2 vectors past the last output of the last plane
        words = n_words * sh * sw * plane + wq + 4 * 8

        ones = torch.ones(1, 1, height, width, dtype=torch.float64)

        def valid_sum(per_tap: torch.Tensor) -> torch.Tensor:  # sum over in-image taps, (O, OH, OW)
            return F.conv2d(ones, per_tap.unsqueeze(1), None, self.stride, self.padding, self.dilation)[0]

        n_valid = valid_sum(torch.ones(1, kh, kw, dtype=torch.float64))
        padded_plus = self.plus_taps.sum(dim=(1, 2)).view(-1, 1, 1) - valid_sum(self.plus_taps)
        sums = self.in_channels * n_valid + 2 * padded_plus  # sum_valid s w = sums - 2 P
        alpha = self.alpha.double()
        offset = alpha.view(-1, 1, 1) * valid_sum(self.mu_taps)
        if self.bias is not None:
            offset = offset + self.bias.double().view(-1, 1, 1)
        # outputs whose taps all lie inside the image: there both maps are one number per channel
        row0, col0 = -(-ph // sh), -(-pw // sw)
        row1 = min(out_h, max(row0, (height - 1 + ph - dh * (kh - 1)) // sh + 1))
        col1 = min(out_w, max(col0, (width - 1 + pw - dw * (kw - 1)) // sw + 1))
        if row0 >= row1 or col0 >= col1:
            row0 = row1 = col0 = col1 = 0
        return _Plan(
            hq=hq,
            wq=wq,
            words=words,
            out_h=out_h,
            out_w=out_w,
            offsets=offsets,
            interior=(row0, row1, col0, col1),
            sums=sums,
            offset=offset,
            gain=alpha * float(self.scale),
        )


# Layout and border maps for one input size; affine() gives the kernels' epilogue arguments.
@dataclass
class _Plan:
    hq: int
    wq: int
    words: int
    out_h: int
    out_w: int
    offsets: np.ndarray
    interior: tuple[int, int, int, int]
    sums: torch.Tensor  # float64 (O, OH, OW), integer valued
    offset: torch.Tensor  # float64 (O, OH, OW)
    gain: torch.Tensor  # float64 (O,)
    _affine: dict[tuple[np.dtype, bool], tuple] = field(default_factory=dict)
    _spatial: dict[torch.dtype, tuple] = field(default_factory=dict)

    def spatial_arrays(self, layer: BinaryConv2d, dtype: torch.dtype) -> tuple:
        """``(mu, alpha, (kernel, stride, padding, dilation) int64 pairs)`` as numpy arrays in ``dtype`` for the
        spatial scale's kernels (cached: converting them each call cost more than the kernels on small maps)."""
        if dtype not in self._spatial:
            geometry = tuple(np.array(pair, np.int64)
                             for pair in (layer.kernel_size, layer.stride, layer.padding, layer.dilation))
            self._spatial[dtype] = (layer.mu.to(dtype).numpy(), layer.alpha.to(dtype).numpy(), geometry)
        return self._spatial[dtype]

    # The kernels' affine argument (see conv_vector) in dtype; with counts the gain is 1 and the
    # offset 0, so the kernels return sum_valid s w.
    def affine(self, dtype: np.dtype, counts: bool) -> tuple:
        key = (np.dtype(dtype), counts)
        if key not in self._affine:
            tdtype = torch.from_numpy(np.zeros(0, dtype)).dtype
            offset = torch.zeros_like(self.offset) if counts else self.offset
            gain = torch.ones_like(self.gain) if counts else self.gain
            row0, _, col0, col1 = self.interior
            at = (slice(None), min(row0, self.out_h - 1), min(col0, self.out_w - 1))
            edge_columns = [*range(col0), *range(col1, self.out_w)] if col0 < col1 else []

            def as_array(t: torch.Tensor) -> np.ndarray:
                return t.to(tdtype).contiguous().numpy()

            self._affine[key] = (
                as_array(self.sums),
                as_array(offset),
                as_array(gain),
                as_array(self.sums[at]),
                as_array(offset[at]),
                np.array(self.interior, np.int64),
                as_array(self.sums[:, :, edge_columns]),
                as_array(offset[:, :, edge_columns]),
            )
        return self._affine[key]


def _rows_per_job(n_images: int, out_h: int, row_words: int) -> int:
    from numba import get_num_threads

    threads = get_num_threads()
    jobs = max(
        -(-out_h * row_words // _POSITIONS_PER_JOB), 0 if threads == 1 else -(-2 * threads // n_images)
    )
    return -(-out_h // min(out_h, jobs))


# (O, C, KH, KW) booleans -> flat uint64 (ceil(O / 4), KH * KW * words, 4), tap-major, bit c % 64 of
# word c // 64 set for a +1 weight; missing channels and outputs are 0.
def _pack_weight(signs: np.ndarray) -> np.ndarray:
    from qcompress.runtime._binary_kernels import BLOCK_OUT

    o, c, kh, kw = signs.shape
    n_words = -(-c // 64)
    bits = np.zeros((-(-o // BLOCK_OUT) * BLOCK_OUT, kh, kw, n_words * 64), np.bool_)
    bits[:o, :, :, :c] = signs.transpose(0, 2, 3, 1)
    words = np.packbits(bits.reshape(*bits.shape[:3], n_words, 64), axis=-1, bitorder="little")
    words = (
        np.ascontiguousarray(words).view("<u8").astype(np.uint64).reshape(-1, BLOCK_OUT, kh * kw * n_words)
    )
    return np.ascontiguousarray(words.transpose(0, 2, 1)).reshape(-1)


# --------------------------------------------------------------------------- transposed convs
def _phases(kernel: int, stride: int, padding: int, output_padding: int, length: int
            ) -> list[tuple[int, list[int], int, int, int]]:
    """The sub-pixel form of a 1-D transposed conv on ``length`` inputs: output ``Y = stride * m + a`` reads
    inputs ``i = m + q - t`` through kernel taps ``ky = stride * t + r`` (``r, q = divmod``-parts of ``a +
    padding``), i.e. a plain correlation with the taps ``[ky(T-1), ..., ky(0)]`` and left padding
    ``T - 1 - q``. Per phase ``a``: ``(a, taps, conv padding, first output to keep, outputs)``, the padding
    symmetric (the engine's) and large enough for both ends, the kept outputs starting at ``first``."""
    out_len = (length - 1) * stride - 2 * padding + kernel + output_padding
    phases = []
    for a in range(stride):
        q, r = divmod(a + padding, stride)
        taps = list(range(r, kernel, stride))[::-1]  # ky for t = T-1 .. 0
        count = -(-(out_len - a) // stride) if out_len > a else 0
        left = len(taps) - 1 - q
        pad = max(left, 0, count - 1 + q - (length - 1))
        phases.append((a, taps, pad, pad - left, count))
    return phases


class BinaryConvTranspose2d(nn.Module):
    """A binary transposed conv (:class:`~qcompress.quant.lowbit.LowBitConvTranspose2d`) as ``stride_h x
    stride_w`` binary convs on the input, one per output phase (the sub-pixel form: output ``(s m + a)``
    reads a fixed subset of the kernel taps), run by :class:`BinaryConv2d` and interleaved into the
    output. Each phase keeps the layer's ``alpha`` (the mean over the *whole* kernel, or the learned
    scale), ``mu``, ``K`` and bias, and the inputs outside the image add nothing, as in the transposed conv,
    so the result is the fake-quant layer's. Groups 1, dilation 1, kernel >= stride (else
    :func:`convert_binary` leaves the layer float)."""

    def __init__(self, weight: torch.Tensor, mu: torch.Tensor, scale: float, bias: torch.Tensor | None,
                 stride: Sequence[int], padding: Sequence[int], output_padding: Sequence[int],
                 alpha: torch.Tensor | None = None, kernel: str = "auto") -> None:
        super().__init__()
        w = _out_channels_first(weight.detach().float().cpu(), 1)  # (in, out, kh, kw) -> (out, in, kh, kw)
        self.out_channels, self.in_channels, kh, kw = w.shape
        self.stride, self.padding, self.output_padding = _pair(stride), _pair(padding), _pair(output_padding)
        alpha = _output_scale(w, alpha)
        self.geometry = (kh, kw)
        self.phases = nn.ModuleList()
        self._layout: list[tuple[int, int, int, int]] = []
        # the paddings and first outputs do not depend on the input size (any size with outputs in every phase)
        for ay, ty, py, fy, _ in _phases(kh, self.stride[0], self.padding[0], self.output_padding[0], 64):
            for ax, tx, px, fx, _ in _phases(kw, self.stride[1], self.padding[1], self.output_padding[1], 64):
                sub = w[:, :, ty][:, :, :, tx].contiguous()  # (out, in, Ty, Tx)
                self.phases.append(BinaryConv2d(sub, mu, scale, bias, 1, (py, px), 1, kernel, alpha=alpha))
                self._layout.append((ay, ax, fy, fx))

    @classmethod
    def from_lowbit(cls, layer: LowBitConvTranspose2d, kernel: str = "auto") -> BinaryConvTranspose2d:
        _refuse_unsupported(layer)
        conv, aq = layer.conv, layer.input_quantizer
        alpha = layer.weight_quantizer.output_scale(_out_channels_first(conv.weight, conv.groups))
        return cls(conv.weight, aq.offset, float(aq.scale.reshape(-1)[0]), conv.bias, conv.stride, conv.padding,
                   conv.output_padding, alpha, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (oh, ow) = self.geometry, self.stride, self.padding, self.output_padding
        rows, cols = _phases(kh, sh, ph, oh, h), _phases(kw, sw, pw, ow, w)
        out_h, out_w = (h - 1) * sh - 2 * ph + kh + oh, (w - 1) * sw - 2 * pw + kw + ow
        out = None
        for conv, (ay, ax, fy, fx) in zip(self.phases, self._layout):
            count_y, count_x = rows[ay][4], cols[ax][4]
            if count_y == 0 or count_x == 0:
                continue
            z = conv(x)
            if out is None:
                out = z.new_empty(n, self.out_channels, out_h, out_w)
            out[:, :, ay::sh, ax::sw] = z[:, :, fy:fy + count_y, fx:fx + count_x]
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.geometry}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, {len(self.phases)} phases")


# ------------------------------------------------------------------------------ linear layers
class BinaryLinear(_EngineLayer):
    """A binary Linear on the bitpacked XNOR-popcount kernels; same output as the fake-quant
    :class:`~qcompress.quant.lowbit.LowBitLinear`.

    Input: float (N, C) on the CPU (N rows: RoIs, images). Output: (N, O) in the input's dtype (after
    promotion with the layer's buffers, as the fake-quant layer). Inference only.

    It runs as a 1x1 conv whose output positions are the rows (see the module docstring): the rows are
    binarized and packed word-major (bit ``c % 64`` of word ``c // 64`` of row ``m`` at ``word * N + m``)
    by a kernel of its own, so eight consecutive rows are two 4-word vectors for the conv kernels, and
    the jobs split the rows.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        mu: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None = None,
        kernel: str = "auto",
        spatial: bool = False,
        alpha: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spatial = spatial
        if weight.ndim != 2:
            raise QCompressError(f"weight must be (O, C), got {tuple(weight.shape)}", "pass a Linear weight")
        if scale <= 0:
            raise QCompressError(f"activation scale K must be positive, got {scale}", "check the quantizer")
        resolve_kernel(kernel)
        self.out_features, self.in_features = weight.shape
        self.kernel = kernel
        w = weight.detach().float().cpu()
        signs = w >= 0
        packed = _pack_weight(signs.numpy()[:, :, None, None])
        self.register_buffer("packed_weight", torch.from_numpy(packed.view(np.int64)))
        self.register_buffer("alpha", _output_scale(w, alpha))
        self.register_buffer("mu", mu.detach().float().cpu().reshape(-1).clone())
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().cpu().clone())
        if self.mu.numel() != self.in_features:
            raise QCompressError(f"mu has {self.mu.numel()} values for {self.in_features} features", "")
        self.register_buffer("mu_sum", (2 * signs.double() - 1) @ self.mu.double())  # sum_c mu_c w_oc
        self._clear_caches()

    @classmethod
    def from_lowbit(cls, layer: LowBitLinear, kernel: str = "auto") -> BinaryLinear:
        """The engine's twin of a binary ``layer`` (weights packed once); raises QCompressError when
        the layer has no exact XNOR-popcount form (a per-feature activation scale)."""
        _refuse_unsupported(layer)
        linear = layer.linear
        aq = layer.input_quantizer
        return cls(linear.weight, aq.offset, float(aq.scale.reshape(-1)[0]), linear.bias, kernel, aq.spatial,
                   layer.weight_quantizer.output_scale(linear.weight))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kernel={self.kernel!r}"
            + (", spatial scale" if self.spatial else "") + (", relu" if self.relu else "")
        )

    @property
    def _inputs(self) -> int:
        return self.in_features

    def _clear_caches(self) -> None:
        super()._clear_caches()
        self._affines: dict[tuple, tuple] = {}

    def xnor_counts(self, x: torch.Tensor) -> torch.Tensor:
        """sum over features of s * w (the integer part of the layer), int64 (N, O); computed by the same
        popcount kernels as :meth:`forward`."""
        if self.in_features >= 2**24:
            raise QCompressError("counts of this layer do not fit float32's integers", "")
        return self._run(x, counts=True).round().to(torch.int64)

    def _run(self, x: torch.Tensor, counts: bool) -> torch.Tensor:
        from qcompress.runtime import _binary_kernels as kernels

        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise QCompressError(
                f"expected input (N, {self.in_features}), got {tuple(x.shape)}", "flatten the rows first"
            )
        dtype = self._compute_dtype(x)
        out_dtype = torch.float32 if counts else dtype  # counts: integers below 2**24, exact in float32
        rows = x.shape[0]
        if rows == 0:
            return torch.empty(0, self.out_features, dtype=out_dtype)
        xs = x.detach().to(dtype).contiguous().numpy()
        mu, scale = self._binarizer(dtype)
        n_words = -(-self.in_features // 64)
        # the last block of 8 rows reads up to 7 words past the last row of the last word
        packed = np.empty((1, n_words * rows + 2 * kernels.BLOCK_PIX), np.uint64)
        packed[0, n_words * rows :] = 0
        _row_packer()(xs, mu, scale, packed[0])
        out_np = np.float32 if out_dtype == torch.float32 else np.float64
        out = np.empty((1, self.out_features, rows, 1), out_np)
        weights = self.packed_weight.numpy().view(np.uint64)
        offsets = np.arange(n_words, dtype=np.int64) * rows  # tap r = word r of every row
        kind = resolve_kernel(self.kernel)
        affine = self._affine(rows, out.dtype, counts, kind == "portable")
        if self.spatial and not counts:
            # XNOR-Net's scaled form for rows: alpha_o * (K(x)_m * sum_c s w + sum_c mu_c w_oc) + bias_o, K(x)_m the
            # row's mean |x - mu| (one pass, float64 sums), applied in the kernels' epilogue
            k_rows = np.empty(rows, np.float64)
            _row_abs_mean()(xs, mu, k_rows)
            scaled = self._epilogue_args(out.dtype, counts, k_rows.astype(out.dtype), self.alpha.to(dtype).numpy())
        else:
            scaled = self._epilogue_args(out.dtype, counts)
        args = (packed, weights, offsets, 1, _linear_rows_per_job(rows, n_words), affine, out)
        if kind == "portable":
            kernels.conv_portable(*args, scaled)
        else:
            kernels.conv_vector(*args, kind == "vector-wide", scaled)
        return torch.from_numpy(out).view(self.out_features, rows).t().contiguous()

    # The conv kernels' affine argument (see conv_vector) for ``rows`` output positions of one 1x1
    # "image": out = offset_o + gain_o * (C - 2 P) with offset_o = alpha_o * sum_c mu_c w_oc + bias_o and
    # gain_o = alpha_o K, computed in float64 (counts: gain 1, offset 0). Every row is an interior
    # position, so the vector kernels read only the per-feature numbers and no map: the maps are
    # (O, 1, 1) and the interior ends at no row; the portable kernel reads the maps at every row.
    @torch.no_grad()
    def _affine(self, rows: int, dtype: np.dtype, counts: bool, portable: bool) -> tuple:
        key = (rows if portable else 0, np.dtype(dtype), counts, portable)
        affine = self._affines.get(key)
        if affine is not None:
            return affine
        tdtype = torch.from_numpy(np.zeros(0, dtype)).dtype
        alpha = self.alpha.double()
        if counts:
            gain, offset = torch.ones_like(alpha), torch.zeros_like(alpha)
        else:
            gain, offset = alpha * float(self.scale), alpha * self.mu_sum
            if self.bias is not None:
                offset = offset + self.bias.double()
        sums = torch.full_like(alpha, float(self.in_features))
        positions = rows if portable else 1

        def as_array(t: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
            return t.to(tdtype).reshape(-1, *[1] * (len(shape) - 1)).expand(shape).contiguous().numpy()

        n_out = self.out_features
        affine = (
            as_array(sums, (n_out, positions, 1)),
            as_array(offset, (n_out, positions, 1)),
            as_array(gain, (n_out,)),
            as_array(sums, (n_out,)),
            as_array(offset, (n_out,)),
            np.array([0, rows if portable else np.iinfo(np.int64).max, 0, 1], np.int64),
            np.zeros((n_out, 1, 0), dtype),
            np.zeros((n_out, 1, 0), dtype),
        )
        if len(self._affines) >= _MAX_PLANS:
            self._affines.pop(next(iter(self._affines)))
        self._affines[key] = affine
        return affine


def _linear_rows_per_job(rows: int, n_words: int) -> int:
    """Rows per parallel job of a Linear: whole blocks of 8 rows, at most about _LINEAR_JOB_BYTES of
    packed input each, and at least 2 jobs per thread when numba runs more than one."""
    from numba import get_num_threads

    from qcompress.runtime._binary_kernels import BLOCK_PIX

    threads = get_num_threads()
    jobs = max(-(-rows * n_words * 8 // _LINEAR_JOB_BYTES), 1 if threads == 1 else 2 * threads)
    per_job = -(-rows // min(rows, jobs))
    return min(rows, -(-per_job // BLOCK_PIX) * BLOCK_PIX)


@functools.lru_cache(maxsize=1)
def _row_packer():
    """The numba kernel that binarizes and packs a Linear's input rows (compiled on first use, so that
    importing this module does not import numba; cached on disk like the conv kernels)."""
    from numba import njit, prange

    @njit(parallel=True, cache=True, fastmath=False)
    def pack_rows(x, mu, scale, out):
        # bit j of out[word * rows + m] set where (x[m, c] - mu[c]) / scale[c] >= 0 for c = 64 word + j
        # (the fake quantizer's sign, 0 -> +1); the missing channels of the last word are 0
        rows, channels = x.shape
        n_words = (channels + 63) // 64
        for m in prange(rows):
            for word in range(n_words):
                c0 = word * 64
                bits = np.uint64(0)
                for j in range(min(64, channels - c0)):
                    bits |= np.uint64((x[m, c0 + j] - mu[c0 + j]) / scale[c0 + j] >= 0) << np.uint64(j)
                out[word * rows + m] = bits

    return pack_rows


@functools.lru_cache(maxsize=1)
def _spatial_scale_map():
    """The numba kernel of a conv's spatial scale ``K(x)``: the mean over channels of ``|x - mu_c|`` at every input
    position (one pass over ``x`` in blocks of positions, float64 sums; torch's ``(x - mu).abs().mean(1)`` makes
    three passes and two input-sized temporaries), then its mean over each output's ``kh x kw`` taps, taps in the
    zero padding counting 0 (:func:`~qcompress.quant.lowbit.box_mean`'s box filter, summed in float64)."""
    from numba import njit, prange

    @njit(parallel=True, cache=True, fastmath=False)
    def spatial_scale_map(x, width, mu, kernel, stride, padding, dilation, out):
        # x (N, C, H * W); out (N, OH, OW) in x's dtype; kernel, stride, padding, dilation: (h, w) int64 pairs
        images, channels, positions = x.shape
        height = positions // width
        out_h, out_w = out.shape[1], out.shape[2]
        means = np.empty((images, positions), np.float64)
        block = 1024
        blocks = (positions + block - 1) // block
        for job in prange(images * blocks):
            n = job // blocks
            start = (job % blocks) * block
            length = min(positions, start + block) - start
            acc = np.zeros(block, np.float64)
            for c in range(channels):
                m = np.float64(mu[c])
                row = x[n, c, start:start + length]
                for i in range(length):
                    acc[i] += abs(np.float64(row[i]) - m)
            for i in range(length):
                means[n, start + i] = acc[i] / channels
        taps = kernel[0] * kernel[1]
        for job in prange(images * out_h):
            n, oy = job // out_h, job % out_h
            column = np.zeros(width + 2 * padding[1], np.float64)  # the valid rows' sums, zero-padded left and right
            for ky in range(kernel[0]):
                iy = oy * stride[0] - padding[0] + ky * dilation[0]
                if 0 <= iy < height:
                    row = means[n, iy * width:(iy + 1) * width]
                    for ix in range(width):
                        column[padding[1] + ix] += row[ix]
            # summed tap by tap over the whole row (the same order per output as a loop over its taps): with
            # stride 1 across, each pass is contiguous and vectorises
            total = np.zeros(out_w, np.float64)
            for kx in range(kernel[1]):
                start = kx * dilation[1]
                if stride[1] == 1:
                    for ox in range(out_w):
                        total[ox] += column[start + ox]
                else:
                    for ox in range(out_w):
                        total[ox] += column[start + ox * stride[1]]
            for ox in range(out_w):
                out[n, oy, ox] = total[ox] / taps

    return spatial_scale_map


@functools.lru_cache(maxsize=1)
def _row_abs_mean():
    """The numba kernel of a Linear's spatial scale: each row's mean ``|x - mu|`` in one pass over the rows, summed in
    float64 (torch's ``(x - mu).abs().mean(1)`` makes three passes and two row-sized temporaries: 12 ms of a narrow
    Faster R-CNN's fc6 on 300 RoIs). The sum may be reassociated (``fastmath={"reassoc"}``), which lets LLVM
    vectorise it: 1.9 -> 0.35 ms on those rows; a float64 sum of float32 values in any order is far below the
    float32 output's rounding."""
    from numba import njit, prange

    @njit(parallel=True, cache=True, fastmath={"reassoc"})
    def row_abs_mean(x, mu, out):
        rows, channels = x.shape
        for m in prange(rows):
            total = 0.0
            for c in range(channels):
                total += abs(np.float64(x[m, c]) - np.float64(mu[c]))
            out[m] = total / channels

    return row_abs_mean


# ------------------------------------------------------------------------------- conversion
@dataclass
class BinaryConversion:
    """What :func:`convert_binary` did: converted layer names, and skipped binary layers with why."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)  # BatchNorms folded into the conv before them
    relus: list[str] = field(default_factory=list)  # ReLUs applied in the epilogue of the layer before them


def _fuse_relus(model: nn.Module) -> list[str]:
    """In every ``nn.Sequential`` (whose children run once each, in order), a ``nn.ReLU`` that follows an engine
    layer (Identity left by BN folding in between) becomes Identity and the layer applies it in its epilogue
    (one pass less over its output). Returns the ReLUs fused."""
    fused = []
    for prefix, module in list(model.named_modules()):  # listed first: the loop replaces children
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
            continue  # a subclass with its own forward may not run its children once each, in order
        last = None
        for name, child in module.named_children():
            if isinstance(child, nn.Identity):
                continue
            if type(child) is nn.ReLU and isinstance(last, (BinaryConv2d, BinaryLinear)) and not last.relu:
                last.relu = True
                setattr(module, name, nn.Identity())
                fused.append(f"{prefix}.{name}" if prefix else name)
            last = child
    return fused


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm2d) names where the BN directly follows the conv: adjacent children of modules that
    run their children in order, and the groups blocks declare in ``qcompress_fusion_groups``."""
    from qcompress.quant.fuse import _runs_children_in_order

    def join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    pairs = []
    for prefix, module in model.named_modules():
        declared = getattr(module, "qcompress_fusion_groups", None)
        if declared:
            pairs += [(join(prefix, g[0]), join(prefix, g[1])) for g in declared if len(g) >= 2]
        elif _runs_children_in_order(module):
            names = list(module._modules)
            pairs += [(join(prefix, a), join(prefix, b)) for a, b in itertools.pairwise(names)]
    return [(c, b) for c, b in pairs if isinstance(model.get_submodule(b), nn.BatchNorm2d)]


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold (in place, eval mode) every BatchNorm2d that follows a float conv, transposed conv or *binary*
    :class:`LowBitConv2d` / :class:`LowBitConvTranspose2d` into it, as int8 engines fuse conv + BN: the BN
    becomes ``Identity``. Returns the BNs folded.

    Exact for binary layers too: with ``g = gamma / sqrt(var + eps)`` per output channel, ``sign(g W) =
    sign(g) sign(W)`` and ``mean|g W| = |g| mean|W|`` (a learned scale is multiplied by ``|g|``), so the
    folded layer outputs ``g alpha sign(W) * a + g (b - mean) + beta``: the BN of the binary layer's output.
    Other low-bit layers are left with their BN (their quantizers do not commute with a scale)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = []
    for conv_name, bn_name in _conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.training or not bn.track_running_stats or bn.running_var is None:
            continue
        if type(conv) in (nn.Conv2d, nn.ConvTranspose2d):
            model.set_submodule(conv_name, fuse_conv_bn_eval(conv.eval(), bn, transpose=type(conv) is nn.ConvTranspose2d))
        elif isinstance(conv, (LowBitConv2d, LowBitConvTranspose2d)) and isinstance(conv.weight_quantizer,
                                                                                     BinaryWeightQuantizer):
            gain = conv.weight_quantizer.gain
            if gain is not None:
                gain.mul_((bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs())
            conv.conv = fuse_conv_bn_eval(conv.conv.eval(), bn, transpose=isinstance(conv, LowBitConvTranspose2d))
        else:
            continue
        model.set_submodule(bn_name, nn.Identity())
        folded.append(bn_name)
    return folded


def convert_binary(
    model: nn.Module, *, inplace: bool = False, kernel: str = "auto", fold_bn: bool = False
) -> tuple[nn.Module, BinaryConversion]:
    """Replace every binary LowBitConv2d and LowBitLinear that has an exact XNOR-popcount form by
    BinaryConv2d and BinaryLinear; ``fold_bn`` first folds the BatchNorms that follow convs into them
    (:func:`fold_batchnorm`: the binary layer's epilogue then applies the BN for free); a ReLU that follows a
    converted layer in a ``nn.Sequential`` moves into its epilogue too (``record.relus``).

    Binary layers that have none (grouped convs, per-channel activation scale) stay as they are and
    are listed in ``record.skipped``. ``model`` is copied unless ``inplace``."""
    resolve_kernel(kernel)
    if not inplace:
        model = copy.deepcopy(model)
    record = BinaryConversion()
    if fold_bn:
        record.folded = fold_batchnorm(model.eval())
    for name, module in list(model.named_modules()):
        if not isinstance(module, (LowBitConv2d, LowBitConvTranspose2d, LowBitLinear)):
            continue
        if not isinstance(module.weight_quantizer, BinaryWeightQuantizer) or not isinstance(
            module.input_quantizer, BinaryActivationQuantizer
        ):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            record.skipped[name] = reason
            continue
        engine = (BinaryLinear if isinstance(module, LowBitLinear) else BinaryConvTranspose2d
                  if isinstance(module, LowBitConvTranspose2d) else BinaryConv2d)
        replacement = engine.from_lowbit(module, kernel)
        if not name:
            return replacement, BinaryConversion([name], {})
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        record.converted.append(name)
    record.relus = _fuse_relus(model)
    return model, record


__all__ = [
    "INSTRUCTION_SETS",
    "KERNELS",
    "KERNEL_ENV",
    "BinaryConv2d",
    "BinaryConvTranspose2d",
    "BinaryConversion",
    "BinaryLinear",
    "CpuInfo",
    "convert_binary",
    "cpu_info",
    "fold_batchnorm",
    "resolve_kernel",
    "unsupported_reason",
]
