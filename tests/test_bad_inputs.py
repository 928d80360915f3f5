"""Bad input across commands: one ``error:`` line naming the problem, exit code 2, no traceback, and
nothing created or changed on disk. Each case fails before any long work (they run in seconds)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qcompress.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_checkpoint, tiny_voc) -> dict[str, Path]:
    """Wrong files of every kind, made once."""
    root = tmp_path_factory.mktemp("bad")
    state = torch.load(small_checkpoint, weights_only=True)
    made: dict[str, Path] = {"ckpt": small_checkpoint, "voc": tiny_voc}

    def save(name: str, sd: dict) -> Path:
        path = root / name
        torch.save(sd, path)
        return path

    nan = dict(state)
    key = next(k for k, v in nan.items() if v.is_floating_point())
    nan[key] = nan[key].clone().fill_(float("nan"))
    made["nan"] = save("nan.pth", nan)
    head = dict(state)
    head["classification_headers.5.weight"] = head["classification_headers.5.weight"][:3]
    made["head"] = save("head.pth", head)
    made["image"] = root / "photo.jpg"
    made["image"].write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    made["corrupt"] = root / "corrupt.pth"
    made["corrupt"].write_bytes(b"PK\x03\x04 not really a zip" * 10)
    made["pickle"] = root / "evil.pth"
    made["pickle"].write_bytes(pickle.dumps({"weights": shutil.rmtree}))  # never unpickled
    newer = root / "newer.pth"
    shutil.copy(small_checkpoint, newer)
    sidecar = json.loads(small_checkpoint.with_suffix(".json").read_text())
    (root / "newer.json").write_text(json.dumps({**sidecar, "format": "qcompress-checkpoint/9"}))
    made["newer"] = newer
    made["empty_labels"] = root / "labels.txt"
    made["empty_labels"].write_text("\n")
    made["bad_json"] = root / "amounts.json"
    made["bad_json"].write_text("{not json")
    made["text_image"] = root / "notes.jpg"
    made["text_image"].write_text("this is not an image")
    images = root / "coco" / "images"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(made["image"].read_bytes())
    made["images"] = images
    broken = root / "broken_voc"
    shutil.copytree(tiny_voc, broken)
    split = next(broken.rglob("ImageSets/Main/test.txt"))
    first = split.read_text().split()[0]
    xml = split.parents[2] / "Annotations" / f"{first}.xml"
    xml.write_text("<annotation><object><name>circle</name><bndbox><xmin>1")
    made["broken_voc"] = broken
    run = root / "halted-run"  # an interrupted run whose training state was cut short on disk
    run.mkdir()
    shutil.copy(small_checkpoint, run / "last.pth")
    shutil.copy(small_checkpoint.with_suffix(".json"), run / "last.json")
    (run / "last.state.pt").write_bytes(b"PK\x03\x04 truncated" * 4)
    made["halted"] = root / "halted.pth"
    return made


# (id, args built from the files, a fragment the error line must contain)
CASES: list[tuple[str, Callable[[dict, Path], list], str]] = [
    ("missing model", lambda f, t: ["eval", "-m", t / "none.pth"], "model file not found"),
    ("unknown embedded model", lambda f, t: ["eval", "-m", "embedded:nope"], "embedded:mb2-ssd-lite-synth"),
    ("image as model", lambda f, t: ["eval", "-m", f["image"]], "JPEG image"),
    ("sidecar as model", lambda f, t: ["eval", "-m", f["ckpt"].with_suffix(".json")], "sidecar"),
    ("corrupt model", lambda f, t: ["eval", "-m", f["corrupt"]], "cannot read model file"),
    ("pickled objects", lambda f, t: ["eval", "-m", f["pickle"]], "never unpickles"),
    ("NaN weights", lambda f, t: ["eval", "-m", f["nan"]], "NaN or infinite"),
    ("class head shape", lambda f, t: ["eval", "-m", f["head"]], "classification_headers.5.weight has shape (3,"),
    ("newer sidecar", lambda f, t: ["eval", "-m", f["newer"]], "newer than this qcompress"),
    ("unknown arch", lambda f, t: ["eval", "-m", f["ckpt"], "--arch", "resnet9000"], "unknown architecture"),
    ("arch contradicts sidecar", lambda f, t: ["eval", "-m", f["ckpt"], "--arch", "ultralight-rfb"], "contradicts"),
    ("unknown metric", lambda f, t: ["eval", "-m", f["ckpt"], "--metric", "f1"], "unknown metric"),
    ("missing data folder", lambda f, t: ["eval", "-m", f["ckpt"], "--data", t / "nowhere"], "nowhere"),
    ("images given as VOC", lambda f, t: ["eval", "-m", f["ckpt"], "--data", f["images"]], "--dataset coco"),
    ("coco without data", lambda f, t: ["eval", "-m", f["ckpt"], "--dataset", "coco"], "--dataset coco needs"),
    ("coco without json", lambda f, t: ["eval", "-m", f["ckpt"], "--dataset", "coco", "--data", f["images"]],
     "no COCO annotation json"),
    ("unknown dataset kind", lambda f, t: ["eval", "-m", f["ckpt"], "--dataset", "kitti"], "unknown dataset"),
    ("limit 0", lambda f, t: ["eval", "-m", f["ckpt"], "--data", f["voc"], "--limit", "0"], "--limit must be positive"),
    ("missing labels", lambda f, t: ["eval", "-m", f["ckpt"], "--labels", t / "l.txt"], "labels file not found"),
    ("empty labels", lambda f, t: ["eval", "-m", f["ckpt"], "--labels", f["empty_labels"]], "labels file is empty"),
    ("malformed XML", lambda f, t: ["eval", "-m", f["ckpt"], "--data", f["broken_voc"]], "xml"),
    ("unwritable out-dir", lambda f, t: ["eval", "-m", f["ckpt"], "--out-dir", "/proc/forbidden"], "cannot write"),
    ("quantize unwritable out-dir",
     lambda f, t: ["quantize", "-m", f["ckpt"], "--data", f["voc"], "--out-dir", "/proc/forbidden"], "cannot write"),
    ("quantize unwritable out",
     lambda f, t: ["quantize", "-m", f["ckpt"], "--data", f["voc"], "--out", "/proc/x/q.pth"], "cannot write"),
    ("quantize over its input", lambda f, t: ["quantize", "-m", f["ckpt"], "--out", f["ckpt"]], "overwrite"),
    ("quantize calib 0", lambda f, t: ["quantize", "-m", f["ckpt"], "--data", f["voc"], "--calib-images", "0"],
     "--calib-images"),
    ("quantize backend", lambda f, t: ["quantize", "-m", f["ckpt"], "--backend", "tpu"], "backend"),
    ("quantize observer", lambda f, t: ["quantize", "-m", f["ckpt"], "--observer", "magic"], "observer"),
    ("prune amount", lambda f, t: ["prune", "-m", f["ckpt"], "--amount", "1.5"], "amount"),
    ("prune method", lambda f, t: ["prune", "-m", f["ckpt"], "--method", "random"], "method"),
    ("prune amounts file", lambda f, t: ["prune", "-m", f["ckpt"], "--method", "channels", "--amounts-file",
                                        f["bad_json"]], "JSON"),
    ("prune unwritable out-dir", lambda f, t: ["prune", "-m", f["ckpt"], "--out-dir", "/proc/forbidden"],
     "cannot write"),
    ("qat bits with int8", lambda f, t: ["qat", "-m", f["ckpt"], "--bits-w", "2", "--bits-a", "2"], "do not apply"),
    ("qat method", lambda f, t: ["qat", "-m", f["ckpt"], "--method", "xnor9"], "method"),
    ("qat epochs", lambda f, t: ["qat", "-m", f["ckpt"], "--epochs", "0"], "--epochs"),
    ("qat latency runs", lambda f, t: ["qat", "-m", f["ckpt"], "--runs", "0"], "--runs must be >= 1"),
    ("qat scope", lambda f, t: ["qat", "-m", f["ckpt"], "--data", f["voc"], "--method", "lsq", "--scope", "heads"],
     "unknown scope"),
    ("qat heads without scope all", lambda f, t: ["qat", "-m", f["ckpt"], "--method", "lsq", "--heads"], "--scope all"),
    ("qat heads with int8", lambda f, t: ["qat", "-m", f["ckpt"], "--heads"], "--heads"),
    ("qat binary scale with lsq", lambda f, t: ["qat", "-m", f["ckpt"], "--method", "lsq", "--binary-scale", "spatial"],
     "--method binary"),
    ("qat binary scale unknown", lambda f, t: ["qat", "-m", f["ckpt"], "--method", "binary", "--binary-scale", "pixel"],
     "layer, spatial or learned"),
    ("qat teacher psi", lambda f, t: ["qat", "-m", f["ckpt"], "--teacher", "parent", "--psi", "2"], "--psi"),
    ("qat teacher nothing", lambda f, t: ["qat", "-m", f["ckpt"], "--teacher", "parent", "--imitation", "0"],
     "distils nothing"),
    ("prune teacher without fine-tune", lambda f, t: ["prune", "-m", f["ckpt"], "--teacher", "parent"],
     "--finetune-epochs"),
    ("qat report over its checkpoint's sidecar",
     lambda f, t: ["qat", "-m", f["ckpt"], "--data", f["voc"], "--method", "lsq", "--out", t / "r.pth", "--out-dir", t,
                   "--report-name", "r"], "would overwrite the sidecar of checkpoint"),
    ("qat steps report over a step's sidecar",
     lambda f, t: ["qat", "-m", f["ckpt"], "--data", f["voc"], "--method", "binary", "--steps", "base_net.1*;base_net.2*",
                   "--out", t / "s.pth", "--out-dir", t, "--report-name", "s-step2"], "sidecar of checkpoint"),
    ("quantize report over its checkpoint's sidecar",
     lambda f, t: ["quantize", "-m", f["ckpt"], "--data", f["voc"], "--out", t / "q.pth", "--out-dir", t,
                   "--report-name", "q"], "would overwrite the sidecar of checkpoint"),
    ("qat steps with int8", lambda f, t: ["qat", "-m", f["ckpt"], "--steps", "base_net.1*"], "not int8"),
    ("qat steps empty", lambda f, t: ["qat", "-m", f["ckpt"], "--method", "binary", "--steps", "a;;b"], "empty step"),
    ("qat step epochs per step", lambda f, t: ["qat", "-m", f["ckpt"], "--method", "binary", "--steps", "a;b",
                                               "--step-epochs", "6"], "1 epoch count(s) for 2 step(s)"),
    ("qat steps from a missing checkpoint", lambda f, t: ["qat", "-m", f["ckpt"], "--method", "binary", "--steps",
                                                          "a;b", "--steps-from", t / "none.pth"], "checkpoint not found"),
    ("qat steps from the float parent", lambda f, t: ["qat", "-m", f["ckpt"], "--data", f["voc"], "--method", "binary",
                                                      "--steps", "base_net.1*;base_net.2*", "--steps-from", f["ckpt"]],
     "was not fine-tuned from"),
    ("qat steps match nothing", lambda f, t: ["qat", "-m", f["ckpt"], "--data", f["voc"], "--method", "binary",
                                              "--steps", "nothing*"], "selects no new convolution"),
    ("train freeze matches nothing", lambda f, t: ["train", "--init", f["ckpt"], "--out", t / "m.pth", "--data", f["voc"],
                                                   "--freeze", "backbone.body.layer1"], "matches no module"),
    ("train negative seed", lambda f, t: ["train", "--init", f["ckpt"], "--out", t / "m.pth", "--seed", "-1"],
     "--seed"),
    ("train init is out", lambda f, t: ["train", "--init", f["ckpt"], "--out", f["ckpt"], "--data", f["voc"]],
     "is the --init checkpoint"),
    ("train arch option unknown", lambda f, t: ["train", "--arch", "fasterrcnn_vgg16", "--arch-options", '{"depth": 3}',
                                                "--data", f["voc"], "--out", t / "m.pth"], "its options: input_size"),
    ("train arch options not JSON", lambda f, t: ["train", "--arch", "fasterrcnn_vgg16", "--arch-options", "{width: 1}",
                                                  "--data", f["voc"], "--out", t / "m.pth"], "not valid JSON"),
    ("train arch options with init", lambda f, t: ["train", "--init", f["ckpt"], "--arch-options", '{"width": 1}',
                                                   "--data", f["voc"], "--out", t / "m.pth"], "drop --arch-options"),
    ("train resume damaged state", lambda f, t: ["train", "--resume", "--out", f["halted"], "--data", f["voc"]],
     "cannot resume from"),
    ("qat resume damaged state", lambda f, t: ["qat", "-m", f["ckpt"], "--data", f["voc"], "--method", "lsq",
                                               "--resume", "--out", f["halted"]], "cannot resume from"),
    ("train resume nothing", lambda f, t: ["train", "--resume", "--out", t / "m.pth", "--data", f["voc"]],
     "nothing to resume"),
    ("bench runs 0", lambda f, t: ["bench", "-m", f["ckpt"], "--runs", "0"], "runs"),
    # training settings are checked before anything is read or written (they used to train 0 epochs and save the
    # model, or fail after data loading with a ValueError / ZeroDivisionError traceback)
    ("train epochs 0", lambda f, t: ["train", "--data", f["voc"], "--epochs", "0", "--out", t / "m.pth"], "--epochs"),
    ("train lr negative", lambda f, t: ["train", "--data", f["voc"], "--lr", "-1", "--out", t / "m.pth"], "--lr"),
    ("train batch size 0", lambda f, t: ["train", "--data", f["voc"], "--batch-size", "0", "--out", t / "m.pth"],
     "--batch-size"),
    ("train optimizer unknown", lambda f, t: ["train", "--data", f["voc"], "--optimizer", "rmsprop", "--out",
                                              t / "m.pth"], "adamw or sgd"),
    ("qat lr 0", lambda f, t: ["qat", "-m", f["ckpt"], "--lr", "0"], "--lr"),
    # values that used to run anyway (0 read as "no limit", NaN passing every comparison) or end in a traceback
    ("qat train limit 0", lambda f, t: ["qat", "-m", f["ckpt"], "--train-limit", "0"], "--train-limit"),
    ("prune train limit 0", lambda f, t: ["prune", "-m", f["ckpt"], "--finetune-epochs", "1", "--train-limit", "0"],
     "--train-limit"),
    ("eval batch size 0", lambda f, t: ["eval", "-m", f["ckpt"], "--data", f["voc"], "--batch-size", "0"], "--batch-size"),
    ("eval reference score 2", lambda f, t: ["eval", "-m", f["ckpt"], "--data", f["voc"], "--reference-score", "2"],
     "--reference-score"),
    ("input size 0", lambda f, t: ["bench", "-m", f["ckpt"], "--input-size", "0"], "--input-size"),
    ("input size of an architecture without one", lambda f, t: ["eval", "-m", f["ckpt"], "--data", f["voc"],
                                                                "--input-size", "320"], "no option input_size"),
    ("export min sqnr nan", lambda f, t: ["export", "-m", f["ckpt"], "--out", t / "m.onnx", "--min-sqnr", "nan"],
     "--min-sqnr"),
    # usage errors (Typer would draw a multi-line panel): one line naming the option and where the help is
    ("unknown option", lambda f, t: ["qat", "-m", f["ckpt"], "--epoch", "2"], "no such option: --epoch"),
    ("option value not a number", lambda f, t: ["qat", "-m", f["ckpt"], "--epochs", "two"], "'--epochs'"),
    ("option without its value", lambda f, t: ["eval", "-m", f["ckpt"], "--limit"], "--limit"),
    ("unknown command", lambda f, t: ["quantise", "-m", f["ckpt"]], "no such command 'quantise'"),
    ("detect missing image", lambda f, t: ["detect", "--image", t / "none.jpg", "-m", f["ckpt"]], "not found"),
    ("detect unreadable image", lambda f, t: ["detect", "--image", f["text_image"], "-m", f["ckpt"]], "image"),
]


def _snapshot(*roots: Path) -> dict[str, str]:
    seen = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.mark.parametrize(("args", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(files, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)  # default outputs (eval_results/, trained_models/) would land here
    work = tmp_path / "work"
    work.mkdir()
    watched = (tmp_path, files["ckpt"].parent, files["voc"])
    before = _snapshot(*watched)
    result = runner.invoke(app, [str(a) for a in args(files, work)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output and "weights_only=False" not in result.output
    assert fragment.lower() in " ".join(result.output.split()).lower(), result.output
    assert _snapshot(*watched) == before


def test_at_least_30_kinds():
    assert len(CASES) >= 30


def test_ctrl_c_during_quantize_exits_130_and_writes_nothing(small_checkpoint, tiny_voc, tmp_path, monkeypatch):
    import qcompress.jobs.quantize as job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "calibration_batches", interrupted)
    out = tmp_path / "q.pth"
    result = runner.invoke(app, ["quantize", "-m", str(small_checkpoint), "--data", str(tiny_voc), "--out", str(out),
                                 "--out-dir", str(tmp_path / "reports")])
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1].startswith("error:")
    assert not out.exists() and not (tmp_path / "reports").exists()
