"""CenterNet ResNet-18: the reference state_dict layout loads strictly, focal loss and decoding by hand,
training lowers the loss, and eager int8 stays close to float (and reloads, and has a QDQ twin)."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from qcompress.cli.app import app
from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.errors import QCompressError
from qcompress.models import build_detector
from qcompress.models.centernet import encode_targets, focal_loss, gaussian_radius
from qcompress.models.registry import compression_spec
from qcompress.quant.lowbit import select_convs

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "centernet_resnet18"
CLASSES = ("BACKGROUND", "a", "b", "c")


def reference_layout(num_classes: int, head_conv: int = 64, deconv: int = 256) -> dict[str, tuple[int, ...]]:
    """msra_resnet.py's ``get_pose_net(18, {"hm": C, "wh": 2, "reg": 2}, head_conv=64)`` state_dict keys and
    shapes, written out from its structure (ResNet-18 basic blocks, 3 x ConvTranspose 4x4 + BN + ReLU,
    a 3x3 conv + ReLU + 1x1 per head)."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(name: str, channels: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{suffix}"] = (channels,)
        keys[f"{name}.num_batches_tracked"] = ()

    keys["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for layer, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for block in range(2):  # resnet_spec[18] = [2, 2, 2, 2]
            prefix = f"layer{layer}.{block}"
            keys[f"{prefix}.conv1.weight"] = (planes, inplanes, 3, 3)
            bn(f"{prefix}.bn1", planes)
            keys[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{prefix}.bn2", planes)
            if block == 0 and (stride != 1 or inplanes != planes):
                keys[f"{prefix}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{prefix}.downsample.1", planes)
            inplanes = planes
    for stage in range(3):  # deconv_with_bias = False; Sequential indices 0, 3, 6 (BN at 1, 4, 7)
        keys[f"deconv_layers.{3 * stage}.weight"] = (inplanes, deconv, 4, 4)  # ConvTranspose: (in, out, k, k)
        bn(f"deconv_layers.{3 * stage + 1}", deconv)
        inplanes = deconv
    for head, outputs in (("hm", num_classes), ("wh", 2), ("reg", 2)):
        keys[f"{head}.0.weight"] = (head_conv, deconv, 3, 3)
        keys[f"{head}.0.bias"] = (head_conv,)
        keys[f"{head}.2.weight"] = (outputs, head_conv, 1, 1)
        keys[f"{head}.2.bias"] = (outputs,)
    return keys


def test_reference_state_dict_loads_strictly(tmp_path):
    layout = reference_layout(num_classes=20)
    assert len(layout) == 150  # 120 ResNet-18 entries (no fc), 18 decoder, 12 heads
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.tensor(0) if not shape else torch.rand(shape, generator=generator) + 0.1
             for k, shape in layout.items()}
    path = tmp_path / "ctdet_res18.pth"
    torch.save(state, path)  # a plain state_dict, no sidecar: the class count comes from hm.2.weight
    detector = load_detector(path, arch=ARCH)
    assert len(detector.class_names) == 21 and detector.spec.input_size == (320, 320)
    loaded = detector.model.state_dict()
    assert {k: tuple(v.shape) for k, v in loaded.items()} == layout
    assert all(torch.equal(loaded[k], state[k]) for k in layout)


def test_models_command_lists_centernet():
    result = CliRunner().invoke(app, ["models"], catch_exceptions=False)
    assert result.exit_code == 0 and ARCH in result.output


def test_focal_loss_by_hand():
    probs = torch.tensor([0.8, 0.3, 0.1, 0.6])
    target = torch.tensor([1.0, 0.5, 0.0, 1.0])
    logits = torch.log(probs / (1 - probs)).reshape(1, 1, 2, 2)
    # positives: -log(p) (1-p)^2; negatives: -log(1-p) p^2 (1-y)^4; divided by the 2 centres
    expected = (-math.log(0.8) * 0.2**2 - math.log(0.6) * 0.4**2
                - math.log(0.7) * 0.3**2 * 0.5**4 - math.log(0.9) * 0.1**2) / 2
    assert focal_loss(logits, target.reshape(1, 1, 2, 2)).item() == pytest.approx(expected, rel=1e-5)
    # no centre at all: the negatives' sum, undivided
    none = focal_loss(logits[..., 1:, :], torch.tensor([[[[0.0, 0.0]]]]))
    assert none.item() == pytest.approx(-math.log(0.9) * 0.1**2 - math.log(0.4) * 0.6**2, rel=1e-5)


def test_targets_peak_at_centre_with_centernet_radius():
    # box 8x4 cells at stride 4 (32x16 input pixels), centre (10.5, 6.25) cells
    heat, cells, sizes, offsets = encode_targets(torch.tensor([[26.0, 17.0, 58.0, 33.0]]), torch.tensor([2]), 3, (16, 20))
    assert heat[1].max() == 1 and heat[0].sum() == 0 and heat[2].sum() == 0
    assert heat[1, 6, 10] == 1 and cells.tolist() == [6 * 20 + 10]
    assert sizes.tolist() == [[8.0, 4.0]] and offsets[0].tolist() == pytest.approx([0.5, 0.25])
    radius = int(gaussian_radius(4, 8))
    assert radius == 1  # min(r1, r2, r3) = 1.07 for 4x8 at overlap 0.7
    assert heat[1, 6, 10 + radius] > 0 and heat[1, 6, 10 + radius + 1] == 0


def test_decoding_a_hand_made_heatmap():
    detector = build_detector(ARCH, CLASSES, input_size=64, width=16)
    hm = torch.full((1, 3, 16, 16), -12.0)
    wh, reg = torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16)
    hm[0, 0, 4, 5] = 3.0  # class "a", score sigmoid(3)
    wh[0, :, 4, 5] = torch.tensor([4.0, 2.0])
    reg[0, :, 4, 5] = torch.tensor([0.5, 0.25])
    hm[0, 2, 10, 10] = 1.0  # class "c"; its weaker neighbour is no 3x3 peak
    hm[0, 2, 10, 11] = 0.5
    wh[0, :, 10, 10] = torch.tensor([2.0, 2.0])
    (dets,) = detector.postprocess((hm, wh, reg), [(128, 64)])  # image twice as high as the input
    assert dets.labels.tolist() == [1, 3]
    assert dets.scores.tolist() == pytest.approx([1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-1))])
    # centre (5.5, 4.25) cells -> (22, 17) px, size 16x8 px; y scaled by 128/64
    assert dets.boxes[0].tolist() == pytest.approx([14.0, 26.0, 30.0, 42.0])
    assert dets.boxes[1].tolist() == pytest.approx([36.0, 72.0, 44.0, 88.0])


