"""The dataflow graph between leaf modules, found by running the model once.

Equalization, bias absorption, analytic bias correction and data-free ranges all need to know which
layer feeds which ("conv1 -> ReLU -> conv2", "block input + branch -> add"). We read that from an
actual forward pass (tensor identity from producer to consumer) rather than from name lists, so any
architecture built from modules and ``FloatFunctional`` ops is covered.

Functional code between modules (``x * scale``, ``out += identity``, ``F.interpolate``, ``view``) is
recorded too, through a ``TorchFunctionMode``: each such call on a recorded tensor becomes a node
named ``<fn>name#k`` (kind ``add`` for a two-tensor add of equal shapes, ``cat`` for ``torch.cat``,
``other`` otherwise, ``module`` None). So a tensor read by code outside modules is never mistaken for
one with a single module consumer: equalization and channel pruning leave such tensors alone.
``FloatFunctional.add_relu`` is its own kind, ``add_relu``: its output is ``relu(a + b)``, not a sum,
for anything that reasons about values (analytic bias correction).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

INPUT = "<input>"


@dataclass
class Node:
    name: str
    module: nn.Module | None
    kind: str  # conv | bn | relu | relu6 | add | add_relu | cat | identity | other
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


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__, torch.Tensor.__radd__}
_CATS = {torch.cat, torch.concat}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _FunctionalRecorder(TorchFunctionMode):
    """Calls ``on_call(func, inputs, outputs)`` for torch functions run outside recorded modules."""

    def __init__(self, on_call) -> None:
        super().__init__()
        self.on_call = on_call
        self.depth = 0  # > 0 inside a hooked leaf module or a FloatFunctional op

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            outputs = _tensors(out)
            if outputs:
                self.on_call(func, _tensors((args, kwargs)), outputs)
        return out


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

    counter = [0]

    def record_functional(func, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        known = [t for t in inputs if id(t) in producer]
        if not known:
            return  # constants, anchors, shapes: nothing the network's layers produced
        if func in _ADDS and len(known) == 2 and known[0].shape == known[1].shape:
            kind = "add"
        else:
            kind = "cat" if func in _CATS else "other"
        counter[0] += 1
        name = f"<fn>{getattr(func, '__name__', 'op')}#{counter[0]}"
        for out in outputs:
            record(name, None, kind, known, out)

    recorder = _FunctionalRecorder(record_functional)

    def enter(mod, inp) -> None:
        recorder.depth += 1

    def leave(mod, inp, out, name: str) -> None:
        recorder.depth -= 1
        if isinstance(out, torch.Tensor):
            record(name, mod, _kind(mod), list(inp), out)

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, FloatFunctional):
            continue
        if _is_leaf(module) and not name.endswith("activation_post_process"):
            hooks.append(module.register_forward_pre_hook(enter))
            hooks.append(module.register_forward_hook(lambda mod, inp, out, name=name: leave(mod, inp, out, name), always_call=True))
    patched: list[tuple[FloatFunctional, str]] = []
    for name, module in model.named_modules():
        if isinstance(module, FloatFunctional):
            for op in ("add", "cat", "add_relu", "mul"):
                original = getattr(module, op)

                def wrapper(*args, _orig=original, _name=name, _op=op, **kwargs):
                    recorder.depth += 1
                    try:
                        out = _orig(*args, **kwargs)
                    finally:
                        recorder.depth -= 1
                    tensors = list(args[0]) if _op == "cat" else [a for a in args[:2] if isinstance(a, torch.Tensor)]
                    record(_name, None, {"mul": "other"}.get(_op, _op), tensors, out)
                    return out

                setattr(module, op, wrapper)
                patched.append((module, op))
    was_training = model.training
    model.eval()
    try:
        with recorder:
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
