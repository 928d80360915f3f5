"""int8 quantization-aware training: fusion preserves the float function, fake quantization is
quantize-dequantize, the converted int8 model tracks the fake-quant model, checkpoints reload, the
job trains, resumes and reports."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import randomize_bn
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

from qcompress.api import DataConfig, ModelConfig
from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.jobs.qat import QATJobConfig, qat
from qcompress.models import build_detector
from qcompress.quant.fuse import QuantizedConvReLU6
from qcompress.quant.qat import (
    FreezeSchedule,
    QATConvBnReLU6,
    convert_qat,
    observe,
    prepare_qat_model,
    qat_recipe,
    set_fake_quant,
)
from qcompress.quant.sqnr import output_sqnr

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["BACKGROUND", "a", "b", "c"]


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    det = build_detector("mb2-ssd-lite", CLASSES)
    randomize_bn(det.model)
    return det


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 300, 300, generator=torch.Generator().manual_seed(0)) * 1.98 - 0.99


@pytest.fixture(scope="module")
def trained(detector, images):
    """A QAT model with observed ranges and the freeze schedule applied (as after training)."""
    prepared, groups, _ = prepare_qat_model(detector.model)
    observe(prepared, [images])
    FreezeSchedule(0, 0).apply(prepared, 0)
    return prepared.eval(), groups


def test_fused_qat_model_with_fake_quant_off_matches_fp32(detector, images):
    prepared, groups, _ = prepare_qat_model(detector.model)
    assert len(groups) > 60 and sum(isinstance(m, QATConvBnReLU6) for m in prepared.modules()) > 30
    assert not any(type(m) is nn.BatchNorm2d for n, m in prepared.named_modules() if not n.endswith(".bn"))
    prepared.eval()
    set_fake_quant(prepared, False, observers=False)
    with torch.no_grad():
        for a, b in zip(detector.model(images), prepared(images)):
            assert float((a - b).abs().max()) < 1e-4  # measured 3.6e-7


def _layer_model():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    model = nn.Sequential(QuantStub(), nn.Sequential(conv, bn, nn.ReLU6()), DeQuantStub())
    randomize_bn(model)
    return model


def test_fake_quant_forward_is_a_reference_quantize_dequantize():
    model = _layer_model()
    prepared, _, _ = prepare_qat_model(model)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 2
    observe(prepared, [x])
    layer = prepared[1][0]
    assert isinstance(layer, QATConvBnReLU6)
    # weights: BN folded into them, per output channel symmetric int8
    running_std = torch.sqrt(layer.bn.running_var + layer.bn.eps)
    folded = layer.weight * (layer.bn.weight / running_std).reshape(-1, 1, 1, 1)
    fq = layer.weight_fake_quant
    scale, zero_point = fq.calculate_qparams()
    reference = torch.quantize_per_channel(folded.detach(), scale, zero_point, 0, torch.qint8).dequantize()
    set_fake_quant(prepared, True, observers=False)
    assert torch.allclose(fq(folded.detach()), reference, atol=1e-7)
    # activations: 7-bit unsigned (x86 reduce_range) affine, clamp(round(x / s) + z, 0, 127)
    act = layer.activation_post_process
    s, z = (float(v) for v in act.calculate_qparams())
    y = torch.linspace(-1, 8, 200)
    manual = (torch.clamp(torch.round(y / s) + z, 0, 127) - z) * s
    assert torch.allclose(act(y), manual, atol=1e-6)


def _converted_layer(scale: float):
    model = _layer_model()
    prepared, _, _ = prepare_qat_model(model)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * scale
    observe(prepared, [x])
    FreezeSchedule(0, 0).apply(prepared, 0)
    prepared.eval()
    return model, prepared, convert_qat(prepared), x


def test_converted_layer_matches_fake_quant_within_one_step():
    model, prepared, quantized, x = _converted_layer(0.5)
    assert isinstance(quantized[1][0], QuantizedConvReLU6)
    assert isinstance(quantized[1][1], nn.Identity) and isinstance(quantized[1][2], nn.Identity)
    with torch.no_grad():
        pre_activation = model[1][1](model[1][0](x))
        fake, real = prepared(x), quantized(x)
    assert float(pre_activation.max()) < 6  # the clamp is not exercised here; see the next test
    assert float((fake - real).abs().max()) <= quantized[1][0].scale + 1e-6


def test_converted_layer_keeps_the_relu6_clamp():
    _, prepared, quantized, x = _converted_layer(4.0)
    with torch.no_grad():
        assert float(prepared(x).max()) <= 6.0
        assert float(quantized(x).max()) <= 6.0 + 1e-6


def test_converted_model_tracks_the_fake_quant_model(trained, images):
    prepared, _ = trained
    quantized = convert_qat(prepared)
    with torch.no_grad():
        fake, real = prepared(images), quantized(images)
    # One rounding step per layer apart: 34-35 dB per output with QuantizedConvReLU6's clamp at 6
    # (22 dB before the clamp was explicit, when x86's saturated ReLU6 outputs could reach 12).
    assert min(output_sqnr(fake, real)) > 30


def test_freeze_schedule_stops_bn_statistics_and_ranges(detector, images):
    prepared, _, _ = prepare_qat_model(detector.model)
    observe(prepared, [images])
    schedule = FreezeSchedule(bn_epoch=1, observer_epoch=2)
    assert schedule.apply(prepared, 0) == []
    assert len(schedule.apply(prepared, 1)) == 1
    prepared.train()  # the training loop calls train() every epoch: frozen BN must stay frozen
    bn = prepared.base_net[1].conv[0].bn
    act = prepared.base_net[1].conv[0].activation_post_process
    assert not bn.training
    before = bn.running_mean.clone(), act.scale.clone()
    prepared(images * 0.5)
    assert torch.equal(bn.running_mean, before[0]) and not torch.equal(act.scale, before[1])
    schedule.apply(prepared, 2)
    frozen_scale = act.scale.clone()
    prepared(images * 0.25)
    assert torch.equal(act.scale, frozen_scale) and int(act.fake_quant_enabled) == 1


def test_qat_int8_checkpoint_reloads_through_the_ptq_rebuild(detector, trained, images, tmp_path):
    prepared, groups = trained
    qdet = detector.with_model(convert_qat(prepared))
    save_detector(qdet, tmp_path / "qat.pth", quantization=qat_recipe("x86", len(groups), FreezeSchedule()), command=["test"])
    reloaded = load_detector(tmp_path / "qat.pth")
    with torch.no_grad():
        for a, b in zip(qdet.model(images), reloaded.model(images)):
            assert torch.equal(a, b)


class _Interrupt(Exception):
    pass


def _voc07_first_image(path, year) -> float:
    from qcompress.core.inference import predict_dataset
    from qcompress.data.voc import VOCDataset
    from qcompress.metrics.voc_ap import evaluate_voc_detections

    detector = load_detector(path)
    dataset = VOCDataset(year, "test", detector.class_names)
    detections = predict_dataset(detector, dataset, [0], num_workers=0)
    return evaluate_voc_detections([dataset.annotation(0)], detections, detector.class_names).mAP


def test_qat_job_trains_resumes_and_reports(small_checkpoint, tiny_voc, tmp_path):
    config = QATJobConfig(
        model=ModelConfig(small_checkpoint), data=DataConfig(data=tiny_voc, limit=1), train_limit=4, epochs=2,
        batch_size=2, calib_images=2, workers=0, out=tmp_path / "m-qat.pth", out_dir=tmp_path / "reports",
        report_name="qat", latency_runs=2,
    )

    def stop_after_first_epoch(epoch, record):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        qat(config, on_epoch=stop_after_first_epoch)
    assert (tmp_path / "m-qat-run" / "last.pth").is_file() and not (tmp_path / "m-qat.pth").exists()
    seen = []
    result, _ = qat(QATJobConfig(**{**config.__dict__, "resume": True}), on_epoch=lambda e, r: seen.append(e))
    assert seen == [1]  # only the second epoch ran
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert [s["step"] for s in result.steps] == ["fp32", "ptq-int8", "qat-int8"]
    # fp32 and the saved QAT model: the VOC07 mAP of the first test image, computed here directly
    assert result.steps[0]["mAP"] == pytest.approx(_voc07_first_image(small_checkpoint, tiny_voc), nan_ok=True)
    assert result.steps[-1]["mAP"] == pytest.approx(_voc07_first_image(tmp_path / "m-qat.pth", tiny_voc), nan_ok=True)
    assert result.steps[-1]["bops_speedup"] == pytest.approx(16.0)
    assert any("frozen" in e["event"] for e in result.events)
    sidecar = json.loads((tmp_path / "m-qat.json").read_text())
    assert sidecar["quantization"]["qat"] is True and sidecar["quantization"]["epochs"] == 2
    assert load_detector(tmp_path / "m-qat.pth").source["sidecar"]["quantization"]["scheme"] == "int8-eager-qat"
    data = json.loads((tmp_path / "reports" / "qat.json").read_text())
    assert [s["step"] for s in data["steps"]] == ["fp32", "ptq-int8", "qat-int8"]
    assert "## Steps" in (tmp_path / "reports" / "qat.md").read_text()


def test_qat_cli_low_bit_method(small_checkpoint, tiny_voc, tmp_path):
    from typer.testing import CliRunner

    from qcompress.cli import app

    out = tmp_path / "low.pth"
    result = CliRunner().invoke(app, [
        "qat", "-m", str(small_checkpoint), "--data", str(tiny_voc), "--method", "lsq", "--bits-w", "4",
        "--bits-a", "4", "--scope", "backbone", "--epochs", "1", "--batch-size", "2", "--train-limit", "2",
        "--limit", "1", "--calib-images", "2", "--no-ptq", "--workers", "0", "--out", str(out),
        "--out-dir", str(tmp_path / "reports"), "--report-name", "low", "--freeze-bn-epoch", "0", "--runs", "2",
    ])
    assert result.exit_code == 0, result.output
    # BN frozen from the start: every running statistic is still the parent's (training in train mode moves them)
    parent, trained = load_detector(small_checkpoint).model.state_dict(), torch.load(out, weights_only=True)
    trained = trained.get("model", trained)
    stats = [k for k in parent if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 40 and all(torch.equal(parent[k], trained[k]) for k in stats)
    data = json.loads((tmp_path / "reports" / "low.json").read_text())
    assert data["latency"]["fp32"]["runs"] == data["latency"]["output"]["runs"] == 2
    assert [s["step"] for s in data["steps"]] == ["fp32", "qat-lsq-w4a4-backbone"]
    assert data["steps"][1]["quantized_layers"] == data["recipe"]["layers"].__len__() > 40
    assert data["steps"][1]["bops_speedup"] > 1
    assert load_detector(out).source["sidecar"]["quantization"]["research"] is True
    bad = CliRunner().invoke(app, ["qat", "-m", str(small_checkpoint), "--method", "lsq", "--bits-w", "1"])
    assert bad.exit_code == 2 and "bits" in bad.output


def test_qat_with_the_parent_as_teacher_records_imitation_and_bn_reestimation(small_checkpoint, tiny_voc, tmp_path):
    """int8 QAT with --teacher parent: the imitation term is trained (history), the recipe names the teacher, and
    with --bn-reestimate BN (not frozen before the last epoch) is re-estimated."""
    config = QATJobConfig(
        model=ModelConfig(small_checkpoint), data=DataConfig(data=tiny_voc, limit=1), train_limit=4, epochs=1,
        batch_size=2, calib_images=2, workers=0, out=tmp_path / "kd.pth", out_dir=tmp_path / "reports",
        report_name="kd", teacher="parent", ptq_baseline=False, bn_reestimate=True, latency_runs=2,
    )
    result, _ = qat(config)
    assert result.history[0]["imitation_loss"] > 0
    assert result.recipe["teacher"]["psi"] == 0.5 and result.recipe["teacher"]["teacher"] == str(small_checkpoint)
    assert result.bn_reestimation["layers"] > 0 and result.bn_reestimation["images"] == 2
    md = (tmp_path / "reports" / "kd.md").read_text()
    assert "## Teacher" in md and "imitation loss" in md and "## BN re-estimation" in md


def test_lowbit_qat_of_a_natively_trained_detector_learns_from_the_parent(tiny_voc, tmp_path):
    """FCOS computes its own losses: `--teacher parent` imitates its FPN levels near the objects (its own anchors
    and the transformed targets); the history records the imitation term, the report says where it imitated."""
    from qcompress.core.checkpoints import save_detector
    from qcompress.data.synthetic import SYNTH_CLASSES
    from qcompress.models import build_detector

    torch.manual_seed(0)
    parent = tmp_path / "fcos.pth"
    save_detector(build_detector("fcos_resnet18_fpn", SYNTH_CLASSES, input_size=64, width=64), parent, command=["t"])
    config = QATJobConfig(
        model=ModelConfig(parent), data=DataConfig(data=tiny_voc, limit=1), train_limit=4, epochs=1, method="dorefa",
        bits_w=2, bits_a=2, scope="backbone", batch_size=2, calib_images=2, workers=0, out=tmp_path / "kd.pth",
        out_dir=tmp_path / "reports", report_name="kd", teacher="parent", ptq_baseline=False, latency_runs=2,
    )
    result, _ = qat(config)
    assert result.history[0]["imitation_loss"] > 0
    assert result.recipe["teacher"]["feature_taps"] == ["transform", "backbone", "anchor_generator"]
    md = (tmp_path / "reports" / "kd.md").read_text()
    assert "feature levels of backbone" in md and "imitation loss" in md


def test_bn_is_reestimated_only_where_it_trained_on_batch_statistics():
    int8 = QATJobConfig(epochs=2)  # BN frozen after epoch 1 by default: the network trained against the running stats
    assert int8.bn_frozen_at_end and not QATJobConfig(epochs=1).bn_frozen_at_end
    assert not QATJobConfig(epochs=2, freeze_bn_epoch=-1).bn_frozen_at_end
    assert not QATJobConfig(method="lsq", epochs=2).bn_frozen_at_end  # low-bit trains BN throughout
    assert QATJobConfig(method="lsq", epochs=2, freeze_bn_epoch=1).bn_frozen_at_end  # ... unless asked
    assert QATJobConfig(method="lsq", scope="all", heads=True, epochs=2).bn_frozen_at_end  # fully quantized: frozen


def _frcnn_steps_config(tiny_voc, tmp_path, steps: str, **options) -> QATJobConfig:
    """A tiny random Faster R-CNN VGG16 parent and a 1-epoch DoReFa 2/2 steps run of it on 2 images."""
    from qcompress.data.synthetic import SYNTH_CLASSES
    from qcompress.models import build_detector

    torch.manual_seed(0)
    parent = tmp_path / "frcnn.pth"
    save_detector(build_detector("fasterrcnn_vgg16", SYNTH_CLASSES, input_size=96, width=0.125, fc=32,
                                 anchor_scales=[2, 4, 8]), parent, command=["t"])
    return QATJobConfig(
        model=ModelConfig(parent), data=DataConfig(data=tiny_voc, limit=1), train_limit=2, epochs=1, method="dorefa",
        bits_w=2, bits_a=2, steps=steps, batch_size=2, calib_images=2, workers=0, out=tmp_path / "s.pth",
        out_dir=tmp_path / "reports", report_name="s", ptq_baseline=False, threads=1, **options,
    )


def test_steps_with_the_parent_as_teacher_imitate_at_every_step(tiny_voc, tmp_path):
    """`qat --steps ... --teacher parent` on Faster R-CNN VGG16: every step fine-tunes with the imitation term
    (conv5_3 near objects, over the RPN anchors), saves a checkpoint holding that step's layers and the earlier
    ones, and the report names the teacher."""
    from qcompress.quant.lowbit import LowBitConv2d

    rows, _ = qat(_frcnn_steps_config(tiny_voc, tmp_path, "extractor.2;extractor.5,extractor.7", teacher="parent"))
    assert [r["layers"] for r in rows] == [0, 1, 3]
    history = json.loads((tmp_path / "reports" / "s.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2] and all(h["imitation_loss"] > 0 for h in history)
    step2 = load_detector(tmp_path / "s-step2.pth").model
    assert {n for n, m in step2.named_modules() if isinstance(m, LowBitConv2d)} == {
        "extractor.2", "extractor.5", "extractor.7"}
    md = (tmp_path / "reports" / "s.md").read_text()
    assert "## Teacher" in md and "imitation loss" in md and "extractor" in md


def test_an_interrupted_steps_run_resumes_at_the_first_unfinished_step(tiny_voc, tmp_path):
    """`qat --steps ... --resume`: finished steps (same settings, recorded in their sidecars) load instead of
    training again; the run continues at the first step without a checkpoint and ends where an uninterrupted
    run ends. Other settings or nothing saved: a one-line error."""
    from dataclasses import replace

    from qcompress.core.checkpoints import read_state_dict
    from qcompress.errors import QCompressError

    config = _frcnn_steps_config(tiny_voc, tmp_path, "extractor.2;extractor.5")
    with pytest.raises(QCompressError, match="nothing to resume"):
        qat(replace(config, resume=True))
    full, _ = qat(config)
    step1, step2 = tmp_path / "s-step1.pth", tmp_path / "s-step2.pth"
    first, last = read_state_dict(step1), read_state_dict(step2)
    step1_mtime = step1.stat().st_mtime_ns
    step2.unlink()  # interrupted during step 2

    resumed, _ = qat(replace(config, resume=True))
    assert step1.stat().st_mtime_ns == step1_mtime  # loaded, not trained and saved again
    assert all(torch.equal(first[k], v) for k, v in read_state_dict(step1).items())
    again = read_state_dict(step2)
    assert all(torch.allclose(last[k], v, atol=1e-5) for k, v in again.items())  # as the uninterrupted run
    assert [r["mAP"] for r in resumed] == pytest.approx([r["mAP"] for r in full], abs=1e-6)
    history = json.loads((tmp_path / "reports" / "s.json").read_text())["history"]
    assert [h.get("resumed", False) for h in history] == [True, False]

    with pytest.raises(QCompressError, match="nothing to resume"):  # other settings: not this run's checkpoints
        qat(replace(config, resume=True, lr=1e-2))


def test_a_steps_run_interrupted_inside_a_step_resumes_at_its_last_epoch(tiny_voc, tmp_path):
    """`--step-epochs "2,1"`: step 1 trains 2 epochs, step 2 one (rows, history and report say so). Stopped after
    epoch 1 of step 1: `--resume` loads the epoch saved in s-step1-run/ (weights, optimizer, history) and trains
    epoch 2 only, ending where the uninterrupted run ends; with other settings (other epochs per step
    included) that epoch is not this run's and there is nothing to resume."""
    from dataclasses import replace

    from conftest import stop_after_first_epoch

    from qcompress.core.checkpoints import read_state_dict
    from qcompress.errors import QCompressError

    config = _frcnn_steps_config(tiny_voc, tmp_path, "extractor.2;extractor.5", step_epochs="2,1")
    full, _ = qat(config)
    assert [r.get("epochs") for r in full] == [None, 2, 1]
    assert "| epochs |" in (tmp_path / "reports" / "s.md").read_text()
    expected = read_state_dict(tmp_path / "s-step2.pth")
    for k in (1, 2):  # a saved step stands for its epochs: its epoch folder is gone; a fresh start
        assert not (tmp_path / f"s-step{k}-run").exists()
        (tmp_path / f"s-step{k}.pth").unlink()

    stop_after_first_epoch(qat, config)
    assert (tmp_path / "s-step1-run" / "last.pth").is_file() and not (tmp_path / "s-step1.pth").exists()
    with pytest.raises(QCompressError, match="nothing to resume"):
        qat(replace(config, resume=True, lr=1e-2))
    with pytest.raises(QCompressError, match="nothing to resume"):
        qat(replace(config, resume=True, step_epochs="2,2"))

    epochs_run = []
    resumed, _ = qat(replace(config, resume=True), on_epoch=lambda e, r: epochs_run.append((r["step"], r["epoch"])))
    assert epochs_run == [(1, 2), (2, 1)]  # step 1's first epoch was not trained again
    history = json.loads((tmp_path / "reports" / "s.json").read_text())["history"]
    assert [(h["step"], h["epoch"]) for h in history] == [(1, 1), (1, 2), (2, 1)]
    again = read_state_dict(tmp_path / "s-step2.pth")
    assert all(torch.allclose(expected[k], v, atol=1e-5) for k, v in again.items())
    assert [r["mAP"] for r in resumed] == pytest.approx([r["mAP"] for r in full], abs=1e-6)


