"""The dataflow graph between leaf modules, found by running the model once.

Equalization, bias absorption, analytic bias correction and data-free ranges all need to know which
layer feeds which ("conv1 -> ReLU -> conv2", "block input + branch -> add"). We read that from an
actual forward pass (tensor identity from producer to consumer) rather than from name lists, so any
architecture built from modules and ``FloatFunctional`` ops is covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

INPUT = "<input>"


@dataclass
class Node:
    name: str
    module: nn.Module | None
    kind: str  # conv | bn | relu | relu6 | add | cat | identity | other
    inputs: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.BatchNorm2d):
        return "bn"
    if isinstance(module, nn.ReLU6):
        return "relu6"
    if isinstance(module, nn.ReLU):
        return "relu"
    return "other"


def _is_leaf(module: nn.Module) -> bool:
    return not list(module.children())


@torch.no_grad()
def trace_graph(model: nn.Module, example: torch.Tensor) -> dict[str, Node]:
    """Nodes in execution order for every leaf module (and FloatFunctional add/cat) that ran."""
    producer: dict[int, str] = {id(example): INPUT}
    keep_alive: list[torch.Tensor] = [example]
    nodes: dict[str, Node] = {INPUT: Node(INPUT, None, "input")}

    def record(name: str, module: nn.Module | None, kind: str, inputs: list[torch.Tensor], output: torch.Tensor) -> None:
        sources = [producer.get(id(t), INPUT) for t in inputs if isinstance(t, torch.Tensor)]
        node = nodes.setdefault(name, Node(name, module, kind))
        for src in sources:
            if src not in node.inputs:
                node.inputs.append(src)
        producer[id(output)] = name
        keep_alive.append(output)

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, FloatFunctional):
            continue
        if _is_leaf(module) and not name.endswith("activation_post_process"):
            hooks.append(
                module.register_forward_hook(
                    lambda mod, inp, out, name=name: record(name, mod, _kind(mod), list(inp), out)
                    if isinstance(out, torch.Tensor)
                    else None
                )
            )
    patched: list[tuple[FloatFunctional, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, FloatFunctional):
            for op in ("add", "cat"):
                original = getattr(module, op)

                def wrapper(*args, _orig=original, _name=name, _op=op, **kwargs):
                    out = _orig(*args, **kwargs)
                    tensors = list(args[0]) if _op == "cat" else list(args[:2])
                    record(_name, None, _op, tensors, out)
                    return out

                setattr(module, op, wrapper)
                patched.append((module, op))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
        for module, op in patched:
            delattr(module, op)  # the instance attribute shadowed the class method
    for node in nodes.values():
        for src in node.inputs:
            if node.name not in nodes[src].consumers:
                nodes[src].consumers.append(node.name)
    return nodes


def follow_activation(nodes: dict[str, Node], name: str) -> tuple[str, list[str]]:
    """From a conv, skip a single-consumer BN and activation; returns (last node, activation kinds passed)."""
    current, passed = name, []
    while len(nodes[current].consumers) == 1 and nodes[nodes[current].consumers[0]].kind in ("bn", "relu", "relu6"):
        current = nodes[current].consumers[0]
        passed.append(nodes[current].kind)
    return current, passed