def test_one_train_step_lowers_the_loss():
    torch.manual_seed(0)
    model = build_detector(ARCH, CLASSES, input_size=64, width=16).model.train()
    images = [torch.randn(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 60.0], [0.0, 0.0, 12.0, 12.0]]), "labels": torch.tensor([3, 2])}]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        losses = model(images, targets)
        assert set(losses) == {"heatmap", "size_reg", "offset_reg"}
        return sum(losses.values())

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert torch.isfinite(before) and after < before


def test_declared_scopes():
    detector = build_detector(ARCH, CLASSES, input_size=64, width=16)
    spec = compression_spec(ARCH)
    encoder, kept = select_convs(detector.model, "encoder", spec=spec)
    assert len(encoder) == 16 and all(n.startswith("layer") and "downsample" not in n for n in encoder)
    assert kept == ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    heads, kept = select_convs(detector.model, "heads", spec=spec)
    assert heads == ["hm.0", "wh.0", "reg.0"] and kept == ["hm.2", "wh.2", "reg.2"]
    assert select_convs(detector.model, "stem", spec=spec) == ([], ["conv1"])
    decoder, _ = select_convs(detector.model, "decoder", spec=spec)
    both, _ = select_convs(detector.model, "encoder,decoder", spec=spec)  # declared scopes combine
    assert decoder == ["deconv_layers.0", "deconv_layers.3", "deconv_layers.6"] and both == encoder + decoder
    for bad in ("encoder,neck", "encoder,"):
        with pytest.raises(QCompressError, match="unknown scope"):
            select_convs(detector.model, bad, spec=spec)
    assert select_convs(detector.model, "stem", False, spec=spec) == (["conv1"], [])
    everything, kept = select_convs(detector.model, "all", spec=spec, heads=True)  # fully quantized: heads too
    assert kept == ["conv1", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    assert {"hm.2", "wh.2", "reg.2"} < set(everything)


def _sqnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - other).pow(2).sum()))


