"""The bitpacked binary engine on Linear layers: BinaryLinear against the fake-quant LowBitLinear it
replaces and an integer reference of its XNOR-popcount counts; convert_binary on a model with binary
convs and Linears."""

from __future__ import annotations

import numba
import pytest
import torch
from torch import nn

from qcompress.errors import QCompressError
from qcompress.quant.lowbit import LowBitConv2d, LowBitLinear, make_quantizers, wrap_convs
from qcompress.runtime.binary import BinaryConv2d, BinaryLinear, convert_binary

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, IN, OUT = 7, 130, 33  # 130 features: two full 64-bit words and a remainder of 2


@torch.no_grad()
def binary_linear(c: int = IN, o: int = OUT, bias: bool = True, seed: int = 0,
                  rows: int = 16) -> LowBitLinear:
    """A binary LowBitLinear (qat's quantizers: mu per feature, one K) initialised on a batch."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(c, o, bias=bias)
    linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
    if bias:
        linear.bias.copy_(torch.randn(o, generator=g))
    layer = LowBitLinear(linear, *make_quantizers("binary", 1, 1, linear)).eval()
    layer(torch.rand(rows, c, generator=g) * 2)  # the quantizer takes mu and K from this batch
    return layer


@torch.no_grad()
def integer_counts(layer: LowBitLinear, x: torch.Tensor) -> torch.Tensor:
    """sum over features of s * w with s, w in {-1, +1} (0 -> +1), in int64."""
    aq = layer.input_quantizer
    s = torch.where((x - aq.offset) / aq.scale >= 0, 1, -1)
    w = torch.where(layer.linear.weight >= 0, 1, -1)
    return s.long() @ w.long().T


@torch.no_grad()
def exact_reference(layer: LowBitLinear, x: torch.Tensor) -> torch.Tensor:
    """The fake-quant layer in float64 with exact +-1 signs."""
    aq, linear = layer.input_quantizer, layer.linear
    s = torch.where((x - aq.offset) / aq.scale >= 0, 1.0, -1.0).double()
    a = s * aq.scale.double() + aq.offset.double()
    alpha = linear.weight.abs().mean(dim=1, keepdim=True).double()
    w = torch.where(linear.weight >= 0, 1.0, -1.0).double() * alpha
    return a @ w.T + (0 if linear.bias is None else linear.bias.double())


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_forward_equals_fake_quant_layer(bias: bool) -> None:
    layer = binary_linear(bias=bias, seed=1)
    x = torch.rand(ROWS, IN) * 2
    with torch.no_grad():
        reference = layer(x)
    out = BinaryLinear.from_lowbit(layer)(x)
    assert out.shape == reference.shape == (ROWS, OUT) and out.dtype == reference.dtype
    assert out.is_contiguous()
    assert rel_max_diff(out, reference) <= 1e-5
    assert rel_max_diff(out, exact_reference(layer, x)) <= 1e-6


def test_learned_weight_scale_runs_in_the_engine() -> None:
    linear = nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.weight.normal_(generator=torch.Generator().manual_seed(5))
    layer = LowBitLinear(linear, *make_quantizers("binary", 1, 1, linear, binary_scale="learned")).eval()
    with torch.no_grad():
        layer(torch.rand(16, IN) * 2)
        layer.weight_quantizer.gain.mul_(torch.linspace(0.5, 2.0, OUT))
        x = torch.rand(ROWS, IN) * 2
        reference = layer(x)
    engine = BinaryLinear.from_lowbit(layer)
    assert torch.equal(engine.alpha, layer.weight_quantizer.gain.detach())
    assert rel_max_diff(engine(x), reference) <= 1e-5


@pytest.mark.parametrize("kernel", ["vector-bytes", "vector-wide", "portable"])
def test_counts_equal_integer_reference(kernel: str) -> None:
    layer = binary_linear(seed=2)
    with torch.no_grad():
        layer.linear.weight[:, ::7] = 0.0  # sign(0) = +1
    x = torch.rand(ROWS, IN) * 2
    x[:, ::5] = layer.input_quantizer.offset[::5]  # (x - mu) / K == 0 exactly: +1
    engine = BinaryLinear.from_lowbit(layer, kernel=kernel)
    assert torch.equal(engine.xnor_counts(x), integer_counts(layer, x))
    with torch.no_grad():
        assert rel_max_diff(engine(x), layer(x)) <= 1e-5


def test_rows_split_into_parallel_jobs() -> None:
    """37 rows on 2 numba threads: jobs of 16, 16 and 5 rows (the last one not a whole block of 8)."""
    layer = binary_linear(seed=3)
    x = torch.rand(37, IN) * 2
    engine = BinaryLinear.from_lowbit(layer)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        counts, out = engine.xnor_counts(x), engine(x)
    finally:
        numba.set_num_threads(previous)
    assert torch.equal(counts, integer_counts(layer, x))
    with torch.no_grad():
        assert rel_max_diff(out, layer(x)) <= 1e-5
    assert engine(x[:0]).shape == (0, OUT)


def test_per_feature_scale_and_bad_input_are_refused() -> None:
    layer = binary_linear(seed=4)
    with pytest.raises(QCompressError, match="expected input"):
        BinaryLinear.from_lowbit(layer)(torch.rand(2, 3, IN))
    with torch.no_grad():
        layer.input_quantizer.scale.copy_(torch.linspace(0.5, 1.0, IN))
    with pytest.raises(QCompressError, match="per-channel activation scale"):
        BinaryLinear.from_lowbit(layer)


def test_convert_binary_replaces_convs_and_linears() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, 2, 1),  # binary conv
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, IN),  # binary Linear with bias
        nn.ReLU(),
        nn.Linear(IN, OUT, bias=False),  # binary Linear without bias
        nn.ReLU(),
        nn.Linear(OUT, 5),  # binary, one K per feature: no XNOR form
    ).eval()
    wrap_convs(model, ["2", "5", "7"], "binary", 1, 1)
    model[9] = LowBitLinear(model[9], *make_quantizers("binary", 1, 1, model[9]))
    model[9].input_quantizer._shared_scale = False
    x = torch.randn(ROWS, 3, 8, 8)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model[int(n)].register_forward_hook(lambda m, args, out, n=n: inputs.__setitem__(n, args[0]))
             for n in ("2", "5", "7")]
    with torch.no_grad():
        model(x)  # initialises every quantizer; the hooks keep what each binary layer sees
    for hook in hooks:
        hook.remove()
    converted, record = convert_binary(model)
    assert record.converted == ["2", "5", "7"]
    assert list(record.skipped) == ["9"] and "per-channel" in record.skipped["9"]
    assert isinstance(converted[2], BinaryConv2d)
    assert isinstance(converted[5], BinaryLinear) and isinstance(converted[7], BinaryLinear)
    assert converted[5].bias is not None and converted[7].bias is None
    assert isinstance(model[5], LowBitLinear) and isinstance(model[2], LowBitConv2d)  # not in place
    # the ReLUs after converted layers run in their epilogues; the one after the float conv stays
    assert record.relus == ["3", "6", "8"] and isinstance(converted[1], nn.ReLU)
    assert all(isinstance(converted[i], nn.Identity) for i in (3, 6, 8)) and isinstance(model[3], nn.ReLU)
    with torch.no_grad():
        # layer by layer: through a chain of sign functions, rounding differences of 1e-7 can flip a sign
        # that lies that close to mu, so whole-model outputs need not agree to 1e-5
        for n, a in inputs.items():
            assert rel_max_diff(converted[int(n)](a), torch.relu(model[int(n)](a))) <= 1e-5, n
        assert converted(x).shape == (ROWS, 5)


def test_spatial_scale_engine_equals_fake_quant_and_reference() -> None:
    """--binary-scale spatial for a Linear: K(x) is each row's mean |x - mu|."""
    layer = binary_linear(seed=5)
    layer.input_quantizer.spatial = True
    x = torch.randn(ROWS, IN) * 3
    aq, linear = layer.input_quantizer, layer.linear
    alpha = linear.weight.abs().mean(dim=1).double()
    k_rows = (x.double() - aq.offset.double()).abs().mean(dim=1, keepdim=True)
    mu_part = torch.where(linear.weight >= 0, 1.0, -1.0).double() @ aq.offset.double()
    reference = alpha * (k_rows * integer_counts(layer, x).double() + mu_part) + linear.bias.double()
    with torch.no_grad():
        assert rel_max_diff(layer(x), reference) <= 1e-5
    for kernel in ("auto", "portable"):  # the scale is applied in either kernel's epilogue
        engine = BinaryLinear.from_lowbit(layer, kernel=kernel)
        assert engine.spatial and rel_max_diff(engine(x), reference) <= 1e-6, kernel
