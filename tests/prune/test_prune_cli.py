"""`qcompress prune` end to end on a tiny generated VOC dataset: report, checkpoint, reload, errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from qcompress.api import DataConfig, ModelConfig
from qcompress.cli.app import app
from qcompress.core.checkpoints import load_detector, save_detector
from qcompress.jobs.prune import PruneJobConfig, prune

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    from qcompress.data.synthetic import generate_voc_dataset

    return generate_voc_dataset(tmp_path_factory.mktemp("voc"), num_images=12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from qcompress.data.synthetic import SYNTH_CLASSES
    from qcompress.models import build_detector

    torch.manual_seed(0)
    detector = build_detector("mb2-ssd-lite", SYNTH_CLASSES)
    g = torch.Generator().manual_seed(0)
    for m in detector.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "parent.pth"
    save_detector(detector, path, command=["test"])
    return path


def test_channels_prune_cli_end_to_end_and_reload(checkpoint, voc, tmp_path):
    out = tmp_path / "pruned.pth"
    result = run("prune", "-m", checkpoint, "--method", "channels", "--amount", 0.2, "--data", voc, "--split", "trainval",
                 "--limit", 4, "--finetune-epochs", 0, "--runs", 2, "--threads", 1, "--out", out,
                 "--out-dir", tmp_path, "--report-name", "r")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    before, after = report["before"], report["pruned"]
    assert before["eval"]["num_images"] == after["eval"]["num_images"] == 4
    assert after["params"] < 0.85 * before["params"] and after["macs"] < 0.85 * before["macs"]
    assert after["bytes"] == out.stat().st_size < before["bytes"]
    assert before["latency"]["runs"] == after["latency"]["runs"] == 2 and report["latency_ratio"] > 0
    assert report["skipped"] and all("residual" in why for why in report["skipped"].values())
    assert (tmp_path / "r.md").is_file() and "Channel groups" in (tmp_path / "r.md").read_text()
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["pruned"] is True and sidecar["compression"][-1]["widths"]["base_net.2.conv.0"] == [96, 80]

    again = run("eval", "-m", out, "--data", voc, "--split", "trainval", "--limit", 4, "--out-dir", tmp_path,
                "--report-name", "e")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "e.json").read_text())["mAP"] == after["eval"]["mAP"]
    assert load_detector(out).model.base_net[2].conv[3].groups == 80


def test_unstructured_layer_scope_with_amounts_file(checkpoint, voc, tmp_path):
    amounts = tmp_path / "amounts.json"
    amounts.write_text(json.dumps({"base_net.*": 0.5}))
    out = tmp_path / "sparse.pth"
    result = run("prune", "-m", checkpoint, "--scope", "layer", "--amount", 0.2, "--amounts-file", amounts,
                 "--data", voc, "--no-eval", "--runs", 1, "--threads", 1, "--out", out, "--out-dir", tmp_path,
                 "--report-name", "u")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "u.json").read_text())
    layers = report["layers"]
    assert abs(layers["base_net.3.conv.0"]["sparsity"] - 0.5) < 0.01
    assert abs(layers["extras.0.conv.0"]["sparsity"] - 0.2) < 0.01
    assert report["pruned"]["params"] == report["before"]["params"]  # dense shapes unchanged
    assert report["pruned"]["nonzero_params"] < 0.7 * report["before"]["nonzero_params"]
    assert "do not change" in (tmp_path / "u.md").read_text()
    assert json.loads(out.with_suffix(".json").read_text())["pruned"] is False  # no structural change


def test_sensitivity_then_amounts_file_and_finetune(checkpoint, voc, tmp_path):
    base = PruneJobConfig(
        model=ModelConfig(checkpoint), data=DataConfig("voc", voc, "trainval", None, 2), method="channels",
        sensitivity=True, sensitivity_amounts=(0.5,), threads=1, out_dir=tmp_path, report_name="s",
    )
    result, _ = prune(base)
    assert result.out is None and result.amounts_out.is_file()
    assert set(result.sensitivity.scores) >= {"base_net.2.conv.0", "extras.3.conv.0"}
    assert "drop at 0.5" in (tmp_path / "s.md").read_text()
    suggested = json.loads(result.amounts_out.read_text())
    assert set(suggested.values()) <= {0.0, 0.5}

    tuned, _ = prune(replace(base, sensitivity=False, amounts_file=result.amounts_out, finetune_epochs=1,
                             finetune_batch_size=5, latency_runs=1, onnx_latency=False, out=tmp_path / "ft.pth",
                             report_name="ft-report"))
    assert tuned.finetuned_eval is not None and len(tuned.finetune_history) == 1
    widths = tuned.recipe["widths"]
    assert widths and all(suggested[name] == 0.5 and after < before for name, (before, after) in widths.items())
    reloaded = load_detector(tmp_path / "ft.pth")  # the pruned widths rebuild from the sidecar
    assert all(reloaded.model.get_submodule(name).out_channels == after for name, (_, after) in widths.items())


def _one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error:") and fragment in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_errors_are_one_line_exit_2(checkpoint, tmp_path):
    _one_line_error(run("prune", "-m", checkpoint, "--amount", 1.5, "--out-dir", tmp_path), "--amount must be in [0, 1)")
    _one_line_error(run("prune", "-m", checkpoint, "--method", "rows", "--out-dir", tmp_path), "unknown pruning method")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base_net.2.conv.0": 2}))
    _one_line_error(run("prune", "-m", checkpoint, "--method", "channels", "--amounts-file", bad, "--out-dir", tmp_path),
                    "must be a number in [0, 1)")
    clash = tmp_path / "m.pth"
    _one_line_error(run("prune", "-m", checkpoint, "--out", clash, "--out-dir", tmp_path, "--report-name", "m"),
                    "would overwrite the sidecar")
    assert not list(tmp_path.glob("*.pth"))


def test_pruning_fine_tune_with_the_parent_as_teacher(checkpoint, voc, tmp_path):
    """`prune --finetune-epochs 1 --teacher parent`: the pruned student imitates the unpruned parent through
    adapters fitted by least squares to the first training batch's features (narrower student: not the identity),
    and the report says so."""
    from qcompress.jobs.finetune import teacher_distiller
    from qcompress.training.distill import DistillConfig, fit_pending

    config = PruneJobConfig(
        model=ModelConfig(checkpoint), data=DataConfig("voc", voc, "trainval", None, 2), method="channels",
        amount=0.3, finetune_epochs=1, finetune_batch_size=5, train_limit=5, teacher="parent", latency_runs=1,
        onnx_latency=False, threads=1,
        out=tmp_path / "kd.pth", out_dir=tmp_path, report_name="kd-report")
    result, _ = prune(config)
    assert result.finetune_history[0]["imitation_loss"] > 0
    assert "least-squares map" in (tmp_path / "kd-report.md").read_text()

    parent, pruned = load_detector(checkpoint), load_detector(tmp_path / "kd.pth")
    fitted, _ = teacher_distiller("parent", DistillConfig(), pruned, pruned.model, parent, checkpoint,
                                  torch.rand(1, 3, 300, 300))
    assert fitted.pending_fit and all(  # pruned levels wait for the first batch
        fitted.adapters[i].weight.shape[0] != fitted.adapters[i].weight.shape[1] for i in fitted.pending_fit)

    def features(images):
        fitted.student.train()  # as training runs it: BN on batch statistics
        with torch.no_grad():
            fitted(images)
            fitted.teacher(images)
        return list(fitted.student_taps.features), list(fitted.teacher_taps.features)

    torch.manual_seed(0)
    first, held_out = torch.rand(4, 3, 300, 300), torch.rand(4, 3, 300, 300)
    levels = list(fitted.pending_fit)
    assert fit_pending(fitted.adapters, fitted.pending_fit, *features(first)) == []
    s, t = features(held_out)
    for i in levels:
        with torch.no_grad():
            fitted_err = float((fitted.adapters[i](s[i]) - t[i]).pow(2).mean())
            random_err = float((torch.nn.Conv2d(s[i].shape[1], t[i].shape[1], 1)(s[i]) - t[i]).pow(2).mean())
        assert fitted_err < random_err
    fitted.detach_hooks()