def test_int8_close_to_float_reloads_and_has_a_qdq_twin(tmp_path):
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector
    from qcompress.runtime.qdq import qdq_twin

    torch.manual_seed(0)
    detector = build_detector(ARCH, CLASSES, input_size=64, width=16)
    with torch.no_grad():  # a trained-looking head: outputs of order 1, not the init's 0.001 weights
        for head in (detector.model.wh[2], detector.model.reg[2]):
            head.weight.normal_(0, 0.05)
    batches = [torch.randn(4, 3, 64, 64)]
    qdet, record = quantize_detector(detector, batches, QuantizeOptions(observer="minmax"))  # per-channel
    sample = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fp32, int8 = detector.model(sample), qdet.model(sample)
    for name, a, b in zip(("hm", "wh", "reg"), fp32, int8):
        assert _sqnr(a, b) > 20, name
    path = save_detector(qdet, tmp_path / "int8.pth", quantization=record.recipe)
    again = load_detector(path)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(int8, again.model(sample)))
        twin, info = qdq_twin(qdet.model, sample)
        assert info.int8_convs == 26 + 3  # 20 encoder + 6 head convs + 3 transposed convs
        # each transposed conv (+ its unfused BN) of the twin computes what the int8 kernels compute
        inputs = {}
        for name in ("deconv_layers.0", "deconv_layers.3"):
            qdet.model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: inputs.setdefault(n, a[0]))
        qdet.model(sample)
        for name, x in inputs.items():
            index = int(name[-1])
            conv, norm = (qdet.model.deconv_layers[index + i] for i in range(2))
            twin_conv, twin_norm = (twin.deconv_layers[index + i] for i in range(2))
            assert _sqnr(norm(conv(x)).dequantize(), twin_norm(twin_conv(x.dequantize()))) > 40, name


def test_bireal_block_is_a_shortcut_around_each_conv_on_the_same_tensors():
    """Bi-Real wiring: same state_dict as the basic block, y1 = relu(bn1(conv1 x) + sc(x)), y2 = relu(bn2(conv2 y1) + y1),
    checked against the formula written out here; the basic block computes relu(bn2(conv2 relu(bn1 conv1 x)) + sc(x))."""
    torch.manual_seed(0)
    basic = build_detector(ARCH, CLASSES, input_size=64, width=16, head_conv=8).model
    bireal = build_detector(ARCH, CLASSES, input_size=64, width=16, head_conv=8, block="bireal").model
    assert bireal.state_dict().keys() == basic.state_dict().keys()
    bireal.load_state_dict(basic.state_dict())
    block = bireal.layer2[0]
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        shortcut = block.downsample(x)
        y1 = torch.relu(block.bn1(block.conv1(x)) + shortcut)
        expected = torch.relu(block.bn2(block.conv2(y1)) + y1)
        assert torch.allclose(block(x), expected, atol=1e-6)
        plain = basic.layer2[0]
        assert not torch.allclose(plain(x), expected, atol=1e-3)
        assert torch.allclose(plain(x), torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
                                                   + shortcut), atol=1e-6)
    assert bireal.hm[0].out_channels == 8 and bireal.hm[2].in_channels == 8


@pytest.mark.parametrize("options, words", [({"block": "dense"}, "block"), ({"head_conv": 2}, "head_conv")])
def test_bad_options_name_the_option(options, words):
    with pytest.raises(QCompressError, match=words):
        build_detector(ARCH, CLASSES, input_size=64, **options)


