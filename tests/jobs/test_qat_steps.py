"""``qat --steps``: parsing the groups and resolving them to convs (binary skips depthwise convs)."""

from __future__ import annotations

import pytest
from torch import nn

from qcompress.errors import QCompressError
from qcompress.jobs.qat_steps import parse_steps, resolve_steps


def test_parse_steps_splits_steps_and_globs():
    assert parse_steps("conv1_*, conv2_* ;conv3_*;fc6") == [["conv1_*", "conv2_*"], ["conv3_*"], ["fc6"]]
    for bad in ("", "a;;b", "a;", " , "):
        with pytest.raises(QCompressError, match="empty step"):
            parse_steps(bad)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1),
                         nn.Sequential(nn.Conv2d(16, 16, 3), nn.Linear(4, 4)), nn.ConvTranspose2d(4, 4, 2, 2))


def test_each_conv_joins_the_first_step_that_matches_it():
    net = _net()
    assert resolve_steps(net, [["0", "1"], ["*"]], binary=False) == [["0", "1"], ["2", "3.0", "3.1", "4"]]
    # binary: the depthwise conv stays float; a Linear (fc6 of the 1-bit Faster R-CNN) and a transposed conv
    # (CenterNet's decoder) are binarized too
    assert resolve_steps(net, [["0", "1"], ["*"]], binary=True) == [["0"], ["2", "3.0", "3.1", "4"]]


def test_a_step_that_adds_nothing_is_an_error_naming_it():
    with pytest.raises(QCompressError, match=r"step 2 \(0\) selects no new convolution"):
        resolve_steps(_net(), [["*"], ["0"]], binary=False)
    with pytest.raises(QCompressError, match="step 1"):
        resolve_steps(_net(), [["1"]], binary=True)  # only a depthwise conv
