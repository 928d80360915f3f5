"""SSD training: the loss pieces and a short run that must reduce the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompress.data.voc import VOCDataset
from qcompress.io_utils import read_labels
from qcompress.models import build_detector
from qcompress.training.augment import ssd_augment
from qcompress.training.loop import SSDTrainSet, TrainConfig, ssd_priors_for, train_detector
from qcompress.training.loss import hard_negative_mask, multibox_loss


def test_hard_negative_mask_keeps_three_negatives_per_positive():
    labels = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]])
    background_loss = torch.tensor([[9.0, 1.0, 5.0, 2.0, 7.0, 3.0, 0.5, 4.0]])
    mask = hard_negative_mask(background_loss, labels, 3)
    # the positive, then the three hardest negatives (losses 7, 5, 4); the positive's own loss is ignored
    assert mask.tolist() == [[True, False, True, False, True, False, False, True]]


def test_multibox_loss_is_zero_for_perfect_predictions():
    labels = torch.tensor([[2, 0, 0, 0]])
    targets = torch.randn(1, 4, 4)
    confidences = torch.full((1, 4, 3), -50.0)
    confidences[0, 0, 2] = 50.0
    confidences[0, 1:, 0] = 50.0
    regression, classification = multibox_loss(confidences, targets.clone(), labels, targets)
    assert float(regression) == 0.0 and float(classification) < 1e-6


def test_augmentation_keeps_boxes_inside_the_image():
    rng = np.random.default_rng(0)
    image = np.zeros((200, 300, 3), np.uint8)
    boxes = np.array([[10, 10, 100, 120], [150, 50, 290, 190]], np.float32)
    labels = np.array([1, 2])
    for _ in range(50):
        out, b, lab = ssd_augment(image, boxes, labels, rng)
        h, w = out.shape[:2]
        assert len(b) == len(lab) >= 1
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


def _loss_on(detector, data, indices):
    detector.model.eval()
    with torch.no_grad():
        items = [data[i] for i in indices]
        images, targets, labels = (torch.stack(t) for t in zip(*items))
        r, c = multibox_loss(*detector.model(images), labels, targets)
    return float(r + c)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_one_epoch_on_a_tiny_dataset_reduces_the_loss(tiny_voc, bf16):
    torch.manual_seed(0)
    names = read_labels(tiny_voc.parent / "labels.txt")
    # bf16 autocast is emulated (slow) on CPUs without AVX512-BF16: a narrower network keeps the case cheap
    detector = build_detector("mb2-ssd-lite", names, **({"width_mult": 0.5} if bf16 else {}))
    train_set = VOCDataset(tiny_voc, "train", names)
    indices = list(range(8))

    class First8:
        class_names = names

        def __len__(self):
            return 8

        def __getattr__(self, name):
            return getattr(train_set, name)

    plain = SSDTrainSet(First8(), detector.spec, ssd_priors_for(detector), augment=False, seed=0)
    # BN running statistics start at (0, 1); measure in train-mode statistics' absence with eval after a warm pass
    before = _loss_on(detector, plain, indices)
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, warmup_epochs=0.0, augment=False, num_workers=0,
                         eval_every=1, channels_last=False, bf16=bf16)
    history = []
    result = train_detector(detector, First8(), config, on_epoch=lambda e, rec: history.append(rec))
    after = _loss_on(detector, plain, indices)
    assert result.epochs_run == 1 and history[0]["classification_loss"] > 0
    assert after < before


def test_an_interrupted_train_run_resumes_and_its_last_checkpoint_says_how_far_it_got(small_checkpoint, tiny_voc,
                                                                                       tmp_path):
    """`qcompress train` stopped after epoch 1 of 2: the run folder's last.pth is a usable checkpoint whose sidecar
    says 1 of 2 epochs (history included); `--resume` finishes the run, and the final sidecar records the step
    once (2 epochs), not the interrupted part again."""
    import json
    from dataclasses import replace

    from conftest import stop_after_first_epoch

    from qcompress.core import DataConfig
    from qcompress.jobs.train import TrainJobConfig, train

    out = tmp_path / "m.pth"
    config = TrainJobConfig(init=small_checkpoint, out=out, data=DataConfig(data=tiny_voc, split="train", limit=4),
                            val_split="val", out_dir=tmp_path,
                            train=TrainConfig(epochs=2, batch_size=4, lr=1e-3, threads=1, eval_limit=2, num_workers=0))

    stop_after_first_epoch(train, config)
    assert not out.exists()
    last = json.loads((tmp_path / "m-run" / "last.json").read_text())
    assert last["in_progress"]["epochs_done"] == 1 and last["in_progress"]["of"] == 2
    assert len(last["training"]["history"]) == 1
    parent_chain = json.loads(small_checkpoint.with_suffix(".json").read_text()).get("compression", [])
    assert last["compression"] == parent_chain  # the unfinished step is not in the chain

    _, result, _ = train(replace(config, resume=True))
    assert [h["epoch"] for h in result.history] == [1, 2]
    final = json.loads(out.with_suffix(".json").read_text())
    assert "in_progress" not in final
    assert final["compression"][len(parent_chain):] == [final["compression"][-1]]
    assert final["compression"][-1]["step"] == "train" and final["compression"][-1]["epochs"] == 2


def test_frozen_modules_keep_their_weights_and_statistics_while_the_rest_trains(tiny_voc):
    """`--freeze base_net.0,base_net.1`: those modules' weights and BN running statistics end bit-identical, every
    other module trains (weights and statistics move), and every parameter needs gradients again afterwards."""
    from qcompress.errors import QCompressError
    from qcompress.training.loop import frozen_modules

    torch.manual_seed(0)
    names = read_labels(tiny_voc.parent / "labels.txt")
    detector = build_detector("mb2-ssd-lite", names, width_mult=0.5)
    from qcompress.core.loading import Subset

    train_set = Subset(VOCDataset(tiny_voc, "train", names), [0, 1])  # one step of 2 images
    before = {k: v.clone() for k, v in detector.model.state_dict().items()}
    config = TrainConfig(epochs=1, batch_size=2, lr=1e-3, warmup_epochs=0.0, augment=False, num_workers=0,
                         channels_last=False, freeze=("base_net.0", "base_net.1"))
    train_detector(detector, train_set, config)
    after = detector.model.state_dict()
    frozen = [k for k in before if k.startswith(("base_net.0.", "base_net.1."))]
    assert any(k.endswith("running_mean") for k in frozen) and any(k.endswith("weight") for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    moved = [k for k in before if k.startswith("base_net.2.") and before[k].is_floating_point()]
    assert moved and all(not torch.equal(before[k], after[k]) for k in moved)
    assert all(p.requires_grad for p in detector.model.parameters())
    with pytest.raises(QCompressError, match="matches no module"):
        frozen_modules(detector.model, ["backbone.*"])
