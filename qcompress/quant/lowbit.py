"""Low-bit fake quantization for research: LSQ, PACT, DoReFa and binary (XNOR-style) convolutions.

These models stay float tensors (fake quantization): they measure what 1-8 bit weights and
activations cost in accuracy and estimate what they would buy in bit-operations (BOPs); no int4 or
binary kernel runs them. Each method is a pair of quantizers, one for a conv's weight and one for
its input activation, wrapped around the conv by :class:`LowBitConv2d` (a ``Linear`` by :class:`LowBitLinear`,
a ``ConvTranspose2d`` by :class:`LowBitConvTranspose2d`, whose weight quantizers see the weight with
output channels first, so per-output-channel scales stay per output channel):

- LSQ (Esser et al. 2020, "Learned Step Size Quantization"): ``v_hat = round(clip(v / s, -Qn, Qp)) * s``
  with a learned step ``s``; the gradient to ``s`` is ``-v/s + round(v/s)`` inside the range and
  ``-Qn`` / ``Qp`` outside (eq. 3), scaled by ``g = 1 / sqrt(N * Qp)`` (section 2.2): ``N = N_W`` the
  number of weights of the layer for a weight step, ``N = N_F`` the number of features of the layer
  (its input elements per sample: numel / batch size) for an activation step. A weight step starts
  where the grid gives the trained weights the least squared error (:func:`lsq_mse_step`), an activation
  step as below; ``s`` is clamped to at least ``MIN_STEP`` in the forward pass (the gradient
  still reaches ``s``), so an optimizer step through zero cannot divide by zero or flip signs.
- PACT (Choi et al. 2018): activations ``y = clip(x, 0, alpha)`` quantized uniformly to ``2^k - 1``
  steps with a learned ``alpha``; ``d y_q / d alpha = 1`` where ``x >= alpha``, else 0, and the
  straight-through gradient to ``x`` is 1 on ``[0, alpha)`` (eq. 3). Weights use DoReFa, as in the paper.
- DoReFa (Zhou et al. 2016): weights ``2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``;
  activations ``quantize_k(clip(x, 0, 1))``; ``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)`` with
  the straight-through estimator (STE).
- Binary: weights ``alpha * sign(W)`` with ``alpha = mean|W|`` per output channel (XNOR-Net,
  Rastegari et al. 2016; ``--binary-scale learned``: ``alpha`` a learned parameter, XNOR-Net++);
  activations ``sign(x)``; both with the STE clipped to ``|x| <= 1`` (``d sign(x)/dx := 1[|x| <= 1]``,
  Hubara et al. 2016).

Adaptations for starting from a trained float network (not from scratch), each recorded here and
in the checkpoint recipe:

- Activations that can be negative (MobileNetV2's linear bottleneck outputs feed the next block's
  expansion conv) get the symmetric signed variant of each method (LSQ ``Qn = 2^(b-1)``; PACT
  ``clip(x, -alpha, alpha)``, gradient to ``alpha`` ``+1`` above and ``-1`` below). Whether an input is
  signed is decided once from the first batch the quantizer sees.
- DoReFa weights are scaled back by ``max|tanh(w)|`` and DoReFa activations are clipped to
  ``[0, r]`` (``r`` fixed from the first batch: the clip with the least squared quantization error of
  that batch, :func:`mse_clip`) instead of ``[0, 1]``: from scratch BN absorbs the scale; from a
  trained network these keep the layer's function at the start.
- Binary activations are ``sign`` of ``(x - mu) / K`` times ``K`` plus ``mu`` (``mu`` per channel mean and
  ``K`` mean ``|x - mu|`` of the first batch, XNOR-Net's activation scale): after ReLU6 every input is
  >= 0 and a bare ``sign`` would be constant. With ``mu = 0, K = 1`` this is the plain definition.

Which convs are quantized is a scope that each architecture declares on its registry entry
(``CompressionSpec.lowbit_scopes``: ``backbone`` for the detectors here; ``all`` always); the first
conv (the image is 8-bit data already) and the detection heads stay float by default
(``CompressionSpec.keep_float``), as in the seed projects' 'Quantize-Backbone' / 'Quantize-All' settings.

- LSQ and PACT activation ranges start at the 99.9th percentile of the first batch's ``|x|`` (LSQ step =
  percentile / Qp, PACT alpha = percentile; FQN's choice, Li et al. 2019), not LSQ's ``2 mean(|x|) / sqrt(Qp)``,
  which is a from-scratch start: on the embedded default (LSQ w4a4 backbone, no training, 200 test images,
  ``benchmarks/lowbit_start.py``) the mean start costs 25.3 mAP points, the percentile 5.6, the 99th
  percentile 44.0 and the 99.99th 7.4. After 2 epochs on 400 images the mean start ends 7.9 points
  below fp32, the percentile start 2.2 (README, "The fp32 parent as teacher").
- LSQ weight steps start at the least-squared-error step, not at ``2 mean(|w|) / sqrt(Qp)``: the start's
  mAP is about the same (-5.3 vs -5.6 points, within the noise of 200 images) but after 2 epochs on 400
  images the fine-tune ends 0.6 points closer to fp32 (-1.58 vs -2.22 labels only, -1.40 vs -1.87 with the
  teacher, 1,000 images none of the runs selected on; README).

Fully quantized mode (``fully_quantized``, Li et al. CVPR 2019, "Fully Quantized Network for Object
Detection"): the heads (``CompressionSpec.heads``) are quantized too and LSQ weight steps are per output
channel; the job freezes BN statistics after the first epoch. The first conv stays float unless asked.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qcompress.errors import QCompressError
from qcompress.models.registry import CompressionSpec

METHODS = ("lsq", "pact", "dorefa", "binary", "lqnet", "lqnet-ternary")
BINARY_SCALES = ("layer", "spatial", "learned")
MIN_STEP = 1e-8  # smallest LSQ step used in the forward pass
ACT_PERCENTILE = 0.999  # LSQ / PACT activation ranges start at this quantile of |x| (FQN's; module doc)
FLOAT_BITS = 32



# ----------------------------------------------------------------------------- STE building blocks
def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x forward, gradient multiplied by ``scale`` backward (LSQ's gradient scaling)."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) in {-1, +1} (0 -> +1) forward; gradient 1 where |x| <= 1, else 0 (hardtanh STE)."""
    clipped = F.hardtanh(x)
    return (torch.where(x >= 0, 1.0, -1.0).to(x.dtype) - clipped).detach() + clipped


