"""An accuracy target for int8: which layers to keep float (``qcompress quantize --max-drop``).

Two parts:

- :func:`fewest_float_layers`, the search: a pure function of a sensitivity ranking and an
  ``evaluate(float_layers) -> score`` callable. It only tries *prefixes* of the ranking (the k most
  sensitive layers float, the rest int8), checks the widest split first (every ranked layer float
  but the least sensitive one: if even that misses the target, nothing will), then gallops
  (k = 1, 2, 4, ...) and bisects to the smallest k that meets the target. Assuming that floating
  one more layer of the ranking never lowers the score, that k is the fewest; every split it
  evaluated is returned, so a report shows the whole search.
- The measurement it needs, cheap: :func:`with_float_layers` turns layers of an already converted
  int8 model back to float *exactly* as ``--skip`` would (a float twin between a dequantize and a
  quantize with the layer's own output scale), so neither calibration nor AdaRound is repeated per
  split; :func:`keep_float_gains` ranks layers by how much keeping each one float alone raises the
  SQNR of the raw head outputs against fp32 on a few images (one forward pass per layer).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.ao.nn import quantized as nnq

from qcompress.errors import QCompressError
from qcompress.quant.ptq import FloatIsland
from qcompress.quant.sqnr import output_sqnr


@dataclass(frozen=True)
class SplitTrial:
    """One evaluated split: the ``float_layers`` most sensitive layers float, the rest int8."""

    float_layers: int
    score: float
    meets: bool


@dataclass
class SplitSearch:
    ranked: list[str]  # most sensitive first
    target: float
    trials: list[SplitTrial] = field(default_factory=list)  # in the order they were evaluated
    chosen: int = 0  # how many layers of ``ranked`` stay float

    @property
    def float_layers(self) -> list[str]:
        return self.ranked[: self.chosen]

    @property
    def score(self) -> float:
        return next(t.score for t in self.trials if t.float_layers == self.chosen)


def meets(score: float, target: float) -> bool:
    """NaN never meets a target."""
    return score >= target


def fewest_float_layers(
    ranked: Sequence[str],
    evaluate: Callable[[frozenset[str]], float],
    target: float,
    what: str = "score",
) -> SplitSearch:
    """Smallest ``k`` such that keeping ``ranked[:k]`` float scores ``>= target``.

    ``ranked``: candidate layers, most sensitive first. ``evaluate(float_layers)`` scores the model
    with exactly these layers float (higher is better). Raises :class:`QCompressError` when even
    the widest split, ``ranked[:-1]`` float, misses the target; that split is evaluated first.
    """
    ranked = list(ranked)
    if not ranked:
        raise QCompressError("no quantized layer to keep float", "the model has no int8 conv/linear layers")
    if math.isnan(target):
        raise QCompressError("the accuracy target is NaN", "is the fp32 reference scorable on these images?")
    search = SplitSearch(ranked, target)
    scores: dict[int, float] = {}

    def trial(k: int) -> bool:
        if k not in scores:
            scores[k] = float(evaluate(frozenset(ranked[:k])))
            search.trials.append(SplitTrial(k, scores[k], meets(scores[k], target)))
        return meets(scores[k], target)

    widest = len(ranked) - 1
    if not trial(widest):
        raise QCompressError(
            f"the target {what} >= {target:.4f} cannot be met: even with {widest} of {len(ranked)} layers float "
            f"(all but the least sensitive, {ranked[-1]}) the {what} is {scores[widest]:.4f}",
            "allow a larger --max-drop, or improve the int8 recipe (per-channel, more calibration images, --adaround)",
        )
    if trial(0):
        return search
    low, high = 0, widest  # low misses, high meets
    k = 1
    while k < high:  # gallop: the answer is usually a few layers
        if trial(k):
            high = k
            break
        low, k = k, 2 * k
    while high - low > 1:
        mid = (low + high) // 2
        if trial(mid):
            high = mid
        else:
            low = mid
    search.chosen = high
    return search


def _output_qparams(module: nn.Module) -> tuple[float, int] | None:
    scale, zero_point = getattr(module, "scale", None), getattr(module, "zero_point", None)
    if scale is None or zero_point is None:
        return None
    return float(scale), int(zero_point)


def float_candidates(quantized: nn.Module) -> list[str]:
    """Names of the converted int8 conv/linear layers (fused or not) of ``quantized``: the layers
    ``--max-drop`` may keep float."""
    names = []
    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if name and callable(weight) and _output_qparams(module) is not None:
            try:
                if weight().is_quantized:
                    names.append(name)
            except (RuntimeError, TypeError):  # a quantized module without packed weights
                continue
    return names


def with_float_layers(quantized: nn.Module, float_model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """Copy of the converted int8 model ``quantized`` in which each of ``layers`` runs in float.

    The float twin comes from ``float_model`` (the fused float model the int8 one was converted from,
    e.g. ``PipelineRecord.float_fused``), wrapped as ``--skip`` wraps it: dequantize its input, run it
    in float, quantize its output with the int8 layer's own output scale and zero point, which are
    what the skip island's observer would have calibrated (it sees the same tensors).
    """
    model = copy.copy(quantized)  # shallow: share the untouched modules, replace the named ones
    model._modules = dict(quantized._modules)
    for name in layers:
        target = quantized.get_submodule(name)
        qparams = _output_qparams(target)
        if qparams is None:
            raise QCompressError(f"{name} is not a converted int8 layer", "name a quantized conv/linear layer")
        island = FloatIsland(copy.deepcopy(float_model.get_submodule(name)).eval())
        island.dequant = nnq.DeQuantize()
        island.quant = nnq.Quantize(qparams[0], qparams[1], torch.quint8)
        _replace(model, name, island)
    return model.eval()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set ``model.<name> = new``, shallow-copying every parent on the way so the source is untouched."""
    *path, leaf = name.split(".")
    parent = model
    for part in path:
        child = copy.copy(parent._modules[part])
        child._modules = dict(child._modules)
        parent._modules[part] = child
        parent = child
    parent._modules[leaf] = new


