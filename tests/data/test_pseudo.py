"""Pseudo labels: the parent's own detections become the annotations of unlabelled images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompress import api
from qcompress.core.checkpoints import load_detector
from qcompress.data.pseudo import PseudoLabeled, pseudo_split_indices
from qcompress.data.voc import VOCDataset
from qcompress.defaults import default_model_path
from qcompress.errors import QCompressError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_holds_out_the_first_limit_images():
    assert pseudo_split_indices(10, 3, "eval") == [0, 1, 2]
    assert pseudo_split_indices(10, 3, "train") == list(range(3, 10))
    with pytest.raises(QCompressError, match="needs --limit"):
        pseudo_split_indices(10, None, "train")
    with pytest.raises(QCompressError, match="leaves no training images"):
        pseudo_split_indices(10, 10, "train")


@pytest.fixture(scope="module")
def parent():
    return load_detector(default_model_path())


def test_annotations_are_the_parents_confident_detections(parent, tiny_voc):
    base = VOCDataset(tiny_voc, "train", parent.class_names)
    labelled = PseudoLabeled(base, parent, 0.4, [2, 5, 7])
    assert len(labelled) == 3 and labelled.image_id(1) == base.image_id(5)
    assert np.array_equal(labelled.load_image(2), base.load_image(7))
    detections = parent.detect([base.load_image(i) for i in (2, 5, 7)])
    for i, det in enumerate(detections):
        keep = det.scores >= 0.4
        ann = labelled.annotation(i)
        assert np.allclose(ann.boxes, det.boxes[keep].numpy()) and np.array_equal(ann.labels, det.labels[keep].numpy())
        assert not ann.difficult.any()
    assert labelled.num_objects > 0


def test_the_parent_scores_one_on_its_own_pseudo_labels(parent, tiny_voc):
    data = api.DataConfig("voc", tiny_voc, "train", limit=6, pseudo_labels=0.5)
    test_set = api.load_dataset(data, parent.class_names, reference=parent)
    assert len(test_set) == 6
    train_set = api.load_dataset(data, parent.class_names, "train", reference=parent)
    assert len(train_set) == len(VOCDataset(tiny_voc, "train", parent.class_names)) - 6
    result, _ = api.evaluate_detector(parent, test_set, "voc")
    assert result.num_objects > 0 and result.mAP == pytest.approx(1.0)
    with pytest.raises(QCompressError, match="needs a float parent"):
        api.load_dataset(data, parent.class_names)


def test_frozen_bn_keeps_running_statistics(tiny_voc):
    from qcompress.training.loop import TrainConfig, train_detector

    parent = load_detector(default_model_path())
    stats = {n: b.clone() for n, b in parent.model.named_buffers() if "running" in n}
    data = api.DataConfig("voc", tiny_voc, "train", limit=4, pseudo_labels=0.5)
    train_set = api.load_dataset(data, parent.class_names, "train", reference=parent)
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-4, warmup_epochs=0.0, num_workers=0, freeze_bn=True)
    weights = {n: p.detach().clone() for n, p in parent.model.named_parameters()}
    train_detector(parent, train_set, config)
    assert all(torch.equal(b, stats[n]) for n, b in parent.model.named_buffers() if "running" in n)
    assert any(not torch.equal(p, weights[n]) for n, p in parent.model.named_parameters())
