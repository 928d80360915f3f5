"""The bitpacked binary engine against the fake-quant layer it replaces and against integer references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompress.errors import QCompressError
from qcompress.quant.lowbit import (
    BinaryActivationQuantizer,
    BinaryWeightQuantizer,
    LowBitConv2d,
    LowBitConvTranspose2d,
    LSQQuantizer,
)
from qcompress.runtime.binary import (
    INSTRUCTION_SETS,
    KERNEL_ENV,
    BinaryConv2d,
    BinaryConvTranspose2d,
    convert_binary,
    cpu_info,
    fold_batchnorm,
    resolve_kernel,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# (in, out, kernel, stride, padding, dilation, height, width)
SHAPES = [
    (3, 5, 3, 1, 1, 1, 9, 12),
    (65, 130, 3, 2, 1, 1, 11, 10),
    (130, 65, 1, 1, 0, 1, 8, 11),
    (64, 64, 3, 1, 1, 2, 10, 9),
    (130, 3, 3, 2, 0, 1, 9, 9),
    (65, 65, 1, 2, 0, 1, 9, 8),
    (20, 7, 3, 1, 2, 1, 5, 6),  # padding 2: some taps of the corner outputs see no pixel at all
    (70, 9, 3, 1, 1, 1, 2, 2),  # no output has all taps inside the image
]
IDS = [f"{c}to{o}_k{k}s{s}p{p}d{d}_{h}x{w}" for c, o, k, s, p, d, h, w in SHAPES]


def binary_layer(
    c: int,
    o: int,
    k: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    seed: int = 0,
    scale: float = 0.7,
) -> LowBitConv2d:
    """A binary LowBitConv2d with per-channel mu and one shared K, ready for inference."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c, o, k, stride, padding, dilation, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(o, generator=g))
    aq = BinaryActivationQuantizer(c, calibrate=False)
    aq.offset.copy_(torch.randn(c, generator=g) * 0.5)
    aq.scale.fill_(scale)
    aq.initialized.fill_(True)
    return LowBitConv2d(conv, BinaryWeightQuantizer(), aq).eval()


