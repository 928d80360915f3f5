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


def test_step_epochs_need_one_positive_count_per_step():
    from qcompress.jobs.qat import QATJobConfig
    from qcompress.jobs.qat_steps import epochs_per_step, parse_step_epochs

    assert parse_step_epochs(" 6, 1 ,2", 3) == [6, 1, 2]
    for bad in ("6,0,1", "6,-1,1", "a,1,1", "6,,1", "1.5,1,1"):
        with pytest.raises(QCompressError, match="not a list of positive integers"):
            parse_step_epochs(bad, 3)
    with pytest.raises(QCompressError, match="2 epoch count"):
        parse_step_epochs("6,1", 3)
    assert epochs_per_step(QATJobConfig(method="binary", steps="a;b", epochs=3)) == [3, 3]
    assert epochs_per_step(QATJobConfig(method="binary", steps="a;b", step_epochs="4,1")) == [4, 1]
    with pytest.raises(QCompressError, match="add --steps"):
        QATJobConfig(method="binary", step_epochs="4,1").validate()
    with pytest.raises(QCompressError, match="1 epoch count"):
        QATJobConfig(method="binary", steps="a;b", step_epochs="4").validate()
