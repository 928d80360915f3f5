"""Low-bit fake quantizers against hand-computed references: forward values and the published gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from qcompress.bench.size import conv_macs, estimate_bops, weight_compression
from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.errors import QCompressError
from qcompress.models import build_detector
from qcompress.models.registry import compression_spec
from qcompress.quant.lowbit import (
    MIN_STEP,
    BinaryActivationQuantizer,
    BinaryWeightQuantizer,
    DoReFaActivationQuantizer,
    DoReFaWeightQuantizer,
    LowBitConfig,
    LowBitConv2d,
    LSQQuantizer,
    PACTQuantizer,
    apply_lowbit,
    initialize_lowbit,
    layer_bits,
    make_quantizers,
    sign_ste,
)

MB2 = compression_spec("mb2-ssd-lite")

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["BACKGROUND", "a", "b"]


def _ready(q, **values):
    """A quantizer with given state, marked initialised (no data-dependent start)."""
    with torch.no_grad():
        for name, value in values.items():
            getattr(q, name).fill_(value)
    q.initialized.fill_(True)
    return q


# ------------------------------------------------------------------------------------------- LSQ
@pytest.mark.parametrize("signed,bits", [(True, 4), (False, 4), (True, 2), (False, 8)])
def test_lsq_forward_is_quantize_dequantize(signed, bits):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    q = _ready(LSQQuantizer(bits, signed=signed), step=0.37)
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    reference = torch.fake_quantize_per_tensor_affine(x, 0.37, 0, -qn, qp)
    assert torch.allclose(q(x), reference, atol=1e-6)


@pytest.mark.parametrize(
    "step,expected_step_grad",
    [
        # v/s = [-3, -0.6, 0.2, 0.7, 5]: clipped low -> -Qn = -2; inside -> round(v/s) - v/s; clipped high -> Qp = 1
        (1.0, -2 + (-1 + 0.6) + (0 - 0.2) + (1 - 0.7) + 1),
        # v/s = [-6, -1.2, 0.4, 1.4, 10]: -2, (-1 + 1.2), (0 - 0.4), 1, 1
        (0.5, -2 + (-1 + 1.2) + (0 - 0.4) + 1 + 1),
    ],
)
def test_lsq_gradients_are_the_published_ones(step, expected_step_grad):
    """Esser et al. 2020 eq. 3 for the step, times g = 1/sqrt(N * Qp); straight-through for x inside the range."""
    x = torch.tensor([-3.0, -0.6, 0.2, 0.7, 5.0], requires_grad=True)
    q = _ready(LSQQuantizer(2, signed=True), step=step)  # 2 bits signed: Qn = 2, Qp = 1
    q(x).sum().backward()
    g = 1 / math.sqrt(x.numel() * 1)
    assert q.step.grad.item() == pytest.approx(expected_step_grad * g, abs=1e-6)
    inside = (x / step >= -2) & (x / step <= 1)
    assert torch.equal(x.grad, inside.float())


def test_lsq_activation_gradient_scale_counts_features_per_sample_and_qp():
    """g = 1 / sqrt(N_F * Qp) with N_F the features of one sample (Esser et al. sec. 2.2), not of the batch.

    3-bit unsigned: Qn = 0, Qp = 7. x / s = [-2, 0.4, 2.6 | 8, 5.2, 1.4] (2 samples x 3 features):
    eq. 3 terms -Qn = 0, -0.4, 0.4, Qp = 7, -0.2, -0.4; sum 6.4.
    """
    conv = nn.Conv2d(1, 1, 1)
    _, quantizer = make_quantizers("lsq", 4, 3, conv)
    quantizer = _ready(quantizer, step=0.5)
    x = torch.tensor([-1.0, 0.2, 1.3, 4.0, 2.6, 0.7]).view(2, 1, 1, 3)
    quantizer(x).sum().backward()
    assert quantizer.levels() == (0, 7)
    assert quantizer.step.grad.item() == pytest.approx(6.4 / math.sqrt(3 * 7), abs=1e-5)


def test_lsq_weight_gradient_scale_uses_qp():
    """4-bit signed weights: Qn = 8, Qp = 7; w / s = [-9, 1.2, 5, 30] -> -8, -0.2, 0, 7; g = 1 / sqrt(4 * 7)."""
    conv = nn.Conv2d(1, 2, (1, 2))
    quantizer, _ = make_quantizers("lsq", 4, 4, conv)
    quantizer = _ready(quantizer, step=0.1)
    w = torch.tensor([-0.9, 0.12, 0.5, 3.0], requires_grad=True).view(2, 1, 1, 2)
    quantizer(w).sum().backward()
    assert quantizer.step.grad.item() == pytest.approx(-1.2 / math.sqrt(4 * 7), abs=1e-5)


@pytest.mark.parametrize("step", [0.0, -0.5])
def test_lsq_step_is_kept_positive(step):
    """A step pushed to zero or below by the optimizer quantizes with the smallest positive step instead
    of dividing by zero or flipping the sign of every output; its gradient still reaches the parameter."""
    x = torch.tensor([-1.0, 0.0, 1e-8, 3.0])
    q = _ready(LSQQuantizer(4, signed=False), step=step)
    out = q(x)
    reference = torch.fake_quantize_per_tensor_affine(x, MIN_STEP, 0, 0, 15)
    assert torch.isfinite(out).all() and torch.allclose(out, reference, atol=1e-12)
    out.sum().backward()
    assert torch.isfinite(q.step.grad).all() and q.step.grad.item() != 0.0


def test_lsq_initial_step_and_sign_from_first_batch():
    q = LSQQuantizer(4, activation=True)  # no percentile: LSQ's own start, 2 mean|x| / sqrt(Qp)
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])  # non-negative: unsigned, Qp = 15
    q(x)
    assert not bool(q.signed)
    assert q.step.item() == pytest.approx(2 * 1.5 / math.sqrt(15))
    signed = LSQQuantizer(4)
    signed(torch.tensor([-1.0, 1.0]))
    assert bool(signed.signed) and signed.levels() == (8, 7)


# ------------------------------------------------------------------------------------------ PACT
def test_pact_forward_is_clip_then_uniform_quantization():
    x = torch.linspace(-2, 8, 101)
    q = _ready(PACTQuantizer(4, signed=False), alpha=5.0)
    reference = torch.fake_quantize_per_tensor_affine(x.clamp(0, 5.0), 5.0 / 15, 0, 0, 15)
    assert torch.allclose(q(x), reference, atol=1e-6)


def test_pact_gradients_are_the_published_ones():
    """Choi et al. 2018 eq. 3: d y_q / d alpha = 1 where x >= alpha; STE to x on [0, alpha)."""
    x = torch.tensor([-1.0, 0.5, 2.0, 3.5], requires_grad=True)
    q = _ready(PACTQuantizer(2, signed=False), alpha=2.0)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (q(x) * upstream).sum().backward()
    assert q.alpha.grad.item() == pytest.approx(3.0 + 4.0)
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 0.0, 0.0]))


def test_signed_pact_clips_both_sides():
    x = torch.tensor([-3.0, -1.2, 0.5, 2.5], requires_grad=True)
    q = _ready(PACTQuantizer(2, signed=True), alpha=2.0)
    upstream = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = q(x)
    assert torch.allclose(y, torch.tensor([-2.0, -2.0, 0.0, 2.0]))  # one level per side at 2 bits
    (y * upstream).sum().backward()
    assert q.alpha.grad.item() == pytest.approx(4.0 - 1.0)
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 0.0]))


# ---------------------------------------------------------------------------------------- DoReFa
def test_dorefa_weights_follow_the_paper_formula():
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.3
    bits = 3
    t = torch.tanh(w)
    peak = t.abs().max()
    levels = 2**bits - 1
    paper = 2 * torch.round((t / (2 * peak) + 0.5) * levels) / levels - 1  # in [-1, 1]
    out = DoReFaWeightQuantizer(bits)(w)
    assert torch.allclose(out, paper * peak, atol=1e-6)
    assert len(torch.unique(out)) <= 2**bits


def test_dorefa_activations_with_unit_clip_are_the_paper_quantizer():
    x = torch.linspace(-0.49, 1.51, 41, requires_grad=True)  # no point on a clip boundary
    q = _ready(DoReFaActivationQuantizer(2, signed=False), clip=1.0)
    y = q(x)
    assert torch.allclose(y, torch.round(x.detach().clamp(0, 1) * 3) / 3, atol=1e-6)
    y.sum().backward()
    assert torch.equal(x.grad, ((x >= 0) & (x <= 1)).float())  # STE through round, clip gradient outside


@pytest.mark.parametrize("signed", [False, True])
def test_dorefa_activation_clip_minimises_the_squared_error(signed):
    """The first-batch clip against a brute-force search over 2,000 clips (a loop reference), on a
    heavy-tailed ReLU-like sample where the max (the former clip) leaves almost every value at zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.Exponential(1.0).sample((20_000,)) if not signed else torch.randn(20_000, generator=g)
    x[0] = 40.0  # one outlier
    q = DoReFaActivationQuantizer(2, signed=signed)
    q(x)  # the first batch sets the clip

    def mse(r: float) -> float:
        if signed:
            y = (2 * torch.round((torch.clamp(x / r, -1, 1) * 0.5 + 0.5) * 3) / 3 - 1) * r
        else:
            y = torch.round(torch.clamp(x / r, 0, 1) * 3) / 3 * r
        return float(((y - x) ** 2).mean())

    best = min(mse(40.0 * i / 2000) for i in range(1, 2001))
    assert mse(float(q.clip)) <= 1.05 * best
    assert mse(40.0) > 3 * mse(float(q.clip))
    clip = float(q.clip)
    q(3 * x)
    assert float(q.clip) == clip  # fixed after the first batch


