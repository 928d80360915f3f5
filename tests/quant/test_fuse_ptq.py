"""Fusion and post-training static quantization of mb2-ssd-lite."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from torch.ao.nn import quantized as nnq

from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.errors import QCompressError
from qcompress.models import build_detector
from qcompress.quant.fuse import ConvReLU6, QuantizedConvReLU6, find_fusion_groups, fuse
from qcompress.quant.pipeline import QuantizeOptions, quantize_detector
from qcompress.quant.ptq import is_int8
from qcompress.quant.sqnr import layer_sqnr, output_sqnr, sqnr_db

CLASSES = ["BACKGROUND", "a", "b", "c"]


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    det = build_detector("mb2-ssd-lite", CLASSES)
    randomize_bn(det.model)
    return det


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 300, 300, generator=g) * 1.98 - 0.99


def test_fusion_preserves_raw_outputs(detector, images):
    fused, record = fuse(detector.model)
    assert len(record.groups) == len(find_fusion_groups(detector.model)) > 60
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, ConvReLU6) for m in fused.modules())
    with torch.no_grad():
        for a, b in zip(detector.model(images), fused(images)):
            assert float((a - b).abs().max()) <= 1e-4


def test_fusion_does_not_touch_the_input_model(detector):
    before = {k: v.clone() for k, v in detector.model.state_dict().items()}
    fuse(detector.model)
    after = detector.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_relu6_is_exact_in_the_quantized_conv():
    """The saturation of the fused quantized conv is the clamp at 6 when the observed range is [0, 6]."""
    conv = nn.Conv2d(2, 2, 1, bias=False)
    conv.weight.data = torch.tensor([[[[4.0]], [[0.0]]], [[[-1.0]], [[0.0]]]])
    model = nn.Sequential(torch.ao.quantization.QuantStub(), nn.Sequential(conv, nn.ReLU6()), torch.ao.quantization.DeQuantStub())
    det_like = model.eval()
    from qcompress.quant.ptq import calibrate, convert_static, prepare_static
    from qcompress.quant.qconfig import QuantScheme

    scheme = QuantScheme(observer="minmax", per_channel=True)
    prepared, groups, _ = prepare_static(det_like, scheme)
    assert groups == [["1.0", "1.1"]]
    x = torch.linspace(-3, 3, 2 * 8 * 8).reshape(1, 2, 8, 8)
    calibrate(prepared, [x])
    quantized = convert_static(prepared, scheme)
    assert isinstance(quantized[1][0], QuantizedConvReLU6)
    with torch.no_grad():
        ref, out = det_like(x), quantized(x)
    assert float(out.max()) <= 6.0 + 1e-6
    assert float((ref - out).abs().max()) < 0.1  # one quantization step of a [0, 6] 7-bit range is 0.047


def test_int8_model_tracks_fp32_and_is_really_int8(detector, images):
    qdet, record = quantize_detector(detector, [images], QuantizeOptions(observer="minmax"))
    convs = [m for m in qdet.model.modules() if isinstance(m, nnq.Conv2d)]
    float_convs = [m for m in detector.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(float_convs) and all(is_int8(m) for m in convs)
    assert not any(isinstance(m, nn.Conv2d) for m in qdet.model.modules())
    with torch.no_grad():
        sqnr = output_sqnr(detector.model(images), qdet.model(images))
    assert min(sqnr) > 20.0
    assert record.recipe["relu6"] == "fused-clamp"


def test_skip_keeps_layers_float(detector, images):
    qdet, record = quantize_detector(detector, [images], QuantizeOptions(observer="minmax", skip=("regression_headers.5",)))
    assert record.recipe["kept_float"] == ["regression_headers.5"]
    island = qdet.model.get_submodule("regression_headers.5")
    original = detector.model.get_submodule("regression_headers.5")
    assert type(island.module) is nn.Conv2d
    assert torch.equal(island.module.weight, original.weight) and torch.equal(island.module.bias, original.bias)
    seen = {}
    hook = island.module.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        qdet.model(images[:1])
    hook.remove()
    # it runs in float on the dequantized int8 input, with the original float weights
    assert seen["x"].dtype == torch.float32 and not seen["x"].is_quantized
    assert torch.equal(seen["y"], nn.functional.conv2d(seen["x"], original.weight, original.bias, original.stride,
                                                       original.padding))


def test_save_load_gives_identical_outputs(detector, images, tmp_path):
    qdet, record = quantize_detector(detector, [images], QuantizeOptions(per_channel=False, skip=("classification_headers.0",)))
    path = tmp_path / "q.pth"
    save_detector(qdet, path, quantization=record.recipe)
    torch.save(detector.model.state_dict(), tmp_path / "f.pth")
    fp32_size = (tmp_path / "f.pth").stat().st_size
    assert path.stat().st_size <= 0.3 * fp32_size
    again = load_detector(path)
    with torch.no_grad():
        for a, b in zip(qdet.model(images), again.model(images)):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "options, message",
    [
        (QuantizeOptions(observer="kl"), "unknown observer"),
        (QuantizeOptions(backend="tpu"), "unknown backend"),
        (QuantizeOptions(skip=("no.such.layer*",)), "matches no layer"),
        (QuantizeOptions(bias_correction="magic"), "unknown bias correction"),
        (QuantizeOptions(data_free=True, bias_correction="empirical"), "cannot be empirical"),
    ],
)
def test_bad_options_fail_clearly(detector, images, options, message):
    with pytest.raises(QCompressError, match=message):
        quantize_detector(detector, [images[:1]], options)


def test_no_calibration_data_needs_data_free(detector):
    with pytest.raises(QCompressError, match="no calibration images"):
        quantize_detector(detector, [], QuantizeOptions())


def test_sqnr_formula():
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, ref + torch.tensor([0.3, 0.4])) == pytest.approx(20.0)


def test_layer_sqnr_is_measured_against_the_original_float_model(detector, images):
    """ReLU6 -> ReLU, absorption and bias correction change the float model: the per-layer SQNR must
    include what they cost, i.e. compare with the untransformed model (same module names)."""
    options = QuantizeOptions(observer="minmax", per_channel=False, equalize=True, absorb_bias=True,
                              bias_correction="analytic")
    qdet, record = quantize_detector(detector, [images], options)
    probe = images[:2]
    with torch.no_grad():
        original = detector.model(probe)
        reference = record.float_reference(probe)
        transformed = record.float_fused(probe)
    rel = [float((a - b).abs().max() / a.abs().max()) for a, b in zip(original, reference)]
    assert max(rel) <= 1e-4, rel  # BN folding only
    assert max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(original, transformed)) > 1e-2
    sqnr = layer_sqnr(record.float_reference, qdet.model, [probe], align=record.channel_maps)
    quantized = {n for n, m in qdet.model.named_modules() if hasattr(m, "scale") and not list(m.children())}
    assert set(sqnr) == quantized  # every quantized layer has its float twin
    # Equalized layers' channels are rescaled (and shifted by absorption): mapped back, they track the
    # original as closely as they track the transformed model; unmapped they would not (about 0 dB).
    assert "base_net.18.0" in record.channel_maps
    against_transformed = layer_sqnr(record.float_fused, qdet.model, [probe])
    assert sqnr["base_net.18.0"] > 30 and abs(sqnr["base_net.18.0"] - against_transformed["base_net.18.0"]) < 3
    assert layer_sqnr(record.float_reference, qdet.model, [probe])["base_net.18.0"] < 10
    # One head conv by hand, hooked on the ORIGINAL (unfused, untransformed) detector.
    name = "classification_headers.5"
    outputs: dict[str, torch.Tensor] = {}
    hooks = [detector.model.get_submodule(name).register_forward_hook(lambda m, i, o: outputs.update(f=o)),
             qdet.model.get_submodule(name).register_forward_hook(lambda m, i, o: outputs.update(q=o))]
    with torch.no_grad():
        detector.model(probe), qdet.model(probe)
    for h in hooks:
        h.remove()
    assert sqnr[name] == pytest.approx(sqnr_db(outputs["f"], outputs["q"].dequantize()), abs=1e-3)


def test_layer_sqnr_reference_survives_an_in_place_activation():
    """torchvision's Conv2dNormActivation runs Hardswish(inplace=True) on the conv output: the float
    reference of the conv must be the conv output, not what the activation later wrote over it."""
    from qcompress.quant.ptq import calibrate, convert_static, prepare_static
    from qcompress.quant.qconfig import QuantScheme

    torch.manual_seed(0)
    model = nn.Sequential(torch.ao.quantization.QuantStub(), nn.Conv2d(3, 8, 3, padding=1),
                          nn.Hardswish(inplace=True), torch.ao.quantization.DeQuantStub()).eval()
    scheme = QuantScheme(observer="minmax")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2
    prepared, _, _ = prepare_static(model, scheme)
    calibrate(prepared, [x])
    quantized = convert_static(prepared, scheme)
    outputs = {}
    hooks = [model[1].register_forward_hook(lambda m, i, o: outputs.update(f=o.clone())),
             quantized[1].register_forward_hook(lambda m, i, o: outputs.update(q=o.dequantize()))]
    with torch.no_grad():
        model(x), quantized(x)
    for h in hooks:
        h.remove()
    expected = sqnr_db(outputs["f"], outputs["q"])
    assert expected > 30  # the conv is quantized well; the overwritten reference gave about 0 dB
    assert layer_sqnr(model, quantized, [x])["1"] == pytest.approx(expected, abs=1e-3)