@torch.no_grad()
def signs(layer: LowBitConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input signs, weight signs) in {-1, +1}, 0 -> +1, as the fake quantizers define them."""
    aq = layer.input_quantizer
    s = torch.where((x - aq.offset.view(1, -1, 1, 1)) / aq.scale.view(1, -1, 1, 1) >= 0, 1.0, -1.0)
    return s, torch.where(layer.conv.weight >= 0, 1.0, -1.0)


@torch.no_grad()
def integer_counts(layer: LowBitConv2d, x: torch.Tensor) -> torch.Tensor:
    """sum over in-image taps of s * w, by unfold + int64 einsum (padded taps are 0)."""
    conv = layer.conv
    s, w = signs(layer, x)
    cols = F.unfold(s.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride).long()
    counts = torch.einsum("nkl,ok->nol", cols, w.reshape(w.shape[0], -1).long())
    out_h = (
        x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1
    ) // conv.stride[0] + 1
    return counts.reshape(x.shape[0], w.shape[0], out_h, -1)


@torch.no_grad()
def exact_reference(layer: LowBitConv2d, x: torch.Tensor) -> torch.Tensor:
    """The fake-quant layer in float64 with exact +-1 signs (no STE rounding)."""
    aq, conv = layer.input_quantizer, layer.conv
    s, w = signs(layer, x)
    a = s.double() * aq.scale.double().view(1, -1, 1, 1) + aq.offset.double().view(1, -1, 1, 1)
    alpha = conv.weight.abs().mean(dim=(1, 2, 3)).double().view(-1, 1, 1, 1)
    return F.conv2d(a, w.double() * alpha, conv.bias.double(), conv.stride, conv.padding, conv.dilation)


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_instruction_sets_are_reported() -> None:
    info = cpu_info()
    assert info.model
    assert set(info.instruction_sets) == set(INSTRUCTION_SETS)
    assert all(isinstance(v, bool) for v in info.instruction_sets.values())


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_popcount_counts_equal_integer_reference(shape) -> None:
    c, o, k, stride, padding, dilation, h, w = shape
    layer = binary_layer(c, o, k, stride, padding, dilation)
    x = torch.randn(2, c, h, w)
    engine = BinaryConv2d.from_lowbit(layer)
    expected = integer_counts(layer, x)
    assert engine.xnor_counts(x).shape == expected.shape
    assert torch.equal(engine.xnor_counts(x), expected)
    assert torch.equal(BinaryConv2d.from_lowbit(layer, kernel="portable").xnor_counts(x), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_forward_equals_fake_quant_layer(shape) -> None:
    c, o, k, stride, padding, dilation, h, w = shape
    layer = binary_layer(c, o, k, stride, padding, dilation, seed=1)
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        reference = layer(x)
    out = BinaryConv2d.from_lowbit(layer)(x)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert rel_max_diff(out, reference) <= 1e-5
    assert rel_max_diff(out, exact_reference(layer, x)) <= 1e-6


# (in, out, kernel, stride, padding, dilation, height, width, grouped): C * KW <= 64 with stride and dilation 1
# across packs a kernel row's pixels into one word; the others keep one word-tap per kernel tap
GROUPING = [
    (16, 6, 3, 1, 1, 1, 12, 13, True),
    (16, 5, 3, (2, 1), 1, 1, 11, 10, True),
    (8, 4, 5, 1, 2, (2, 1), 9, 12, True),
    (21, 7, 3, 1, 0, 1, 7, 8, True),  # 63 bits
    (22, 7, 3, 1, 1, 1, 7, 8, False),  # 66 bits: two words per tap
    (16, 6, 3, (1, 2), 1, 1, 9, 10, False),
    (16, 6, 3, 1, 2, (1, 2), 9, 10, False),
]


@pytest.mark.parametrize("shape", GROUPING, ids=[f"{c}x{k}s{s}d{d}" for c, _, k, s, _, d, *_ in GROUPING])
def test_column_grouped_layers_count_as_the_integer_reference(shape) -> None:
    c, o, k, stride, padding, dilation, h, w, grouped = shape
    layer = binary_layer(c, o, k, stride, padding, dilation, seed=5)
    x = torch.randn(2, c, h, w)
    expected = integer_counts(layer, x)
    for kernel in ("auto", "portable"):
        engine = BinaryConv2d.from_lowbit(layer, kernel=kernel)
        assert engine._group == (k if grouped else 1)
        assert torch.equal(engine.xnor_counts(x), expected)
    with torch.no_grad():
        assert rel_max_diff(engine(x), layer(x)) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES[:3], ids=IDS[:3])
def test_learned_weight_scale_runs_in_the_engine(shape) -> None:
    """XNOR-Net++'s learned scale (moved away from mean|W| as training moves it) is what the engine multiplies by."""
    c, o, k, stride, padding, dilation, h, w = shape
    layer = binary_layer(c, o, k, stride, padding, dilation, seed=4)
    layer.weight_quantizer = BinaryWeightQuantizer(o)
    layer.weight_quantizer(layer.conv.weight)  # initialize: gain = mean|W|
    with torch.no_grad():
        layer.weight_quantizer.gain.mul_(torch.linspace(0.5, 2.0, o))
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        reference = layer(x)
    engine = BinaryConv2d.from_lowbit(layer)
    assert torch.equal(engine.alpha, layer.weight_quantizer.gain.detach())
    assert rel_max_diff(engine(x), reference) <= 1e-5
    plain = BinaryConv2d.from_lowbit(binary_layer(c, o, k, stride, padding, dilation, seed=4))
    assert rel_max_diff(plain(x), reference) > 1e-2  # mean|W| would not do


def test_padding_is_zero_after_quantization() -> None:
    """The engine follows the layer (pad after quantizing: padded taps are 0), not the other order
    (pad, then quantize: padded taps would be mu +- K), and the difference is visible."""
    layer = binary_layer(40, 16, 3, 1, 1, seed=2, scale=0.3)
    with torch.no_grad():
        layer.input_quantizer.offset.add_(1.0)  # mu far from 0: padded taps would weigh a lot
    x = torch.randn(2, 40, 7, 7) + 1.0
    out = BinaryConv2d.from_lowbit(layer)(x)
    with torch.no_grad():
        reference = layer(x)
        padded_first = F.conv2d(
            layer.input_quantizer(F.pad(x, (1, 1, 1, 1))),
            layer.weight_quantizer(layer.conv.weight),
            layer.conv.bias,
        )
    assert rel_max_diff(out, reference) <= 1e-5
    assert rel_max_diff(out, padded_first) > 1e-2


