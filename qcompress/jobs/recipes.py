"""What each data-free step buys: the same detector quantized by a ladder of recipes, each evaluated.

Rows (Nagel et al. 2019, table 4 style): naive per-tensor int8, + cross-layer equalization,
+ high-bias absorption, + bias correction (analytic), the fully data-free pipeline (BN ranges),
per-channel weights, and a calibrated per-channel model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qcompress.models.detector import Detector
from qcompress.quant.equalize import relu6_to_relu
from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

RECIPES: list[tuple[str, dict[str, Any]]] = [
    ("naive per-tensor (minmax)", {"per_channel": False, "observer": "minmax"}),
    ("+ CLE", {"per_channel": False, "observer": "minmax", "equalize": True}),
    ("+ CLE + bias absorption", {"per_channel": False, "observer": "minmax", "equalize": True, "absorb_bias": True}),
    ("+ CLE + BA + bias correction (analytic)", {"per_channel": False, "observer": "minmax", "equalize": True,
                                                  "absorb_bias": True, "bias_correction": "analytic"}),
    ("data-free: CLE + BA + BC, ranges from BN", {"per_channel": False, "observer": "minmax", "equalize": True,
                                                  "absorb_bias": True, "bias_correction": "analytic", "data_free": True}),
    ("per-channel (minmax)", {"per_channel": True, "observer": "minmax"}),
    ("per-channel (histogram, calibrated)", {"per_channel": True, "observer": "histogram"}),
]


@dataclass
class RecipeRow:
    name: str
    options: dict[str, Any]
    score: float  # mAP (or fidelity AP) of the quantized model
    relative: float  # score / fp32 score


def run_recipes(
    detector: Detector,
    calib_batches: Sequence[torch.Tensor],
    score_fn: Callable[[Detector], float],
    backend: str = "x86",
    recipes: Sequence[tuple[str, dict[str, Any]]] = tuple(RECIPES),
    on_recipe: Callable[[str], None] | None = None,
) -> tuple[float, list[RecipeRow]]:
    """fp32 score and one row per recipe (``score_fn`` evaluates a detector on fixed images).

    The first row is the float model with ReLU6 replaced by ReLU: equalization needs that change, so
    it separates what the function change costs from what quantization costs.
    """
    total = len(recipes) + 2
    if on_recipe:
        on_recipe(f"fp32 (1/{total})")
    fp32 = score_fn(detector)
    relu_model = copy.deepcopy(detector.model)
    rows = []
    if relu6_to_relu(relu_model):
        if on_recipe:
            on_recipe(f"fp32 with ReLU6 -> ReLU (2/{total})")
        score = score_fn(detector.with_model(relu_model))
        rows.append(RecipeRow("fp32 with ReLU6 -> ReLU (no quantization)", {"relu6": "relu"}, score,
                              score / fp32 if fp32 else float("nan")))
    for k, (name, options) in enumerate(recipes, start=3):
        if on_recipe:
            on_recipe(f"{name} ({k}/{total})")
        qdet, _ = quantize_detector(detector, calib_batches, QuantizeOptions(backend=backend, **options))
        score = score_fn(qdet)
        rows.append(RecipeRow(name, options, score, score / fp32 if fp32 else float("nan")))
    return fp32, rows