@torch.inference_mode()
def keep_float_gains(
    quantized: nn.Module,
    float_model: nn.Module,
    reference: nn.Module,
    layers: Sequence[str],
    images: torch.Tensor,
    on_layer: Callable[[str, int, int], object] | None = None,
) -> dict[str, float] | None:
    """Per layer: how many dB the worst raw head output's SQNR (against ``reference``, the fp32
    model, on ``images``) gains when that layer alone is kept float. None when the model's outputs
    are not raw tensors (post-processed detections: rank by per-layer SQNR instead)."""
    expected = reference(images)
    base = output_sqnr(expected, quantized(images))
    if not base:
        return None
    gains = {}
    for k, name in enumerate(layers, 1):
        if on_layer is not None:
            on_layer(name, k, len(layers))
        sqnr = output_sqnr(expected, with_float_layers(quantized, float_model, [name])(images))
        gains[name] = min(sqnr) - min(base)
    return gains


def rank_layers(
    layers: Sequence[str],
    gains: Mapping[str, float] | None,
    layer_sqnr: Mapping[str, float],
    tiebreak: Mapping[str, float] | None = None,
) -> list[str]:
    """Most sensitive first: by keep-float gain (largest first) where measured, else by per-layer
    SQNR (lowest first); equal gains by ``tiebreak`` (largest first), then network order."""
    order = {name: i for i, name in enumerate(layers)}
    second = tiebreak or {}
    if gains is not None:
        return sorted(layers, key=lambda n: (-gains.get(n, -math.inf), -second.get(n, -math.inf), order[n]))
    return sorted(layers, key=lambda n: (layer_sqnr.get(n, math.inf), order[n]))