def test_sign_of_zero_is_plus_one() -> None:
    layer = binary_layer(66, 8, 3, 1, 1, seed=3)
    with torch.no_grad():
        layer.conv.weight[:, ::3] = 0.0
    x = torch.randn(2, 66, 6, 6)
    x[:, ::2] = layer.input_quantizer.offset[::2].view(1, -1, 1, 1)  # (x - mu) / K == 0 exactly
    engine = BinaryConv2d.from_lowbit(layer)
    assert torch.equal(engine.xnor_counts(x), integer_counts(layer, x))
    with torch.no_grad():
        assert rel_max_diff(engine(x), layer(x)) <= 1e-5


@pytest.mark.parametrize("kernel", ["vector-bytes", "vector-wide", "portable"])
def test_long_reductions_do_not_overflow(kernel: str) -> None:
    """640 channels x 9 taps = 90 words per output, every bit different: each byte counter reaches
    31 x 8 = 248 before it is folded; one tap more per fold would wrap."""
    layer = binary_layer(640, 6, 3, 1, 1, seed=4)
    with torch.no_grad():
        layer.conv.weight.copy_(-layer.conv.weight.abs() - 0.1)
    x = layer.input_quantizer.offset.view(1, -1, 1, 1) + torch.rand(2, 640, 5, 5) + 0.1
    counts = BinaryConv2d.from_lowbit(layer, kernel=kernel).xnor_counts(x)
    expected = integer_counts(layer, x)
    assert int(expected[0, 0, 2, 2]) == -640 * 9
    assert torch.equal(counts, expected)


@pytest.mark.parametrize("kernel", ["vector-bytes", "vector-wide"])
def test_vector_kernels_equal_portable(kernel: str) -> None:
    layer = binary_layer(130, 70, 3, 2, 1, seed=5)
    x = torch.randn(2, 130, 13, 10)
    fast, portable = (
        BinaryConv2d.from_lowbit(layer, kernel=kernel),
        BinaryConv2d.from_lowbit(layer, kernel="portable"),
    )
    assert torch.equal(fast.xnor_counts(x), portable.xnor_counts(x))
    torch.testing.assert_close(fast(x), portable(x), rtol=1e-6, atol=1e-6)


def test_kernel_choice_from_environment(monkeypatch) -> None:
    monkeypatch.setenv(KERNEL_ENV, "portable")
    assert resolve_kernel() == "portable"
    assert resolve_kernel("vector-wide") == "vector-wide"  # an explicit choice wins
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(QCompressError, match="unknown binary kernel"):
        resolve_kernel()
    monkeypatch.delenv(KERNEL_ENV)
    wide = cpu_info().instruction_sets["avx512_vpopcntdq"]
    assert resolve_kernel() == ("vector-wide" if wide else "vector-bytes")


def test_per_channel_scale_is_refused() -> None:
    layer = binary_layer(8, 4, 3, 1, 1)
    with torch.no_grad():
        layer.input_quantizer.scale.copy_(torch.linspace(0.5, 1.0, 8))
    with pytest.raises(QCompressError, match="per-channel activation scale"):
        BinaryConv2d.from_lowbit(layer)


def _small_model() -> nn.Sequential:
    depthwise = binary_layer(16, 16, 3, 1, 1, seed=8)
    depthwise.conv = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
    per_channel = binary_layer(16, 16, 1, seed=9)
    with torch.no_grad():
        per_channel.input_quantizer.scale.copy_(torch.linspace(0.5, 1.0, 16))
    lsq = LowBitConv2d(nn.Conv2d(16, 8, 1), LSQQuantizer(4, signed=True), LSQQuantizer(4))
    lsq.weight_quantizer.initialized.fill_(True)
    lsq.input_quantizer.initialized.fill_(True)
    return nn.Sequential(
        nn.Conv2d(3, 70, 3, 1, 1),
        nn.BatchNorm2d(70),
        nn.ReLU6(),
        binary_layer(70, 32, 3, 2, 1, seed=6),
        nn.ReLU(),
        binary_layer(32, 16, 1, seed=7),
        depthwise,
        per_channel,
        lsq,
    ).eval()


