"""The traced dataflow graph sees functional code between modules, not only modules."""

import torch
from torch import nn

from qcompress.prune.channels import find_channel_groups
from qcompress.quant.equalize import find_equalization_groups
from qcompress.quant.graph import trace_graph


class ScaledBranch(nn.Module):
    """conv1 -> relu -> conv2, while conv1's activation is also multiplied into the output (functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        a = self.relu(self.conv1(x))
        return self.conv2(a) * a


class InPlaceResidual(nn.Module):
    """torchvision's Bottleneck style: ``out += identity`` on a BN output, then one shared ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        identity = self.stem(x)
        out = self.bn(self.conv(identity))
        out += identity
        return self.head(self.relu(out))


def test_functional_consumer_is_recorded_and_blocks_equalization():
    nodes = trace_graph(ScaledBranch().eval(), torch.zeros(1, 3, 8, 8))
    relu_consumers = nodes["relu"].consumers
    assert "conv2" in relu_consumers and any(c.startswith("<fn>") for c in relu_consumers)
    # Scaling conv1's channels by s and conv2's inputs by 1/s would change the product: no pair.
    assert not [g for g in find_equalization_groups(nodes) if "conv1" in str(g)]


def test_in_place_add_is_an_add_node_joining_both_branches():
    model = InPlaceResidual().eval()
    nodes = trace_graph(model, torch.zeros(1, 3, 8, 8))
    adds = [n for n in nodes.values() if n.kind == "add"]
    assert len(adds) == 1 and set(adds[0].inputs) == {"bn", "stem"}
    assert nodes["relu"].inputs == [adds[0].name]
    # stem's output and the branch's output share one residual channel space.
    groups = find_channel_groups(model, torch.zeros(1, 3, 8, 8))
    coupled = [g for g in groups if g.residual]
    assert len(coupled) == 1 and set(coupled[0].producers) == {"stem", "conv"}


def test_shapes_and_constants_are_not_nodes():
    class Viewer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            n = y.shape[0]
            scale = torch.ones(4).view(1, -1, 1, 1)  # built from constants: not a node
            return (y * scale).reshape(n, -1)

    nodes = trace_graph(Viewer().eval(), torch.zeros(2, 3, 4, 4))
    fn_nodes = [n for n in nodes if n.startswith("<fn>")]
    assert len(fn_nodes) == 2 and nodes["conv"].consumers == [fn_nodes[0]]