def quantize_k(r: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's k-bit quantizer of r in [0, 1], STE backward."""
    levels = 2**bits - 1
    return round_ste(r * levels) / levels


# ----------------------------------------------------------------------------------- quantizers
class Quantizer(nn.Module):
    """Fake quantizer of one tensor. Data-dependent initial values come from the first tensor seen
    (:meth:`initialize`); they live in buffers/parameters so a checkpoint restores them."""

    def __init__(self, bits: int, signed: bool | None = None) -> None:
        super().__init__()
        self.bits = int(bits)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self._auto_sign = signed is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ensure_initialized(x)
        return self.quantize(x)

    def ensure_initialized(self, x: torch.Tensor) -> None:
        """Take the data-dependent initial values from ``x`` unless done before."""
        if not bool(self.initialized):
            with torch.no_grad():
                if self._auto_sign:
                    self.signed.fill_(bool((x < 0).any()))
                self.initialize(x.detach())
            self.initialized.fill_(True)

    def initialize(self, x: torch.Tensor) -> None:  # pragma: no cover - trivial default
        pass

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={bool(self.signed)}"


class LSQQuantizer(Quantizer):
    """Learned step size quantization (Esser et al. 2020).

    ``activation``: the quantized tensor is a batch (dim 0), and the gradient scale counts the
    features of one sample; otherwise (weights) every element.
    """

    def __init__(self, bits: int, signed: bool | None = None, activation: bool = False, channels: int = 0,
                 percentile: float | None = None) -> None:
        if bits < 2:
            raise QCompressError(f"LSQ needs at least 2 bits, got {bits}", "use --method binary for 1 bit")
        super().__init__(bits, signed)
        # channels > 0: one step per output channel (weights, fully quantized mode)
        self.step = nn.Parameter(torch.ones(channels, 1, 1, 1) if channels else torch.tensor(1.0))
        self.activation = activation
        self.percentile = percentile

    def levels(self) -> tuple[int, int]:
        """(Qn, Qp): the clip range in steps is [-Qn, Qp]."""
        if bool(self.signed):
            return 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def initialize(self, x: torch.Tensor) -> None:
        qn, qp = self.levels()
        if not self.activation:  # weights: the step with the least squared rounding + clipping error
            rows = x.flatten(1) if self.step.ndim else x.reshape(1, -1)
            self.step.copy_(lsq_mse_step(rows, qn, qp).clamp(min=MIN_STEP).reshape(self.step.shape))
        elif self.percentile is not None:
            self.step.fill_(max(_quantile_abs(x, self.percentile) / qp, MIN_STEP))
        else:
            self.step.fill_(max(float(2 * x.abs().mean() / math.sqrt(qp)), MIN_STEP))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qn, qp = self.levels()
        if self.step.ndim:
            elements = x[0].numel()  # weights of one output channel share the step
        else:
            elements = x[0].numel() if self.activation and x.ndim > 1 else x.numel()
        s = grad_scale(self.step, 1.0 / math.sqrt(elements * qp))
        # positive forward, gradient unchanged (s - s.detach() is exactly 0 but carries the gradient)
        s = torch.where(s > MIN_STEP, s, MIN_STEP + (s - s.detach()))
        return round_ste(torch.clamp(x / s, -qn, qp)) * s


def least_error_clip(rows: torch.Tensor, quantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     candidates: int = 64) -> torch.Tensor:
    """Per row of ``rows`` (R, N): the clip ``c`` in ``(0, max|row|]`` for which ``quantize(rows, c)`` (``c`` of
    shape (R, 1)) has the least squared error: ``candidates`` clips evenly spaced in ``(0, max|row|]``, then as many
    around the best of them (one outlier can make the coarse grid too coarse). Rows of over 1M elements in all are
    searched on a strided sample of their columns (a VGG16 fc6 has 103M weights); the maximum always comes from the
    whole row. At 2-4 bits the maximum is a poor clip: one outlier stretches the grid and most values round to 0."""
    rows = rows.detach().float()
    top = rows.abs().amax(dim=1).clamp_min(1e-12)
    stride = -(-rows.numel() // (1 << 20))
    if stride > 1:
        rows = rows[:, ::stride]

    def search(fractions: torch.Tensor) -> torch.Tensor:  # fractions (R, C) of max|row| -> best fraction (R,)
        best_err = torch.full_like(top, float("inf"))
        best = fractions[:, -1].clone()
        for i in range(fractions.shape[1]):
            err = ((quantize(rows, (top * fractions[:, i]).unsqueeze(1)) - rows) ** 2).sum(dim=1)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, fractions[:, i], best)
        return best

    grid = torch.arange(1, candidates + 1, dtype=rows.dtype) / candidates
    coarse = search(grid.expand(len(rows), -1))
    fine = (coarse.unsqueeze(1) + (torch.arange(candidates + 1, dtype=rows.dtype) / candidates - 0.5) * 2 / candidates)
    return top * search(fine.clamp(min=1 / candidates**2))


def lsq_mse_step(rows: torch.Tensor, qn: int, qp: int, candidates: int = 64) -> torch.Tensor:
    """Per row of ``rows`` (R, N): the step ``s`` whose grid ``s * [-qn .. qp]`` gives the row the least squared
    error (rounding + clipping), searched over the clip ``s * qp`` (:func:`least_error_clip`)."""

    def grid(x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        step = clip / qp
        return torch.clamp(torch.round(x / step), -qn, qp) * step

    return least_error_clip(rows, grid, candidates) / qp


class _PACTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        ctx.signed = signed
        levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        lower = -alpha if signed else torch.zeros_like(alpha)
        y = torch.minimum(torch.maximum(x, lower), alpha)
        scale = alpha / levels
        return torch.round(y / scale) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, alpha = ctx.saved_tensors
        above = x >= alpha
        if ctx.signed:
            below = x <= -alpha
            grad_alpha = grad[above].sum() - grad[below].sum()
        else:
            below = x < 0
            grad_alpha = grad[above].sum()
        grad_x = grad * ~(above | below)
        return grad_x, grad_alpha.reshape(alpha.shape), None, None


class PACTQuantizer(Quantizer):
    """Parameterized clipping activation (Choi et al. 2018) with a learned clip ``alpha``."""

    def __init__(self, bits: int, signed: bool | None = None, alpha: float | None = None,
                 percentile: float | None = None) -> None:
        if bits < 2:
            raise QCompressError(f"PACT needs at least 2 bits, got {bits}", "use --method binary for 1 bit")
        super().__init__(bits, signed)
        self.alpha = nn.Parameter(torch.tensor(float(alpha) if alpha is not None else 10.0))
        self._fixed_alpha = alpha is not None
        self.percentile = percentile

    def initialize(self, x: torch.Tensor) -> None:
        # The paper starts alpha at 10 for ReLU networks; the first batch's largest |x| is 6 after ReLU6.
        if not self._fixed_alpha:
            top = _quantile_abs(x, self.percentile) if self.percentile is not None else float(x.abs().max())
            self.alpha.fill_(max(top, 1e-3))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return _PACTFunction.apply(x, self.alpha, self.bits, bool(self.signed))


class DoReFaWeightQuantizer(Quantizer):
    """DoReFa-Net k-bit weights, scaled back by max|tanh(w)| (see the module docstring)."""

    def __init__(self, bits: int) -> None:
        if bits < 1:
            raise QCompressError(f"DoReFa needs at least 1 bit, got {bits}", "pass --bits-w 2, 4 or 8")
        super().__init__(bits, signed=True)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:  # the paper's 1-bit case: sign(w) * E(|w|)
            return sign_ste(w) * w.abs().mean().detach()
        t = torch.tanh(w)
        peak = t.abs().max().detach().clamp_min(1e-12)
        normalised = t / (2 * peak) + 0.5
        return (2 * quantize_k(normalised, self.bits) - 1) * peak


@torch.no_grad()
def mse_clip(x: torch.Tensor, bits: int, signed: bool, candidates: int = 64) -> float:
    """The clip ``r`` in ``(0, max|x|]`` whose uniform ``bits`` grid on ``[0, r]`` (``[-r, r]`` signed) gives
    ``x`` the least squared error (:func:`least_error_clip` over all of ``x``); 1e-3 for an all-zero ``x``."""
    levels = 2**bits - 1

    def grid(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if signed:
            return (2 * torch.round((torch.clamp(v / r, -1, 1) * 0.5 + 0.5) * levels) / levels - 1) * r
        return torch.round(torch.clamp(v / r, 0, 1) * levels) / levels * r

    flat = x.detach().reshape(1, -1)
    if float(flat.abs().max()) <= 1e-3:
        return 1e-3
    return float(least_error_clip(flat, grid, candidates))


class DoReFaActivationQuantizer(Quantizer):
    """DoReFa-Net k-bit activations on [0, r] (signed: [-r, r]), r fixed at the first batch (:func:`mse_clip`)."""

    def __init__(self, bits: int, signed: bool | None = None, clip: float | None = None) -> None:
        if bits < 1:
            raise QCompressError(f"DoReFa needs at least 1 bit, got {bits}", "pass --bits-a 2, 4 or 8")
        super().__init__(bits, signed)
        self.register_buffer("clip", torch.tensor(float(clip) if clip is not None else 1.0))
        self._fixed_clip = clip is not None

    def initialize(self, x: torch.Tensor) -> None:
        if not self._fixed_clip:
            self.clip.fill_(mse_clip(x, self.bits, bool(self.signed)))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        r = self.clip
        if bool(self.signed):  # symmetric: [-r, r] -> [0, 1] -> k bits -> back
            return (2 * quantize_k(torch.clamp(x / r, -1, 1) * 0.5 + 0.5, self.bits) - 1) * r
        return quantize_k(torch.clamp(x / r, 0, 1), self.bits) * r


class BinaryWeightQuantizer(Quantizer):
    """XNOR-Net weights: sign(W) * mean|W| per output channel, STE clipped to |W| <= 1.

    ``channels > 0`` (``--binary-scale learned``, XNOR-Net++'s learned scale, Bulat & Tzimiropoulos 2019):
    the per-output-channel scale is a parameter ``gain`` learned by back-propagation (``d/d gain =
    sign(W)``), started at mean|W|, instead of being recomputed from ``W``. With the per-layer activation
    scale ``K`` it is XNOR-Net++'s output scale ``Gamma_o = gain_o K``, which the engine runs as it runs
    alpha."""

    def __init__(self, channels: int = 0) -> None:
        super().__init__(1, signed=True)
        self.gain = nn.Parameter(torch.ones(channels)) if channels > 0 else None

    def initialize(self, w: torch.Tensor) -> None:
        if self.gain is not None:
            self.gain.copy_(w.abs().mean(dim=tuple(range(1, w.ndim))))

    def output_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The ``(O,)`` scale of the binary weight ``w`` (``(O, ...)``): learned, or mean|W_o|."""
        self.ensure_initialized(w)
        if self.gain is not None:
            return self.gain
        return w.abs().mean(dim=tuple(range(1, w.ndim)))

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return sign_ste(w) * self.output_scale(w).view(-1, *[1] * (w.ndim - 1))

    def extra_repr(self) -> str:
        return super().extra_repr() + (", learned scale" if self.gain is not None else "")


class BinaryActivationQuantizer(Quantizer):
    """sign((x - mu) / K) * K + mu with the STE clipped to |x - mu| <= K (mu per channel, from the first
    batch when ``calibrate``; else mu = 0, K = 1: the plain sign of BNN/XNOR-Net).

    ``K`` is one number per layer by default (XNOR-Net's activation scale, ``mean |x - mu|`` over all
    channels): that is what the bitpacked engine (:mod:`qcompress.runtime.binary`) can run exactly, since
    a popcount cannot weight channels. ``shared_scale=False`` keeps one ``K`` per channel (simulation only).
    The buffer holds one value per channel either way, so both load the same way.
    """

    def __init__(self, channels: int, calibrate: bool = True, shared_scale: bool = True, spatial: bool = False) -> None:
        super().__init__(1, signed=True)
        self.register_buffer("offset", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))
        self._calibrate = calibrate
        self._shared_scale = shared_scale
        self.spatial = spatial  # the wrapping conv / Linear scales its output by K(x) (binary_spatial)

    def initialize(self, x: torch.Tensor) -> None:
        if self._calibrate:
            dims = [0] + list(range(2, x.ndim))
            mean = x.mean(dim=dims)
            self.offset.copy_(mean)
            spread = (x - mean.view(1, -1, *[1] * (x.ndim - 2))).abs()
            if self._shared_scale:
                self.scale.fill_(float(spread.mean().clamp_min(1e-6)))
            else:
                self.scale.copy_(spread.mean(dim=dims).clamp_min(1e-6))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mu, k = self.offset.view(shape), self.scale.view(shape)
        return sign_ste((x - mu) / k) * k + mu

    def extra_repr(self) -> str:
        return super().extra_repr() + (", spatial scale" if self.spatial else "")


def box_mean(a: torch.Tensor, kernel_size: tuple[int, int], stride: Any, padding: Any, dilation: Any) -> torch.Tensor:
    """The mean of ``a`` (N, 1, H, W) over each output position's ``k x k`` taps of a conv with this geometry;
    taps in the zero padding count 0 (the receptive-field average of :func:`binary_spatial`'s ``K(x)``)."""
    kh, kw = kernel_size
    box = a.new_full((1, 1, kh, kw), 1.0 / (kh * kw))
    return F.conv2d(a, box, None, stride, padding, dilation)


def binary_spatial(quantizer: BinaryActivationQuantizer, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, layer: Any, pool: Any) -> torch.Tensor:
    """XNOR-Net's scaled binary layer (Rastegari et al. 2016, section 3.2):
    ``layer(sign(x - mu), Wq) * K(x) + layer(mu, Wq) + b`` with ``K(x)`` the mean over input channels of
    ``|x - mu|`` at each input position, averaged over each output's receptive field by ``pool`` (a conv:
    ``k x k`` box filter with the conv's stride, padding and dilation, zero-padded taps counting 0; a
    Linear on 2-D rows: the row's mean; other Linear inputs keep the per-layer ``K``). The input keeps its magnitude per position, which a per-layer ``K`` drops;
    the popcount still runs on signs only, ``K(x)`` is one float per output position (the engine computes
    it the same way). ``K`` (the per-layer scale) sets the sign's straight-through range."""
    quantizer.ensure_initialized(x)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu, k = quantizer.offset.view(shape), quantizer.scale.view(shape)
    centred = x - mu
    signs = sign_ste(centred / k)
    spatial = pool(centred.abs().mean(dim=1, keepdim=True))
    return layer(signs, weight, None) * spatial + layer(mu.expand(1, *x.shape[1:]), weight, bias)


class LQNetQuantizer(Quantizer):
    """LQ-Net (Zhang et al. 2018, "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep
    Neural Networks"): the levels are ``v^T b`` for a learned basis ``v`` of ``K`` numbers and every code
    ``b`` in ``{-1, +1}^K`` (signed tensors, weights) or ``{0, 1}^K`` (activations after ReLU); each value
    goes to its nearest level, the gradient passes straight through (STE).

    The basis is not learned by back-propagation but by the paper's quantization-error minimisation
    (Algorithm 1): in training mode each forward pass encodes the tensor with the current basis, solves
    the least-squares ``v* = argmin ||B v - x||^2`` (``B``: the codes of all elements) and moves the
    basis towards it, ``v <- 0.9 v + 0.1 v*`` (the paper's moving average). ``ternary``: the codes
    are ``{-1, 0, +1}`` with ``K = 1`` (levels ``-v, 0, +v``), the source's "LQ-Net ternary" weights; it
    counts as 2 bits in bit-operations. One basis per tensor (the paper also uses one per output
    channel for weights: a finer variant, not this one).
    """

    MOMENTUM = 0.9

    def __init__(self, bits: int, signed: bool | None = None, ternary: bool = False) -> None:
        if not ternary and not 1 <= bits <= 4:
            raise QCompressError(f"LQ-Net takes 1..4 bits here, got {bits}", "use --bits-w/--bits-a 2 (or 3, 4)")
        super().__init__(2 if ternary else bits, True if ternary else signed)
        self.ternary = ternary
        self.k = 1 if ternary else int(bits)
        self.register_buffer("basis", torch.ones(self.k))

    def codes(self) -> torch.Tensor:
        """All ``(num_levels, K)`` codes for the current sign mode."""
        if self.ternary:
            return torch.tensor([[-1.0], [0.0], [1.0]])
        values = [-1.0, 1.0] if bool(self.signed) else [0.0, 1.0]
        return torch.cartesian_prod(*[torch.tensor(values)] * self.k).reshape(-1, self.k)

    def initialize(self, x: torch.Tensor) -> None:
        # Powers of two scaled to the data: a uniform grid over about [-2 mean|x|, 2 mean|x|] to start.
        powers = torch.tensor([2.0**i for i in range(self.k)])
        self.basis.copy_(powers * (float(x.abs().mean()) * 2 + 1e-8) / float(powers.sum()))

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.codes().to(x)
        levels = codes @ self.basis.to(x)
        order = torch.argsort(levels)
        edges = (levels[order][1:] + levels[order][:-1]) / 2
        index = order[torch.bucketize(x.contiguous(), edges)]  # transposed-conv weights arrive as a view
        return levels[index], codes[index]

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q, b = self._encode(x.detach())
            if self.training:
                flat_b, flat_x = b.reshape(-1, self.k).double(), x.detach().reshape(-1, 1).double()
                gram = flat_b.T @ flat_b
                # A code bit that is constant over the tensor makes the system singular: a small ridge,
                # relative to the Gram matrix, keeps that basis entry where it is instead.
                gram = gram + 1e-6 * (float(gram.diagonal().mean()) + 1.0) * torch.eye(self.k, dtype=gram.dtype)
                solved = torch.linalg.solve(gram, flat_b.T @ flat_x).flatten()
                if bool(torch.isfinite(solved).all()):
                    self.basis.mul_(self.MOMENTUM).add_((1 - self.MOMENTUM) * solved.to(self.basis))
                    q, _ = self._encode(x.detach())
        return x + (q - x).detach()

    def extra_repr(self) -> str:
        return f"{'ternary' if self.ternary else f'bits={self.bits}'}, signed={bool(self.signed)}"


# ------------------------------------------------------------------------------------ the layer
class LowBitConv2d(nn.Module):
    """``conv`` with its input activation and weight passed through fake quantizers."""

    def __init__(self, conv: nn.Conv2d, w_quantizer: Quantizer | None, a_quantizer: Quantizer | None) -> None:
        super().__init__()
        self.conv = conv
        self.weight_quantizer = w_quantizer
        self.input_quantizer = a_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight if self.weight_quantizer is None else self.weight_quantizer(self.conv.weight)
        aq = self.input_quantizer
        if isinstance(aq, BinaryActivationQuantizer) and aq.spatial:
            conv = self.conv
            return binary_spatial(aq, x, weight, conv.bias, conv._conv_forward,
                                  lambda a: box_mean(a, conv.kernel_size, conv.stride, conv.padding, conv.dilation))
        if aq is not None:
            x = aq(x)
        return self.conv._conv_forward(x, weight, self.conv.bias)

    @property
    def layer(self) -> nn.Conv2d:
        return self.conv

    @property
    def bits(self) -> tuple[int, int]:
        return (
            self.weight_quantizer.bits if self.weight_quantizer is not None else FLOAT_BITS,
            self.input_quantizer.bits if self.input_quantizer is not None else FLOAT_BITS,
        )


def _out_channels_first(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed conv's ``(in, out/groups, kh, kw)`` weight as ``(out, in/groups, kh, kw)``: the layout
    of a conv weight, with one output channel per row."""
    c_in, out_per_group = weight.shape[:2]
    grouped = weight.reshape(groups, c_in // groups, out_per_group, *weight.shape[2:])
    return grouped.transpose(1, 2).reshape(groups * out_per_group, c_in // groups, *weight.shape[2:])


def _in_channels_first(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`_out_channels_first`."""
    c_out, in_per_group = weight.shape[:2]
    grouped = weight.reshape(groups, c_out // groups, in_per_group, *weight.shape[2:])
    return grouped.transpose(1, 2).reshape(groups * in_per_group, c_out // groups, *weight.shape[2:])


class LowBitConvTranspose2d(nn.Module):
    """``conv`` (an ``nn.ConvTranspose2d``) with its input activation and weight passed through fake
    quantizers. The weight, stored ``(in, out/groups, kh, kw)``, reaches the weight quantizer as
    ``(out, in/groups, kh, kw)`` and goes back after it, so per-channel quantizers (binary ``alpha``,
    per-channel LSQ steps) work per output channel, as for a conv."""

    def __init__(self, conv: nn.ConvTranspose2d, w_quantizer: Quantizer | None, a_quantizer: Quantizer | None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise QCompressError(f"transposed conv with padding_mode={conv.padding_mode!r}", "use zero padding")
        self.conv = conv
        self.weight_quantizer = w_quantizer
        self.input_quantizer = a_quantizer

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, in the module's own ``(in, out/groups, kh, kw)`` layout."""
        weight = self.conv.weight
        if self.weight_quantizer is None:
            return weight
        groups = self.conv.groups
        return _in_channels_first(self.weight_quantizer(_out_channels_first(weight, groups)), groups)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        conv = self.conv
        output_padding = conv.output_padding
        if output_size is not None:
            output_padding = conv._output_padding(x, output_size, list(conv.stride), list(conv.padding),
                                                  list(conv.kernel_size), 2, list(conv.dilation))
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.conv_transpose2d(x, self.quantized_weight(), conv.bias, conv.stride, conv.padding, output_padding,
                                  conv.groups, conv.dilation)

    @property
    def layer(self) -> nn.ConvTranspose2d:
        return self.conv

    bits = LowBitConv2d.bits


class LowBitLinear(nn.Module):
    """``linear`` with its input activation and weight passed through fake quantizers. The weight is
    quantized as an ``(out, in, 1, 1)`` tensor, so every weight quantizer works per output row as it
    works per output channel of a conv (binary: ``alpha * sign(W)`` with ``alpha`` per row)."""

    def __init__(self, linear: nn.Linear, w_quantizer: Quantizer | None, a_quantizer: Quantizer | None) -> None:
        super().__init__()
        self.linear = linear
        self.weight_quantizer = w_quantizer
        self.input_quantizer = a_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer(weight[:, :, None, None])[:, :, 0, 0]
        aq = self.input_quantizer
        if isinstance(aq, BinaryActivationQuantizer) and aq.spatial and x.ndim == 2:
            return binary_spatial(aq, x, weight, self.linear.bias, F.linear, lambda a: a)
        if aq is not None:
            x = aq(x)
        return F.linear(x, weight, self.linear.bias)

    @property
    def layer(self) -> nn.Linear:
        return self.linear

    bits = LowBitConv2d.bits


# The wrapper of each layer type that low-bit QAT quantizes; scopes select the conv types.
_WRAPPERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: LowBitConv2d,
    nn.ConvTranspose2d: LowBitConvTranspose2d,
    nn.Linear: LowBitLinear,
}
_CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)


def _quantile_abs(x: torch.Tensor, q: float) -> float:
    flat = x.detach().abs().flatten().float()
    if flat.numel() > 1 << 24:  # torch.quantile's input limit: a strided sample keeps the statistic
        flat = flat[:: flat.numel() // (1 << 24) + 1]
    return float(torch.quantile(flat, q))


def make_quantizers(method: str, bits_w: int, bits_a: int, conv: nn.Conv2d | nn.ConvTranspose2d | nn.Linear,
                    fully_quantized: bool = False, binary_scale: str = "layer") -> tuple[Quantizer, Quantizer]:
    """(weight quantizer, input-activation quantizer) of ``method`` for ``conv`` (or a transposed conv, a
    Linear); ``fully_quantized``: per-channel LSQ weight steps (see the module doc). LSQ and PACT activation
    ranges start at the 99.9th percentile of the first batch's ``|x|``. ``binary_scale``: ``layer`` (one ``K``
    per layer), ``spatial`` (:func:`binary_spatial`; a transposed conv keeps ``layer``) or ``learned`` (one ``K``
    per layer and XNOR-Net++'s learned per-output-channel weight scale, :class:`BinaryWeightQuantizer`)."""
    pct = ACT_PERCENTILE
    linear = isinstance(conv, nn.Linear)
    in_channels = conv.in_features if linear else conv.in_channels
    out_channels = conv.out_features if linear else conv.out_channels
    if method == "lsq":
        return (LSQQuantizer(bits_w, signed=True, channels=out_channels if fully_quantized else 0),
                LSQQuantizer(bits_a, activation=True, percentile=pct))
    if method == "pact":
        return DoReFaWeightQuantizer(bits_w), PACTQuantizer(bits_a, percentile=pct)
    if method == "dorefa":
        return DoReFaWeightQuantizer(bits_w), DoReFaActivationQuantizer(bits_a)
    if method == "binary":
        spatial = binary_scale == "spatial" and not isinstance(conv, nn.ConvTranspose2d)
        return (BinaryWeightQuantizer(out_channels if binary_scale == "learned" else 0),
                BinaryActivationQuantizer(in_channels, spatial=spatial))
    if method == "lqnet":
        return LQNetQuantizer(bits_w, signed=True), LQNetQuantizer(bits_a)
    if method == "lqnet-ternary":
        return LQNetQuantizer(2, ternary=True), LQNetQuantizer(bits_a)
    raise QCompressError(f"unknown low-bit method {method!r}", f"use one of: {', '.join(METHODS)}")


# -------------------------------------------------------------------------------------- apply
@dataclass(frozen=True)
class LowBitConfig:
    method: str = "lsq"
    bits_w: int = 4
    bits_a: int = 4
    scope: str = "backbone"
    keep_first_and_heads: bool = True
    fully_quantized: bool = False  # heads quantized too, per-channel LSQ weights
    binary_scale: str = "layer"  # binary: one K per layer, XNOR-Net's K(x) per position, or learned weight scales

    def validate(self) -> LowBitConfig:
        if self.method not in METHODS:
            raise QCompressError(f"unknown low-bit method {self.method!r}", f"use one of: {', '.join(METHODS)}")
        if self.binary_scale not in BINARY_SCALES:
            raise QCompressError(f"unknown --binary-scale {self.binary_scale!r}", "use layer, spatial or learned")
        if self.binary_scale != "layer" and self.method != "binary":
            raise QCompressError(f"--binary-scale {self.binary_scale} is for --method binary, not {self.method}",
                                 "drop --binary-scale")
        if self.fully_quantized and self.scope != "all":
            raise QCompressError(f"--heads (fully quantized) needs --scope all, got --scope {self.scope}",
                                 "add --scope all")
        if self.method == "binary":
            return LowBitConfig("binary", 1, 1, self.scope, self.keep_first_and_heads, self.fully_quantized,
                                self.binary_scale)
        if self.method.startswith("lqnet"):
            for flag, bits in (("--bits-w", self.bits_w), ("--bits-a", self.bits_a)):
                if not 1 <= bits <= 4:
                    raise QCompressError(f"{flag} {bits} is outside 1..4 for LQ-Net", "use 2 (or 1, 3, 4)")
            return LowBitConfig(self.method, 2 if self.method == "lqnet-ternary" else self.bits_w, self.bits_a,
                                self.scope, self.keep_first_and_heads, self.fully_quantized)
        for flag, bits in (("--bits-w", self.bits_w), ("--bits-a", self.bits_a)):
            if not 2 <= bits <= 8:
                raise QCompressError(f"{flag} {bits} is outside 2..8 for {self.method}", "use 2, 4 or 8 (or --method binary)")
        return self


@dataclass
class LowBitRecord:
    method: str
    bits_w: int
    bits_a: int
    scope: str
    layers: list[str] = field(default_factory=list)  # quantized convs (transposed convs, Linear layers)
    kept_float: list[str] = field(default_factory=list)  # convs in scope kept float (first conv, heads)
    fully_quantized: bool = False
    binary_scale: str = "layer"

    @property
    def recipe(self) -> dict[str, Any]:
        extra = {"binary_scale": self.binary_scale} if self.binary_scale != "layer" else {}
        return extra | {
            "scheme": "lowbit-fake-quant",
            "research": True,
            "method": self.method,
            "bits_w": self.bits_w,
            "bits_a": self.bits_a,
            "scope": self.scope,
            "layers": list(self.layers),
            "kept_float": list(self.kept_float),
            "fully_quantized": self.fully_quantized,
        }


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_convs(
    model: nn.Module,
    scope: str,
    keep_first_and_heads: bool = True,
    *,
    spec: CompressionSpec,
    heads: bool = False,
) -> tuple[list[str], list[str]]:
    """(convs to quantize, convs in scope kept float) by module name, from the architecture's declared
    scopes (``spec.lowbit_scopes``) and keep-float list; ``heads`` quantizes the declared heads too.
    Convs are ``nn.Conv2d`` and ``nn.ConvTranspose2d`` layers (not subclasses: fused or quantized ones)."""
    patterns = spec.scope_patterns(scope)
    convs = [n for n, m in model.named_modules() if type(m) in _CONV_TYPES]
    in_scope = [n for n in convs if _matches(n, patterns)]
    if heads and not spec.heads:
        raise QCompressError("this architecture declares no heads to quantize", "drop --heads")
    kept = [n for n in in_scope if keep_first_and_heads and _matches(n, spec.keep_float)
            and not (heads and _matches(n, spec.heads))]
    return [n for n in in_scope if n not in kept], kept


def wrap_convs(model: nn.Module, names: Sequence[str], method: str, bits_w: int, bits_a: int,
               fully_quantized: bool = False, binary_scale: str = "layer") -> None:
    """Swap each named layer of ``model`` (in place) for the low-bit wrapper of its type (``Conv2d``,
    ``ConvTranspose2d``, ``Linear``) with ``method``'s quantizers."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        wrapper = _WRAPPERS.get(type(conv)) or next((w for t, w in _WRAPPERS.items() if isinstance(conv, t)), None)
        if wrapper is None:
            raise QCompressError(f"{name} is a {type(conv).__name__}, not a layer low-bit QAT can quantize",
                                 "low-bit wraps Conv2d, ConvTranspose2d and Linear layers")
        quantizers = make_quantizers(method, bits_w, bits_a, conv, fully_quantized, binary_scale)
        setattr(parent, child, wrapper(conv, *quantizers))


def apply_lowbit(
    model: nn.Module,
    method: str,
    bits_w: int = 4,
    bits_a: int = 4,
    scope: str = "backbone",
    keep_first_and_heads: bool = True,
    *,
    spec: CompressionSpec,
    fully_quantized: bool = False,
    binary_scale: str = "layer",
) -> LowBitRecord:
    """Swap the convs of ``scope`` in ``model`` (in place) for :class:`LowBitConv2d` (transposed convs for
    :class:`LowBitConvTranspose2d`); returns which.

    Quantizers take their data-dependent initial values from the first batch they see: run
    :func:`initialize_lowbit` on real images before training (and before wrapping in DDP).
    """
    cfg = LowBitConfig(method, bits_w, bits_a, scope, keep_first_and_heads, fully_quantized, binary_scale).validate()
    layers, kept = select_convs(model, cfg.scope, cfg.keep_first_and_heads, spec=spec, heads=cfg.fully_quantized)
    if cfg.method == "binary":
        # Depthwise / grouped convs stay full precision, as in the binary-network literature (Bi-Real,
        # BiDet): a 3x3 depthwise filter has 9 weights per channel, too few to survive binarization.
        grouped = [n for n in layers if model.get_submodule(n).groups > 1]
        layers = [n for n in layers if n not in grouped]
        kept = kept + grouped
    if not layers:
        raise QCompressError(f"scope {scope!r} selects no convolution of this model", "use --scope all")
    wrap_convs(model, layers, cfg.method, cfg.bits_w, cfg.bits_a, cfg.fully_quantized, cfg.binary_scale)
    return LowBitRecord(cfg.method, cfg.bits_w, cfg.bits_a, cfg.scope, layers, kept, cfg.fully_quantized,
                        cfg.binary_scale)


@torch.no_grad()
def initialize_lowbit(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Run images through ``model`` in eval mode so every quantizer takes its initial values."""
    was_training = model.training
    model.eval()
    seen = 0
    for batch in batches:
        model(batch)
        seen += batch.shape[0]
        break  # the first batch initialises; more would change nothing
    model.train(was_training)
    missing = [n for n, m in model.named_modules() if isinstance(m, Quantizer) and not bool(m.initialized)]
    if missing:
        raise QCompressError(f"{len(missing)} quantizers saw no data (e.g. {missing[0]})", "pass calibration images")
    return seen


def rebuild_lowbit(model: nn.Module, recipe: Mapping[str, Any]) -> nn.Module:
    """The fake-quant structure of ``recipe`` around float ``model`` (in place), for load_state_dict; each
    recorded layer gets the wrapper of its module type (conv, transposed conv, Linear)."""
    method = recipe["method"]
    wrap_convs(model, list(recipe["layers"]), method, int(recipe["bits_w"]), int(recipe["bits_a"]),
               bool(recipe.get("fully_quantized", False)), str(recipe.get("binary_scale", "layer")))
    return model  # signs, steps, clips and the 'initialized' flags come with the state_dict


# ---------------------------------------------------------------------------------------- BOPs
def layer_bits(record: LowBitRecord) -> dict[str, tuple[int, int]]:
    return {name: (record.bits_w, record.bits_a) for name in record.layers}


__all__ = [
    "BINARY_SCALES",
    "METHODS",
    "MIN_STEP",
    "BinaryActivationQuantizer",
    "BinaryWeightQuantizer",
    "DoReFaActivationQuantizer",
    "DoReFaWeightQuantizer",
    "LQNetQuantizer",
    "LSQQuantizer",
    "LowBitConfig",
    "LowBitConv2d",
    "LowBitConvTranspose2d",
    "LowBitLinear",
    "LowBitRecord",
    "PACTQuantizer",
    "apply_lowbit",
    "binary_spatial",
    "box_mean",
    "initialize_lowbit",
    "layer_bits",
    "make_quantizers",
    "rebuild_lowbit",
    "select_convs",
    "wrap_convs",
]
