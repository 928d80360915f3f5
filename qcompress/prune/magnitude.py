"""Unstructured magnitude pruning: the smallest weights set to exactly zero.

Uses ``torch.nn.utils.prune`` (L1 magnitude, global across layers or per layer), keeps the masks
while fine-tuning so zeros stay zeros, then makes them permanent (:func:`make_permanent`): the saved
checkpoint is an ordinary ``state_dict`` with zeros in it.

What it buys: fewer *non-zero* weights (they compress well on disk with gzip/zip) and headroom for
sparse kernels. What it does not buy: dense CPU/GPU latency. PyTorch's dense convolutions multiply
the zeros like any other number, so the forward pass costs the same; the report says so and
measures it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from qcompress.errors import QCompressError

SCOPES = ("global", "layer")


@dataclass
class SparsityRecord:
    """Per layer: weights, zeros after pruning, sparsity; ``scope`` and ``amount`` as requested."""

    scope: str
    amount: float
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(v["weights"] for v in self.layers.values()))

    @property
    def zeros(self) -> int:
        return int(sum(v["zeros"] for v in self.layers.values()))

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every convolution and linear layer, by name (their ``weight`` is what gets pruned; biases and BN are kept)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _check_amount(amount: float, what: str = "--amount") -> None:
    if not 0.0 <= amount <= 1.0:
        raise QCompressError(f"{what} must be in [0, 1], got {amount}", "e.g. --amount 0.2 zeroes 20% of the weights")


def layer_amount(name: str, default: float, amounts: Mapping[str, float] | None) -> float:
    """The amount for layer ``name``: exact key, else the first matching glob pattern, else ``default``."""
    if amounts:
        if name in amounts:
            return float(amounts[name])
        for pattern, value in amounts.items():
            if fnmatch.fnmatchcase(name, pattern):
                return float(value)
    return default


def apply_unstructured(
    model: nn.Module,
    amount: float,
    scope: str = "global",
    amounts: Mapping[str, float] | None = None,
    layers: Mapping[str, nn.Module] | None = None,
) -> SparsityRecord:
    """Mask the smallest-magnitude weights of ``model`` (in place; masks stay until :func:`make_permanent`).

    ``scope="global"`` ranks all conv/linear weights together (one threshold), ``"layer"`` prunes ``amount``
    of every layer, or the layer's entry in ``amounts`` (exact names or glob patterns).
    """
    if scope not in SCOPES:
        raise QCompressError(f"unknown pruning scope {scope!r}", "use --scope global or --scope layer")
    _check_amount(amount)
    for key, value in (amounts or {}).items():
        _check_amount(float(value), f"amount for {key!r}")
    if amounts and scope == "global":
        raise QCompressError("--amounts-file needs --scope layer for unstructured pruning",
                             "global scope uses one threshold for all layers")
    layers = dict(layers) if layers is not None else prunable_layers(model)
    if scope == "global":
        if layers:
            torch_prune.global_unstructured(
                [(m, "weight") for m in layers.values()], pruning_method=torch_prune.L1Unstructured, amount=amount
            )
    else:
        for name, module in layers.items():
            torch_prune.l1_unstructured(module, "weight", amount=layer_amount(name, amount, amounts))
    return sparsity_record(layers, scope, amount)


def sparsity_record(layers: Mapping[str, nn.Module], scope: str, amount: float) -> SparsityRecord:
    record = SparsityRecord(scope, amount)
    with torch.no_grad():
        for name, module in layers.items():
            weight = module.weight
            zeros = int((weight == 0).sum().item())
            record.layers[name] = {"weights": weight.numel(), "zeros": zeros, "sparsity": zeros / max(1, weight.numel())}
    return record


def make_permanent(model: nn.Module) -> int:
    """Fold every pruning mask into its weight (``weight = weight_orig * mask``) and drop the hooks."""
    count = 0
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                name = hook._tensor_name
                torch_prune.remove(module, name)
                # remove() re-registers the tensor last; put it back first (weight before bias) so the
                # saved state_dict lists keys in the parent's order.
                params = module._parameters
                items = list(params.items())
                params.clear()
                params.update([kv for kv in items if kv[0] == name] + [kv for kv in items if kv[0] != name])
                count += 1
    return count


def prune_unstructured(
    model: nn.Module, amount: float, scope: str = "global", amounts: Mapping[str, float] | None = None
) -> SparsityRecord:
    """:func:`apply_unstructured` and :func:`make_permanent` in one step."""
    record = apply_unstructured(model, amount, scope, amounts)
    make_permanent(model)
    return record


__all__ = [
    "SCOPES",
    "SparsityRecord",
    "apply_unstructured",
    "layer_amount",
    "make_permanent",
    "prunable_layers",
    "prune_unstructured",
    "sparsity_record",
]