def test_convert_binary_keeps_the_model_output() -> None:
    model = _small_model()
    x = torch.randn(2, 3, 20, 18)
    with torch.no_grad():
        before = model(x)
    converted, record = convert_binary(model)
    assert record.converted == ["3", "5"]
    assert set(record.skipped) == {"6", "7"}
    assert "groups=16" in record.skipped["6"] and "per-channel" in record.skipped["7"]
    assert isinstance(converted[3], BinaryConv2d) and isinstance(converted[5], BinaryConv2d)
    assert isinstance(model[3], LowBitConv2d)  # not in place by default
    with torch.no_grad():
        after = converted(x)
    assert rel_max_diff(after, before) <= 1e-5


def _random_bn(channels: int, seed: int) -> nn.BatchNorm2d:
    """An eval-mode BN with running statistics and some negative gammas (a sign flip to fold)."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.2)
    return bn


class _DeclaredBlock(nn.Module):
    """A block whose forward wires its attributes (conv -> bn) and declares so, like the ResNet blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = binary_layer(32, 32, 3, 1, 1, seed=12)
        self.bn = _random_bn(32, 13)
        self.qcompress_fusion_groups = [["conv", "bn"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + x


@pytest.mark.parametrize("learned", [False, True], ids=["mean-abs", "learned"])
def test_folding_batchnorm_keeps_the_output_and_runs_in_the_engine(learned: bool) -> None:
    """BN folded into a binary layer (negative gammas flip weight signs), a float conv and a transposed conv:
    the folded fake-quant model and its engine twin compute what the unfolded model computes."""
    binary = binary_layer(16, 32, 3, 1, 1, seed=10)
    if learned:
        binary.weight_quantizer = BinaryWeightQuantizer(32)
        binary.weight_quantizer(binary.conv.weight)
        with torch.no_grad():
            binary.weight_quantizer.gain.mul_(torch.linspace(0.5, 2.0, 32))
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1), _random_bn(16, 1), nn.ReLU(),
        binary, _random_bn(32, 2), nn.ReLU(),
        _DeclaredBlock(),
        nn.ConvTranspose2d(32, 8, 4, 2, 1), _random_bn(8, 3), nn.ReLU(),
        LowBitConvTranspose2d(nn.ConvTranspose2d(8, 8, 4, 2, 1), BinaryWeightQuantizer(), BinaryActivationQuantizer(8)),
        _random_bn(8, 4),
    ).eval()
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad():
        before = model(x)
    folded = copy.deepcopy(model)
    assert sorted(fold_batchnorm(folded)) == ["1", "11", "4", "6.bn", "8"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    engine, record = convert_binary(model, fold_bn=True)
    assert sorted(record.folded) == ["1", "11", "4", "6.bn", "8"] and record.converted == ["3", "6.conv", "10"]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the source is left as it was
    with torch.no_grad():
        assert rel_max_diff(folded(x), before) <= 1e-5
        assert rel_max_diff(engine(x), before) <= 1e-5


@pytest.mark.parametrize("epilogue", ["affine", "affine + relu", "spatial", "spatial + relu"])
@pytest.mark.parametrize("rows", ["whole image", "few rows"])
@pytest.mark.parametrize("kernel", ["vector-bytes", "vector-wide", "portable"])
def test_kernels_write_only_their_output(kernel: str, rows: str, epilogue: str) -> None:
    """The vector epilogue writes whole vectors past row ends (into rows its job writes later, reading the K(x)
    map as far); none may land outside the output, whether a job covers a whole image or a row or two."""
    import numpy as np

    from qcompress.runtime import _binary_kernels as kernels
    from qcompress.runtime.binary import _spatial_scale_map

    for c, o, k, stride, padding, dilation, h, w in [
        SHAPES[7],
        SHAPES[6],
        SHAPES[5],
        (64, 13, 3, 1, 1, 1, 3, 9),
    ]:
        layer = binary_layer(c, o, k, stride, padding, dilation, seed=10)
        layer.input_quantizer.spatial = epilogue.startswith("spatial")
        engine = BinaryConv2d.from_lowbit(layer, kernel="portable")
        engine.relu = epilogue.endswith("relu")
        x = torch.randn(2, c, h, w)
        expected = engine(x).numpy()
        plan = engine._plan(h, w)
        xs = x.numpy().reshape(2, c, h * w)
        packed = engine._pack(xs, w, plan)
        guarded = np.full(expected.size + 64, 12345.0, np.float32)
        out = guarded[32 : 32 + expected.size].reshape(expected.shape)
        jobs_rows = plan.out_h if rows == "whole image" else 1
        weights = engine.packed_weight.numpy().view(np.uint64)
        if engine.spatial:
            mu, alpha, geometry = plan.spatial_arrays(engine, torch.float32)
            kmap = np.empty(2 * plan.out_h * plan.out_w, np.float32)
            _spatial_scale_map()(xs, w, mu, *geometry, kmap.reshape(2, plan.out_h, plan.out_w))
            scaled = engine._epilogue_args(np.dtype(np.float32), False, kmap, alpha)
        else:
            scaled = engine._epilogue_args(np.dtype(np.float32), False)
        args = (
            packed,
            weights,
            plan.offsets,
            plan.wq,
            jobs_rows,
            plan.affine(np.dtype(np.float32), False),
            out,
        )
        if kernel == "portable":
            kernels.conv_portable(*args, scaled)
        else:
            kernels.conv_vector(*args, kernel == "vector-wide", scaled)
        assert (guarded[:32] == 12345.0).all() and (guarded[-32:] == 12345.0).all()
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)
        assert (expected >= 0).all() if engine.relu else (expected < 0).any()