# ---------------------------------------------------------------------------------------- binary
def test_sign_ste_forward_and_clipped_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = sign_ste(x)
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_binary_weights_are_sign_times_mean_abs_per_output_channel():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    out = BinaryWeightQuantizer()(w)
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, torch.where(w >= 0, 1.0, -1.0) * alpha)


def test_learned_binary_scale_starts_at_mean_abs_and_learns_by_its_gradient():
    """XNOR-Net++: the per-output scale is a parameter; d out / d gain_o = sum of grad * sign(W) over row o."""
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    quantizer = BinaryWeightQuantizer(6)
    out = quantizer(w)
    signs = torch.where(w >= 0, 1.0, -1.0).detach()
    assert torch.allclose(quantizer.gain, w.detach().abs().mean(dim=(1, 2, 3)))
    assert torch.allclose(out, signs * w.detach().abs().mean(dim=(1, 2, 3), keepdim=True))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    assert torch.allclose(quantizer.gain.grad, (grad * signs).sum(dim=(1, 2, 3)), atol=1e-5)
    with torch.no_grad():
        quantizer.gain.mul_(torch.arange(1.0, 7.0))  # no longer mean|W|: the output follows the parameter
        assert torch.allclose(quantizer(w), signs * quantizer.gain.view(-1, 1, 1, 1))


