"""Checkpoints: safe loading, sidecars, round trips, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from qcompress.core.checkpoints import load_detector, read_state_dict, save_detector, sidecar_path
from qcompress.errors import QCompressError
from qcompress.io_utils import read_labels
from qcompress.models import build_detector


def _x():
    return torch.randn(2, 3, 300, 300, generator=torch.Generator().manual_seed(1))


def test_round_trip_gives_identical_outputs(small_checkpoint, tmp_path):
    det = load_detector(small_checkpoint)
    out = tmp_path / "copy.pth"
    save_detector(det, out, parent=small_checkpoint)
    again = load_detector(out)
    with torch.no_grad():
        a, b = det.model(_x()), again.model(_x())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sidecar = json.loads(sidecar_path(out).read_text())
    assert sidecar["arch"] == "mb2-ssd-lite"
    assert sidecar["class_names"][0] == "BACKGROUND"
    assert len(sidecar["parent_sha256"]) == 64
    assert {"torch", "torchvision", "qcompress"} <= set(sidecar["versions"])


def test_float16_storage_halves_the_file_and_loads_as_the_rounded_float32_model(small_checkpoint, tmp_path):
    det = load_detector(small_checkpoint)
    full, half = tmp_path / "full.pth", tmp_path / "half.pth"
    save_detector(det, full)
    save_detector(det, half, storage="float16")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert all(v.dtype != torch.float32 for v in read_state_dict(half).values())
    again = load_detector(half)
    for name, tensor in det.model.state_dict().items():
        loaded = again.model.state_dict()[name]
        assert loaded.dtype == tensor.dtype  # cast back
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert torch.equal(loaded, expected), name
    with pytest.raises(QCompressError, match="float16 storage is for float models"):
        save_detector(det, tmp_path / "q.pth", storage="float16", quantization={"scheme": "x"})


def test_plain_pytorch_ssd_state_dict_loads_with_labels(tmp_path):
    det = build_detector("mb2-ssd-lite", ["BACKGROUND", "cat", "dog"])
    path = tmp_path / "plain.pth"
    torch.save(det.model.state_dict(), path)  # no sidecar, like pytorch-ssd's files
    labels = tmp_path / "labels.txt"
    labels.write_text("BACKGROUND\ncat\ndog\n")
    loaded = load_detector(path, labels=labels)
    assert loaded.class_names == ("BACKGROUND", "cat", "dog")
    # without labels: class count inferred from the head, generic names
    assert load_detector(path).class_names == ("BACKGROUND", "class1", "class2")


def test_nested_state_dict_is_accepted(tmp_path):
    det = build_detector("mb2-ssd-lite", ["BACKGROUND", "a"])
    path = tmp_path / "nested.pth"
    torch.save({"state_dict": det.model.state_dict(), "epoch": 3}, path)
    assert load_detector(path).spec.num_classes == 2


def test_labels_file_gets_background_first(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("cat\ndog\n")
    assert read_labels(f) == ("BACKGROUND", "cat", "dog")


def test_save_refuses_to_overwrite_its_parent(small_checkpoint):
    det = load_detector(small_checkpoint)
    before = small_checkpoint.read_bytes()
    with pytest.raises(QCompressError, match="overwrite"):
        save_detector(det, small_checkpoint, parent=small_checkpoint)
    assert small_checkpoint.read_bytes() == before


def test_missing_file(tmp_path):
    with pytest.raises(QCompressError, match="not found"):
        load_detector(tmp_path / "nope.pth")


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"\x80\x02this is not a checkpoint")
    with pytest.raises(QCompressError, match="cannot read model file"):
        load_detector(path)


def test_arbitrary_pickled_objects_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('%s').write_text('pwned')" % (tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(QCompressError):
        read_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_wrong_class_count_names_both_counts(tmp_path):
    det = build_detector("mb2-ssd-lite", ["BACKGROUND", "a", "b"])
    path = tmp_path / "m.pth"
    torch.save(det.model.state_dict(), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("BACKGROUND\na\nb\nc\n")
    with pytest.raises(QCompressError, match="3 classes .* labels give 4"):
        load_detector(path, labels=labels)


def test_wrong_architecture_suggests_arch(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(QCompressError) as info:
        load_detector(path, labels=_labels(tmp_path))
    assert "does not match architecture 'mb2-ssd-lite'" in str(info.value)
    assert "--arch" in info.value.hint


def _labels(tmp_path):
    f = tmp_path / "two.txt"
    f.write_text("BACKGROUND\nx\n")
    return f


def test_malformed_sidecar(small_checkpoint, tmp_path):
    path = tmp_path / "m.pth"
    path.write_bytes(small_checkpoint.read_bytes())
    sidecar_path(path).write_text("{not json")
    with pytest.raises(QCompressError, match="not valid JSON"):
        load_detector(path)


def test_unknown_arch_lists_choices(small_checkpoint):
    with pytest.raises(QCompressError) as info:
        load_detector(small_checkpoint, arch="yolo-v99")
    assert "mb2-ssd-lite" in info.value.hint
