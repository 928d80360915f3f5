"""Shared fixtures: tiny generated datasets and small models, written under tmp paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN layers non-trivial statistics so function-preservation tests mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def pytest_configure(config) -> None:
    """Under pytest-xdist (``-n 2``, the default in pyproject) each worker gets one core: torch (and the
    processes a test starts) use one thread, as two workers with two threads each would contend for the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


class Interrupted(Exception):
    """Stands for a run killed after its first epoch (see :func:`stop_after_first_epoch`)."""


def stop_after_first_epoch(run, *args, **kwargs) -> None:
    """``run(*args, on_epoch=..., **kwargs)`` stopped by an exception as its first epoch ends (after that epoch's
    checkpoint), as an interrupted training run is."""

    def interrupt(epoch, record):
        raise Interrupted

    with pytest.raises(Interrupted):
        run(*args, on_epoch=interrupt, **kwargs)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core machine, contended OpenMP barriers cost
    seconds per forward pass. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> Path:
    """A 16-image generated VOC-layout dataset (year folder), shared by the whole session."""
    from qcompress.data.synthetic import generate_voc_dataset

    root = tmp_path_factory.mktemp("tiny_voc")
    return generate_voc_dataset(root, num_images=16, seed=3)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """An untrained mb2-ssd-lite for the 8 synthetic classes, saved with its sidecar."""
    from qcompress.core.checkpoints import save_detector
    from qcompress.data.synthetic import SYNTH_CLASSES
    from qcompress.models import build_detector

    torch.manual_seed(0)
    detector = build_detector("mb2-ssd-lite", SYNTH_CLASSES)
    randomize_bn(detector.model)
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    save_detector(detector, path, command=["test"])
    return path