def test_binary_activations_plain_and_centred():
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3)) * 2
    plain = _ready(BinaryActivationQuantizer(4, calibrate=False))
    assert torch.equal(plain(x), torch.where(x >= 0, 1.0, -1.0))
    relu6_out = x.clamp(0, 6)
    mu = relu6_out.mean(dim=(0, 2, 3), keepdim=True)
    # Per-channel K (simulation only): mu = per-channel mean, K = mean |x - mu| per channel; outputs mu +- K
    per_channel = BinaryActivationQuantizer(4, shared_scale=False)
    y = per_channel(relu6_out)
    k = (relu6_out - mu).abs().mean(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(y, torch.where(relu6_out >= mu, mu + k, mu - k), rtol=0, atol=1e-6)
    assert all(len(torch.unique(y[:, c])) == 2 for c in range(4))  # not constant after ReLU6
    # The default: XNOR-Net's one scale per layer, K = mean |x - mu| over every channel (what the
    # bitpacked engine can run exactly)
    shared = BinaryActivationQuantizer(4)
    y = shared(relu6_out)
    k_layer = (relu6_out - mu).abs().mean()
    assert torch.allclose(y, torch.where(relu6_out >= mu, mu + k_layer, mu - k_layer), rtol=0, atol=1e-6)
    assert torch.all(shared.scale == shared.scale[0])


# ----------------------------------------------------------------------------- layers and model
def test_lowbit_conv_quantizes_input_and_weight():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    wq, aq = _ready(LSQQuantizer(4, signed=True), step=0.05), _ready(LSQQuantizer(4, signed=False), step=0.2)
    layer = LowBitConv2d(conv, wq, aq)
    x = torch.rand(2, 3, 6, 6) * 3
    ref = nn.functional.conv2d(
        torch.fake_quantize_per_tensor_affine(x, 0.2, 0, 0, 15),
        torch.fake_quantize_per_tensor_affine(conv.weight, 0.05, 0, -8, 7),
        conv.bias, padding=1,
    )
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert layer.bits == (4, 4)


@pytest.fixture(scope="module")
def ssd():
    torch.manual_seed(0)
    return randomize_bn(build_detector("mb2-ssd-lite", CLASSES).model)


def _convs(model):
    return [n for n, m in model.named_modules() if type(m) is nn.Conv2d]


def test_scopes_select_backbone_or_all_and_keep_first_conv_and_heads(ssd):
    import copy

    convs = _convs(ssd)
    backbone = apply_lowbit(copy.deepcopy(ssd), "lsq", 4, 4, "backbone", spec=MB2)
    assert backbone.layers and all(n.startswith("base_net.") for n in backbone.layers)
    assert "base_net.0.0" not in backbone.layers and backbone.kept_float == ["base_net.0.0"]
    everything = apply_lowbit(copy.deepcopy(ssd), "pact", 2, 4, "all", spec=MB2)
    assert any(n.startswith("extras.") for n in everything.layers)
    assert not any("headers" in n for n in everything.layers) and "base_net.0.0" in everything.kept_float
    assert set(everything.layers) | set(everything.kept_float) == set(convs)
    model = copy.deepcopy(ssd)
    full = apply_lowbit(model, "dorefa", 4, 4, "all", keep_first_and_heads=False, spec=MB2)
    assert set(full.layers) == set(convs) and not full.kept_float
    assert sum(isinstance(m, LowBitConv2d) for m in model.modules()) == len(convs)
    binary = apply_lowbit(copy.deepcopy(ssd), "binary", 4, 4, "backbone", spec=MB2)
    assert (binary.bits_w, binary.bits_a) == (1, 1)
    with pytest.raises(QCompressError):
        apply_lowbit(copy.deepcopy(ssd), "lsq", 1, 4, "backbone", spec=MB2)
    with pytest.raises(QCompressError):
        apply_lowbit(copy.deepcopy(ssd), "lsq", 4, 4, "heads", spec=MB2)


def test_bops_and_weight_compression_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    macs = conv_macs(model, (1, 3, 8, 8))
    assert macs == {"0": 8 * 8 * 8 * 3 * 9, "2": 8 * 8 * 4 * 8}
    bops = estimate_bops(macs, {"0": (4, 4)})
    assert bops.total_bops == macs["0"] * 16 + macs["2"] * 32 * 32
    assert bops.float_bops == (macs["0"] + macs["2"]) * 1024
    assert estimate_bops(macs, {"0": (2, 2), "2": (2, 2)}).speedup == pytest.approx(256)
    # weights 8*3*9 = 216 at 4 bits, bias 8 and the 1x1 conv (32 weights) at 32 bits
    assert weight_compression(model, {"0": (4, 4)}) == pytest.approx((216 + 8 + 32) * 32 / (216 * 4 + 8 * 32 + 32 * 32))


@pytest.mark.parametrize("method", ["lsq", "pact", "dorefa", "binary"])
def test_lowbit_checkpoint_reloads_with_the_same_outputs(method, tmp_path):
    torch.manual_seed(0)
    detector = build_detector("mb2-ssd-lite", CLASSES)
    randomize_bn(detector.model)
    record = apply_lowbit(detector.model, method, 4, 4, "backbone", spec=MB2)
    x = torch.rand(1, 3, 300, 300) * 1.98 - 0.99
    initialize_lowbit(detector.model, [x])
    save_detector(detector, tmp_path / "low.pth", quantization=record.recipe, command=["test"])
    reloaded = load_detector(tmp_path / "low.pth")
    assert reloaded.source["sidecar"]["quantization"]["research"] is True
    with torch.no_grad():
        for a, b in zip(detector.model.eval()(x), reloaded.model(x)):
            assert torch.equal(a, b)
    assert layer_bits(record)[record.layers[0]] == (record.bits_w, record.bits_a)


def _binary_mb2(binary_scale: str):
    """(detector, record, input) of the MB2 backbone binarized with ``binary_scale``, quantizers initialised."""
    torch.manual_seed(0)
    detector = build_detector("mb2-ssd-lite", CLASSES)
    randomize_bn(detector.model)
    record = apply_lowbit(detector.model, "binary", 1, 1, "backbone", spec=MB2, binary_scale=binary_scale)
    assert record.recipe["binary_scale"] == binary_scale
    x = torch.rand(1, 3, 300, 300) * 1.98 - 0.99
    initialize_lowbit(detector.model, [x])
    return detector, record, x


def _reload_same_outputs(detector, record, x, tmp_path):
    """Save through the recipe, reload, and check the reloaded model's outputs are identical."""
    save_detector(detector, tmp_path / "low.pth", quantization=record.recipe, command=["test"])
    reloaded = load_detector(tmp_path / "low.pth")
    with torch.no_grad():
        for a, b in zip(detector.model.eval()(x), reloaded.model(x)):
            assert torch.equal(a, b)
    return reloaded


def test_binary_spatial_scale_is_recorded_and_reloads(tmp_path):
    detector, record, x = _binary_mb2("spatial")
    assert all(detector.model.get_submodule(n).input_quantizer.spatial for n in record.layers)
    reloaded = _reload_same_outputs(detector, record, x, tmp_path)
    assert reloaded.model.get_submodule(record.layers[0]).input_quantizer.spatial


def test_binary_learned_scale_is_recorded_and_reloads(tmp_path):
    detector, record, x = _binary_mb2("learned")
    first = detector.model.get_submodule(record.layers[0]).weight_quantizer
    with torch.no_grad():
        first.gain.mul_(1.5)  # as training would move it
    reloaded = _reload_same_outputs(detector, record, x, tmp_path)
    assert torch.equal(reloaded.model.get_submodule(record.layers[0]).weight_quantizer.gain, first.gain)


@pytest.mark.parametrize("method,scale,match", [("lsq", "spatial", "for --method binary"),
                                                 ("dorefa", "learned", "for --method binary"),
                                                 ("binary", "pixel", "unknown --binary-scale")])
def test_binary_scale_option_is_checked(method, scale, match):
    with pytest.raises(QCompressError, match=match):
        LowBitConfig(method, 4, 4, "backbone", binary_scale=scale).validate()


def test_binary_keeps_depthwise_convs_float():
    import copy

    torch.manual_seed(0)
    ssd = build_detector("mb2-ssd-lite", ("BACKGROUND", "a")).model
    record = apply_lowbit(copy.deepcopy(ssd), "binary", 1, 1, "backbone", spec=MB2)
    groups = {n: m.groups for n, m in ssd.named_modules() if isinstance(m, nn.Conv2d)}
    assert record.layers and all(groups[n] == 1 for n in record.layers)
    assert {n for n in groups if n.startswith("base_net.") and groups[n] > 1} <= set(record.kept_float)


def test_fully_quantized_mode_quantizes_heads_per_channel_and_reloads(tmp_path):
    torch.manual_seed(0)
    detector = build_detector("mb2-ssd-lite", CLASSES)
    randomize_bn(detector.model)
    plain = apply_lowbit(copy.deepcopy(detector.model), "lsq", 4, 4, "all", spec=MB2)
    record = apply_lowbit(detector.model, "lsq", 4, 4, "all", spec=MB2, fully_quantized=True)
    heads = [n for n in record.layers if n.startswith(("classification_headers", "regression_headers"))]
    assert heads and not any(n.startswith(("classification_headers", "regression_headers")) for n in plain.layers)
    assert record.kept_float == ["base_net.0.0"]  # the first conv stays float unless asked
    x = torch.rand(2, 3, 300, 300) * 1.98 - 0.99
    initialize_lowbit(detector.model, [x])
    conv = detector.model.get_submodule(heads[0])
    w = conv.conv.weight
    step = conv.weight_quantizer.step
    assert step.shape == (w.shape[0], 1, 1, 1)  # one step per output channel, from that channel's weights
    for row, s_ in zip(w.detach().flatten(1)[:8], step.detach().flatten()[:8]):  # each from its own channel
        assert _grid_error(row, float(s_), 8, 7) <= _brute_min_error(row, 8, 7) * 1.01
    save_detector(detector, tmp_path / "fq.pth", quantization=record.recipe, command=["test"])
    reloaded = load_detector(tmp_path / "fq.pth")
    with torch.no_grad():
        for a, b in zip(detector.model.eval()(x), reloaded.model(x)):
            assert torch.equal(a, b)


def test_percentile_initialisation_ignores_rare_outliers():
    x = torch.rand(1, 10_000)
    x[0, 0] = 1000.0  # one outlier
    q = LSQQuantizer(4, activation=True, percentile=0.999)
    q(x)
    assert float(q.step.detach()) == pytest.approx(float(torch.quantile(x.abs(), 0.999)) / 15, rel=1e-4)
    p = PACTQuantizer(4, percentile=0.999)
    p(x)
    assert float(p.alpha.detach()) < 2.0  # the max (1000) would have been the clip without the percentile


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_default_activation_range_is_the_percentile_not_the_from_scratch_start(method):
    """Every low-bit run (not only --heads) starts LSQ / PACT activation ranges at the 99.9th percentile
    (LSQ's own 2 mean|x| / sqrt(Qp) is a from-scratch start; PACT's would be the maximum)."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(8, 4, 16, 16))
    _, quantizer = make_quantizers(method, 4, 4, nn.Conv2d(4, 4, 3))
    quantizer(x)
    top = float(torch.quantile(x.abs().flatten(), 0.999))
    value = float(quantizer.step) * 15 if method == "lsq" else float(quantizer.alpha)
    assert value == pytest.approx(top, rel=1e-4)


def test_heads_needs_scope_all():
    with pytest.raises(QCompressError, match="--scope all"):
        LowBitConfig("lsq", 4, 4, "backbone", fully_quantized=True).validate()


def _grid_error(x: torch.Tensor, step: float, qn: int, qp: int) -> float:
    return float(((torch.clamp(torch.round(x / step), -qn, qp) * step - x) ** 2).sum())


def _brute_min_error(x: torch.Tensor, qn: int, qp: int, n: int = 4000) -> float:
    """The least squared error of the grid step * [-qn .. qp] over n clips step * qp spread in (0, max|x|]."""
    top = float(x.abs().max())
    return min(_grid_error(x, top * i / n / qp, qn, qp) for i in range(1, n + 1))


@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_weight_step_starts_at_the_least_squared_error(bits):
    """LSQ weights start at the step with the least rounding + clipping error (a brute-force search over 4000 clips
    is the reference), not at LSQ's from-scratch 2 mean|w| / sqrt(Qp), which is worse on heavy-tailed weights."""
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1) ** 3  # channels of very different scales
    w[0, 0, 0, 0] = 4.0  # an outlier
    q = LSQQuantizer(bits, signed=True)
    q(w)
    qn, qp = q.levels()
    ours = _grid_error(w.flatten(), float(q.step), qn, qp)
    assert ours <= _brute_min_error(w.flatten(), qn, qp) * 1.01
    assert ours < 0.9 * _grid_error(w.flatten(), float(2 * w.abs().mean() / math.sqrt(qp)), qn, qp)
    per_channel = LSQQuantizer(bits, signed=True, channels=16)
    per_channel(w)
    for row, step in zip(w.flatten(1), per_channel.step.detach().flatten()):
        assert _grid_error(row, float(step), qn, qp) <= _brute_min_error(row, qn, qp, 1000) * 1.01
