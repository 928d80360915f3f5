"""Unstructured magnitude pruning: exact sparsity, identity at zero, permanence, masks survive training."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qcompress.errors import QCompressError
from qcompress.models import build_detector
from qcompress.prune.magnitude import apply_unstructured, make_permanent, prunable_layers, prune_unstructured

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ssd() -> nn.Module:
    torch.manual_seed(0)
    return build_detector("mb2-ssd-lite", ("BACKGROUND", "a", "b")).model.eval()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in prunable_layers(model).items()}


def test_global_sparsity_equals_amount_and_threshold_is_shared(ssd):
    model = copy.deepcopy(ssd)
    record = prune_unstructured(model, 0.3, "global")
    weights = _weights(model)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.3 * total) and record.zeros == zeros
    assert abs(record.sparsity - 0.3) < 1e-6
    largest_pruned = max(float(ssd.get_submodule(n).weight.detach().abs()[w == 0].max()) for n, w in weights.items() if (w == 0).any())
    smallest_kept = min(float(w.abs()[w != 0].min()) for w in weights.values())
    assert largest_pruned <= smallest_kept  # one global magnitude threshold
    assert len({round(v["sparsity"], 2) for v in record.layers.values()}) > 1  # layers differ under a global threshold


def test_layer_sparsity_equals_amount_in_every_layer(ssd):
    model = copy.deepcopy(ssd)
    record = prune_unstructured(model, 0.25, "layer", amounts={"classification_headers.*": 0.5})
    for name, w in _weights(model).items():
        amount = 0.5 if name.startswith("classification_headers") else 0.25
        assert int((w == 0).sum()) == round(amount * w.numel()), name
        assert record.layers[name]["zeros"] == round(amount * w.numel())


def test_zero_amount_is_identity(ssd):
    model = copy.deepcopy(ssd)
    prune_unstructured(model, 0.0, "global")
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(ssd(x), model(x)):
            assert torch.equal(a, b)


def test_pruning_is_permanent_plain_state_dict(ssd):
    model = copy.deepcopy(ssd)
    prune_unstructured(model, 0.5, "global")
    state = model.state_dict()
    assert list(state) == list(ssd.state_dict())  # no weight_orig / weight_mask left behind
    assert all(not m._forward_pre_hooks for m in model.modules())
    fresh = copy.deepcopy(ssd)
    fresh.load_state_dict(state, strict=True)
    assert sum(int((w == 0).sum()) for w in _weights(fresh).values()) == sum(int((w == 0).sum()) for w in _weights(model).values())


def test_masks_keep_zeros_through_training_then_fold():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    apply_unstructured(net, 0.5, "layer")
    mask = (net[0].weight == 0).clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(2, 3, 6, 6)).square().mean().backward()
        optimizer.step()
    assert make_permanent(net) == 2
    assert bool((net[0].weight[mask] == 0).all())  # pruned weights stayed zero while the rest trained
    assert list(dict(net[0].named_parameters())) == ["weight", "bias"]


@pytest.mark.parametrize("kwargs", [{"amount": 1.5}, {"amount": -0.1}, {"amount": 0.2, "scope": "rows"},
                                    {"amount": 0.2, "scope": "global", "amounts": {"x": 0.1}}])
def test_invalid_arguments(kwargs):
    with pytest.raises(QCompressError):
        apply_unstructured(nn.Sequential(nn.Conv2d(3, 4, 1)), **kwargs)