def test_a_steps_run_continues_from_a_checkpoint_that_holds_its_first_step(tiny_voc, tmp_path):
    """`--steps-from CKPT`: CKPT quantizes exactly step 1's layers (here step 1 of a full run), so step 1's row is
    CKPT evaluated and training starts at step 2 from it — ending where the full run ends. A checkpoint of
    another parent, method, or layer set is a one-line error before any training."""
    from dataclasses import replace

    from qcompress.core.checkpoints import read_state_dict
    from qcompress.errors import QCompressError

    config = _frcnn_steps_config(tiny_voc, tmp_path, "extractor.2;extractor.5")
    full, _ = qat(config)
    step1 = tmp_path / "s-step1.pth"
    epochs_run = []
    cont = replace(config, steps_from=step1, out=tmp_path / "c.pth", report_name="c")
    rows, _ = qat(cont, on_epoch=lambda e, r: epochs_run.append((r["step"], r["epoch"])))
    assert epochs_run == [(2, 1)] and not (tmp_path / "c-step1.pth").exists()
    assert rows[1]["checkpoint"] == str(step1) and rows[1]["layers"] == 1
    assert [r["mAP"] for r in rows] == pytest.approx([r["mAP"] for r in full], abs=1e-6)
    expected, got = read_state_dict(tmp_path / "s-step2.pth"), read_state_dict(tmp_path / "c-step2.pth")
    assert all(torch.allclose(expected[k], v, atol=1e-5) for k, v in got.items())
    history = json.loads((tmp_path / "reports" / "c.json").read_text())["history"]
    assert [(h["step"], "from" in h) for h in history] == [(1, True), (2, False)]
    assert "--steps-from s-step1.pth" in (tmp_path / "reports" / "c.md").read_text()

    other = tmp_path / "other.pth"  # another float parent of the same structure
    parent = load_detector(config.model.model_path)
    save_detector(parent.with_model(parent.model.half().float()), other, command=["t"])
    fq = tmp_path / "fq.pth"  # step 1 as if trained fully quantized (--heads): other layer types
    shutil.copy(step1, fq)
    side = json.loads(step1.with_suffix(".json").read_text())
    side["quantization"]["fully_quantized"] = True
    fq.with_suffix(".json").write_text(json.dumps(side))
    for bad, match in ((replace(cont, steps="extractor.5;extractor.2"), "not exactly those of the first"),
                       (replace(cont, steps_from=fq), "fully quantized"),
                       (replace(cont, steps_from=tmp_path / "s-step2.pth"), "already quantizes every step"),
                       (replace(cont, method="lsq"), "this run is lsq"),
                       (replace(cont, model=ModelConfig(other)), "was not fine-tuned from")):
        with pytest.raises(QCompressError, match=match):
            qat(bad, on_epoch=lambda e, r: pytest.fail("trained before refusing"))
