"""LQ-Net quantizer: levels from the basis, nearest-level encoding, the QEM basis update, STE gradient."""

from __future__ import annotations

import torch

from qcompress.quant.lowbit import LowBitConfig, LQNetQuantizer, make_quantizers


def _ready(q: LQNetQuantizer, basis) -> LQNetQuantizer:
    q.initialized.fill_(True)
    q.basis.copy_(torch.tensor(basis))
    return q


def test_signed_two_bit_levels_and_nearest_encoding():
    q = _ready(LQNetQuantizer(2, signed=True), [1.0, 2.0]).eval()  # levels -3, -1, 1, 3
    x = torch.tensor([0.1, -0.2, 2.5, 1.9, -4.0, 10.0])
    assert torch.equal(q(x), torch.tensor([1.0, -1.0, 3.0, 1.0, -3.0, 3.0]))


def test_unsigned_activations_and_ternary_weights():
    act = _ready(LQNetQuantizer(2, signed=False), [0.5, 1.0]).eval()  # levels 0, 0.5, 1, 1.5
    assert torch.equal(act(torch.tensor([0.2, 0.3, 1.2, 7.0])), torch.tensor([0.0, 0.5, 1.0, 1.5]))
    tern = _ready(LQNetQuantizer(2, ternary=True), [0.4]).eval()  # levels -0.4, 0, 0.4
    assert torch.equal(tern(torch.tensor([-0.3, -0.1, 0.19, 0.21])), torch.tensor([-0.4, 0.0, 0.0, 0.4]))
    assert tern.bits == 2


def test_qem_moves_the_basis_to_the_least_squares_solution():
    torch.manual_seed(0)
    truth = torch.tensor([0.3, 0.7])
    codes = torch.randint(0, 2, (4000, 2)).float() * 2 - 1
    x = codes @ truth + 0.01 * torch.randn(4000)  # data on the levels of the true basis
    q = _ready(LQNetQuantizer(2, signed=True), [0.25, 0.75]).train()  # close enough to encode right
    for _ in range(60):
        q(x)
    assert torch.allclose(q.basis, truth, atol=2e-3)  # 0.9^60 of the start is left: < 1e-3


def test_gradient_passes_straight_through():
    q = _ready(LQNetQuantizer(2, signed=True), [1.0, 2.0]).eval()
    x = torch.tensor([0.1, 5.0, -2.2], requires_grad=True)
    (q(x) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_method_wiring():
    conv = torch.nn.Conv2d(4, 4, 3)
    w, a = make_quantizers("lqnet-ternary", 2, 2, conv)
    assert w.ternary and not a.ternary and a.bits == 2
    assert LowBitConfig("lqnet-ternary", 4, 2).validate().bits_w == 2
