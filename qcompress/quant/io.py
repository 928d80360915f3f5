"""Rebuilding a quantized network from its sidecar recipe, so an int8 checkpoint reloads from
(weights, sidecar) alone.

The recipe names the structure (fusion, float islands, weight granularity, backend); scales, zero
points and int8 weights come from the state_dict, which overwrites whatever the placeholder
observers computed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from qcompress.models.detector import Detector
from qcompress.quant.equalize import relu6_to_relu
from qcompress.quant.parts import prepare_int8_parts
from qcompress.quant.ptq import calibrate, convert_static, prepare_static
from qcompress.quant.qconfig import QuantScheme


def scheme_from_recipe(recipe: Mapping[str, Any]) -> QuantScheme:
    return QuantScheme(backend=recipe.get("backend", "x86"), observer="minmax", per_channel=bool(recipe.get("per_channel", True)))


def rebuild_quantized(detector: Detector, recipe: Mapping[str, Any]) -> Detector:
    """An int8 network with the recipe's structure and placeholder parameters, ready for load_state_dict.

    QAT int8 models convert to the PTQ structure and rebuild the same way; low-bit fake-quant
    (research) models are float networks with quantizers around the recipe's convs.
    """
    if recipe.get("scheme") == "lowbit-fake-quant":
        from qcompress.quant.lowbit import rebuild_lowbit

        return detector.with_model(rebuild_lowbit(detector.model, recipe))
    scheme = scheme_from_recipe(recipe)
    model = copy.deepcopy(detector.model).eval()
    parts = prepare_int8_parts(model, detector.spec.arch) if recipe.get("int8_parts") else None
    if recipe.get("relu6") == "relu":  # equalized models were quantized with ReLU in place of ReLU6
        relu6_to_relu(model)
    prepared, _, _ = prepare_static(model, scheme, tuple(recipe.get("kept_float", ())), scopes=parts)
    h, w = detector.spec.input_size
    calibrate(prepared, [torch.zeros(1, 3, h, w)])  # gives every observer a finite range to convert with
    return detector.with_model(convert_static(prepared, scheme))
