"""--max-drop's search (fewest float layers meeting a target) and the float-twin swap it evaluates."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub

from qcompress.errors import QCompressError
from qcompress.quant.fuse import fuse
from qcompress.quant.ptq import calibrate, convert_static, prepare_static
from qcompress.quant.qconfig import QuantScheme
from qcompress.quant.sensitivity import (
    fewest_float_layers,
    float_candidates,
    keep_float_gains,
    rank_layers,
    with_float_layers,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Additive:
    """A fake evaluate with a known answer: every int8 layer costs its own penalty."""

    def __init__(self, penalties: dict[str, float]) -> None:
        self.penalties = penalties
        self.calls: list[frozenset[str]] = []

    def __call__(self, float_layers: frozenset[str]) -> float:
        self.calls.append(float_layers)
        return 1.0 - sum(p for name, p in self.penalties.items() if name not in float_layers)


def brute_force(ranked: list[str], score, target: float) -> int | None:
    """Smallest k whose prefix meets the target, trying every k (the independent reference)."""
    return next((k for k in range(len(ranked)) if score(frozenset(ranked[:k])) >= target), None)


@pytest.mark.parametrize("seed", range(6))
def test_returns_the_fewest_float_layers_meeting_the_target(seed):
    rng = random.Random(seed)
    names = [f"layer{i}" for i in range(rng.randint(3, 40))]
    penalties = {n: rng.uniform(0.0, 0.02) for n in names}
    ranked = sorted(names, key=lambda n: -penalties[n])
    all_int8 = 1.0 - sum(penalties.values())
    for target in (all_int8 - 0.01, all_int8, rng.uniform(all_int8, 1.0 - min(penalties.values())), 1.0 - min(penalties.values())):
        fake = Additive(penalties)
        search = fewest_float_layers(ranked, fake, target)
        expected = brute_force(ranked, Additive(penalties), target)
        assert search.chosen == expected
        assert search.float_layers == ranked[:expected]
        assert search.score >= target
        # the widest split is checked first, and the search stays logarithmic-ish
        assert fake.calls[0] == frozenset(ranked[:-1])
        assert len(fake.calls) <= 2 + 2 * math.ceil(math.log2(len(ranked))) + 1
        assert [t.float_layers for t in search.trials] == [len(c) for c in fake.calls]


def test_every_layer_int8_is_enough():
    fake = Additive({"a": 0.01, "b": 0.01})
    search = fewest_float_layers(["a", "b"], fake, target=0.9)
    assert search.chosen == 0 and search.float_layers == [] and search.score == pytest.approx(0.98)
    assert fake.calls == [frozenset({"a"}), frozenset()]


def test_unreachable_target_raises_after_one_evaluation():
    fake = Additive({"a": 0.05, "b": 0.02, "c": 0.03})
    with pytest.raises(QCompressError, match="cannot be met.*2 of 3 layers float") as info:
        fewest_float_layers(["a", "c", "b"], fake, target=0.99)  # b alone int8 already costs 0.02
    assert fake.calls == [frozenset({"a", "c"})]
    assert "\n" not in str(info.value)


def test_nan_never_meets():
    with pytest.raises(QCompressError, match="cannot be met"):
        fewest_float_layers(["a", "b"], lambda layers: float("nan"), target=0.5)
    with pytest.raises(QCompressError, match="NaN"):
        fewest_float_layers(["a", "b"], lambda layers: 1.0, target=float("nan"))


def test_rank_layers_by_gain_then_by_sqnr():
    layers = ["a", "b", "c"]
    assert rank_layers(layers, {"a": 0.1, "b": 2.0, "c": 0.1}, {}) == ["b", "a", "c"]
    assert rank_layers(layers, None, {"a": 30.0, "b": 40.0, "c": 10.0}) == ["c", "a", "b"]
    assert rank_layers(layers, {"a": 0.0, "b": 0.01, "c": 0.0}, {}, tiebreak={"a": 1.0, "c": 3.0}) == ["b", "c", "a"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 4, 1),
        )
        self.dequant = DeQuantStub()

    def forward(self, x):
        y = self.dequant(self.body(self.quant(x)))
        return y[:, :2], y[:, 2:]  # raw head outputs, as an SSD returns them


def _net_and_int8(per_channel: bool = False):
    torch.manual_seed(0)
    model = Net().eval()
    fused, _ = fuse(model)
    scheme = QuantScheme(observer="minmax", per_channel=per_channel)
    calib = [torch.randn(4, 3, 12, 12) for _ in range(2)]

    def int8(skip=()):
        prepared, _, _ = prepare_static(fused, scheme, skip, fused=True)
        calibrate(prepared, calib)
        return convert_static(prepared, scheme)

    return model, fused, int8, calib


def test_float_twins_equal_the_skip_islands():
    _, fused, int8, _ = _net_and_int8()
    quantized = int8()
    assert float_candidates(quantized) == ["body.0", "body.3", "body.5"]
    x = torch.randn(3, 3, 12, 12)
    for layers in (["body.3"], ["body.0", "body.5"]):
        swapped = with_float_layers(quantized, fused, layers)
        with torch.inference_mode():
            assert all(torch.equal(a, b) for a, b in zip(swapped(x), int8(skip=layers)(x)))
    # the source model is untouched
    assert float_candidates(quantized) == ["body.0", "body.3", "body.5"]
    with pytest.raises(QCompressError, match="not a converted int8 layer"):
        with_float_layers(quantized, fused, ["body.1"])


def test_keep_float_gain_finds_the_layer_with_an_outlier_weight():
    model, _, _, _ = _net_and_int8()
    with torch.no_grad():
        model.body[3].weight[0, 0, 0, 0] = 50.0  # per-tensor: one weight sets the scale, the rest round to 0
    fused, _ = fuse(model)
    scheme = QuantScheme(observer="minmax", per_channel=False)
    prepared, _, _ = prepare_static(fused, scheme, fused=True)
    images = torch.randn(4, 3, 12, 12)
    calibrate(prepared, [images])
    quantized = convert_static(prepared, scheme)
    layers = float_candidates(quantized)
    gains = keep_float_gains(quantized, fused, model, layers, images)
    assert rank_layers(layers, gains, {})[0] == "body.3"
    assert gains["body.3"] > 3.0