def _randomize_batchnorms(model: torch.nn.Module) -> None:
    """Trained-looking BNs (the init's are identities), so a BN applied in the wrong place shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)


def test_skips_add_layer3_2_1_into_the_upsampling_stages_as_written_out():
    """``skips``: the msra_resnet keys plus skip_layers.0/1/2 (1x1 conv + BN of layer3, layer2, layer1); each
    upsampling stage is relu(bn(deconv(x)) + bn(conv1x1(lateral))), computed here from the modules one by one."""
    torch.manual_seed(0)
    plain = build_detector(ARCH, CLASSES, input_size=64, width=16, head_conv=8)
    detector = build_detector(ARCH, CLASSES, input_size=64, width=16, head_conv=8, skips=True)
    net = detector.model
    extra = set(net.state_dict()) - set(plain.model.state_dict())
    assert set(plain.model.state_dict()) < set(net.state_dict())
    assert {k.rsplit(".", 1)[0] for k in extra} == {f"skip_layers.{i}.{j}" for i in range(3) for j in (0, 1)}
    assert [net.skip_layers[i][0].in_channels for i in range(3)] == [256, 128, 64]
    assert detector.spec.options["skips"] is True and "skips" not in plain.spec.options
    _randomize_batchnorms(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        c1 = net.layer1(net.maxpool(torch.relu(net.bn1(net.conv1(x)))))
        c2 = net.layer2(c1)
        c3 = net.layer3(c2)
        y = net.layer4(c3)
        for stage, lateral in enumerate((c3, c2, c1)):
            deconv, norm = net.deconv_layers[3 * stage], net.deconv_layers[3 * stage + 1]
            conv, skip_norm = net.skip_layers[stage]
            y = torch.relu(norm(deconv(y)) + skip_norm(conv(lateral)))
        assert y.shape[-1] == 16  # stride 4
        expected = (net.hm(y), net.wh(y), net.reg(y))
        for a, b in zip(net(x), expected):
            assert torch.allclose(a, b, atol=1e-5)
        plain.model.load_state_dict({k: v for k, v in net.state_dict().items() if k not in extra})
        assert not torch.allclose(plain.model(x)[0], expected[0], atol=1e-3)  # the skips change the function


def test_skips_quantize_int8_and_binarize_with_the_decoder():
    """The skip convs fuse with their BNs and run int8 close to float; the ``decoder`` scope holds them but keeps
    their 1x1s float (as the encoder's downsampling shortcuts), and the XNOR engine computes the binary decoder's
    function with the laterals' BNs folded."""
    from qcompress.quant.lowbit import apply_lowbit, initialize_lowbit
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector
    from qcompress.runtime.binary import convert_binary

    torch.manual_seed(0)
    detector = build_detector(ARCH, CLASSES, input_size=64, width=16, head_conv=8, skips=True)
    _randomize_batchnorms(detector.model)
    with torch.no_grad():
        for head in (detector.model.wh[2], detector.model.reg[2]):
            head.weight.normal_(0, 0.05)
    sample = torch.randn(2, 3, 64, 64)
    qdet, _ = quantize_detector(detector, [torch.randn(4, 3, 64, 64)], QuantizeOptions(observer="minmax"))
    assert type(qdet.model.skip_layers[0][0]).__name__ == "Conv2d" and "quantized" in type(
        qdet.model.skip_layers[0][0]).__module__  # conv + BN fused into one int8 conv
    with torch.no_grad():
        for name, a, b in zip(("hm", "wh", "reg"), detector.model(sample), qdet.model(sample)):
            assert _sqnr(a, b) > 20, name

    spec = compression_spec(ARCH)
    decoder, kept = select_convs(detector.model, "decoder", spec=spec)
    assert decoder == ["deconv_layers.0", "deconv_layers.3", "deconv_layers.6"]
    assert kept == ["skip_layers.0.0", "skip_layers.1.0", "skip_layers.2.0"]
    model = detector.model
    apply_lowbit(model, "binary", scope="decoder", spec=spec)
    initialize_lowbit(model, [sample])
    model.eval()
    engine, conversion = convert_binary(model, fold_bn=True)
    assert conversion.converted == decoder
    assert {"skip_layers.0.1", "skip_layers.2.1"} <= set(conversion.folded)
    with torch.no_grad():
        for a, b in zip(model(sample), engine(sample)):
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-4