@torch.no_grad()
def spatial_reference(layer: LowBitConv2d, x: torch.Tensor) -> torch.Tensor:
    """XNOR-Net's scaled binary conv by unfold in float64: at output p, alpha_o * (K(p) * sum_valid s w +
    sum_valid mu w) + b, K(p) = the mean over the k x k taps of mean_c |x - mu| (a padded tap counts 0)."""
    aq, conv = layer.input_quantizer, layer.conv
    s, w = signs(layer, x)
    mu = aq.offset.double().view(1, -1, 1, 1)
    taps = conv.kernel_size[0] * conv.kernel_size[1]

    def unfold(t: torch.Tensor) -> torch.Tensor:
        return F.unfold(t, conv.kernel_size, conv.dilation, conv.padding, conv.stride)

    flat_w = w.double().reshape(w.shape[0], -1)
    counts = torch.einsum("nkl,ok->nol", unfold(s.double()), flat_w)
    mu_part = torch.einsum("nkl,ok->nol", unfold(mu.expand(1, *x.shape[1:]).contiguous()), flat_w)
    k = unfold((x.double() - mu).abs().mean(dim=1, keepdim=True)).sum(dim=1, keepdim=True) / taps
    alpha = conv.weight.abs().mean(dim=(1, 2, 3)).double().view(1, -1, 1)
    out = alpha * (k * counts + mu_part) + conv.bias.double().view(1, -1, 1)
    out_h = (x.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
    return out.reshape(x.shape[0], w.shape[0], out_h, -1)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_spatial_scale_engine_equals_fake_quant_and_unfold_reference(shape) -> None:
    """--binary-scale spatial: the engine's popcount counts times K(x) per output position equal the
    fake-quant layer and an unfold reference, borders (zero padding after quantization) included."""
    c, o, k, stride, padding, dilation, h, w = shape
    layer = binary_layer(c, o, k, stride, padding, dilation, seed=2)
    layer.input_quantizer.spatial = True
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        fake = layer(x)
    reference = spatial_reference(layer, x)
    assert rel_max_diff(fake, reference) <= 1e-5
    engine = BinaryConv2d.from_lowbit(layer)
    assert engine.spatial
    assert rel_max_diff(engine(x), reference) <= 1e-5
    layer.input_quantizer.spatial = False  # the per-layer K gives another output on this input
    assert rel_max_diff(BinaryConv2d.from_lowbit(layer)(x), reference) > 1e-2


def test_spatial_scale_equals_layer_scale_where_the_input_magnitude_is_k() -> None:
    """With |x - mu| = K at every input, K(x) = K at every output whose taps lie inside the image, so the
    scaled form is the per-layer form there (it differs only at the zero-padded border)."""
    layer = binary_layer(8, 6, 3, 1, 1, 1, seed=3, scale=0.7)
    mu = layer.input_quantizer.offset.view(1, -1, 1, 1)
    g = torch.Generator().manual_seed(4)
    x = mu + 0.7 * torch.where(torch.rand(2, 8, 7, 9, generator=g) > 0.5, 1.0, -1.0)
    with torch.no_grad():
        plain = layer(x)
        layer.input_quantizer.spatial = True
        scaled = layer(x)
    torch.testing.assert_close(scaled[:, :, 1:-1, 1:-1], plain[:, :, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial", [False, True], ids=["layer K", "spatial K"])
def test_relu_after_a_converted_conv_runs_in_its_epilogue(spatial: bool) -> None:
    """Conv -> BN -> ReLU in a Sequential: BN folds, the ReLU moves into the engine layer's epilogue (it becomes
    Identity) and the output is the fake-quant model's, NaNs where it has them; a ReLU whose input is not an
    engine layer's output stays."""
    layer = binary_layer(16, 8, 3, 1, 1, 1, seed=6)
    layer.input_quantizer.spatial = spatial
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.weight.normal_()
    model = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU(), layer, bn, nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 16, 9, 10)
    engine, record = convert_binary(model, fold_bn=True)
    assert record.relus == ["4"] and isinstance(engine[4], nn.Identity) and type(engine[1]) is nn.ReLU
    assert engine[2].relu and "relu" in repr(engine[2])
    with torch.no_grad():
        expected = model[:5](x)
        assert (expected == 0).any() and (expected > 0).any()
        assert rel_max_diff(engine[:5](x), expected) <= 1e-5
        assert rel_max_diff(engine(x), model(x)) <= 1e-5
        class Branches(nn.Sequential):  # runs its children otherwise: its ReLU stays
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self[0](x) + self[1](self[0](x))

        other, record = convert_binary(Branches(layer, nn.ReLU()).eval())
        assert record.relus == [] and type(other[1]) is nn.ReLU and not other[0].relu
        if spatial:  # a NaN input makes K(x) NaN around it, and ReLU keeps a NaN
            nan_in = x.clone()
            nan_in[0, :, 4, 4] = float("nan")
            nan_out = torch.isnan(model(nan_in))
            assert nan_out.any() and torch.equal(torch.isnan(engine(nan_in)), nan_out)


# (in, out, kernel, stride, padding, output_padding, height, width)
TRANSPOSED = [
    (16, 8, 4, 2, 1, 0, 5, 7),  # CenterNet's upsampling stage
    (70, 5, 3, 2, 1, 1, 4, 6),  # odd kernel, output padding, 70 channels (two words)
    (3, 4, 3, 1, 1, 0, 6, 5),  # stride 1: one phase, a flipped correlation
    (8, 6, (5, 3), (3, 2), (2, 0), (1, 1), 4, 3),  # rectangular: phases with different tap counts
    (5, 4, 2, 2, 0, 0, 3, 3),  # kernel = stride: no overlap
]


@pytest.mark.parametrize("shape", TRANSPOSED, ids=[f"t{i}" for i in range(len(TRANSPOSED))])
def test_transposed_conv_engine_equals_fake_quant_and_float_reference(shape) -> None:
    """The sub-pixel phases in the engine = the fake-quant LowBitConvTranspose2d = F.conv_transpose2d of the
    quantized input (K s + mu) and weight (alpha sign W, alpha per output channel over the whole kernel)."""
    c, o, k, stride, padding, output_padding, h, w = shape
    g = torch.Generator().manual_seed(7)
    conv = nn.ConvTranspose2d(c, o, k, stride, padding, output_padding)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(o, generator=g))
    aq = BinaryActivationQuantizer(c)
    layer = LowBitConvTranspose2d(conv, BinaryWeightQuantizer(), aq).eval()
    x = torch.randn(2, c, h, w, generator=g) + 0.3
    with torch.no_grad():
        reference = layer(x)
        mu, scale = aq.offset.view(1, -1, 1, 1), aq.scale.view(1, -1, 1, 1)
        a = torch.where(x - mu >= 0, 1.0, -1.0).double() * scale.double() + mu.double()
        alpha = conv.weight.abs().mean(dim=(0, 2, 3)).double().view(1, -1, 1, 1)
        wq = torch.where(conv.weight >= 0, 1.0, -1.0).double() * alpha
        exact = F.conv_transpose2d(a, wq, conv.bias.double(), stride, padding, output_padding)
    engine = BinaryConvTranspose2d.from_lowbit(layer)
    out = engine(x)
    assert out.shape == reference.shape == exact.shape
    assert rel_max_diff(out, reference) <= 1e-5 and rel_max_diff(out, exact) <= 1e-6
