"""Architecture registry: one name -> one builder and what compression needs to know about it.

Builders register themselves with :func:`register_arch`, declaring a :class:`CompressionSpec`
beside the builder: which parts run int8, the low-bit scopes, how the network trains. Nothing
outside ``qcompress/models/`` names an architecture; the jobs and algorithms read these
declarations. :func:`get_arch` and :func:`list_archs` import the builder modules on first use,
so importing qcompress stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qcompress.errors import QCompressError
from qcompress.models.detector import Detector, ModelSpec

Builder = Callable[..., Detector]

# What a checkpoint without a sidecar is taken for, and what `qcompress train` builds by default.
DEFAULT_ARCH = "mb2-ssd-lite"

_BUILDER_MODULES = (
    "qcompress.models.ssd_lite_arch",
    "qcompress.models.torchvision_det",
    "qcompress.models.ultralight",
    "qcompress.models.resnet18_fpn",
    "qcompress.models.centernet",
    "qcompress.models.fasterrcnn_vgg16",
)


@dataclass(frozen=True)
class CompressionSpec:
    """What compression needs to know about an architecture (module names are globs).

    - ``int8_parts``: the parts eager-mode int8 runs (the rest stays float: decoding, anchors, NMS and
      whatever eager mode cannot take); None when the whole network quantizes (it has its own stubs).
    - ``lowbit_scopes``: ``--scope NAME`` of low-bit QAT -> the convs it selects; ``all`` is implied.
    - ``keep_float``: convs that stay float inside a scope when first conv and heads are kept float
      (the image is 8-bit data already; the heads decide the boxes).
    - ``training``: ``"priors"`` (MultiBox loss against :attr:`priors`) or ``"native"`` (the model
      computes its own losses in train mode, torchvision style).
    - ``priors``: ``spec -> (num_priors, 4)`` centre-form priors in [0, 1], for ``"priors"`` training.
    - ``output_names``: what the network's raw outputs are, in order (reports name SQNR rows by them).
    - ``heads``: the detection-head convs (quantized too by fully quantized low-bit QAT, ``--heads``).
    - ``feature_taps``: one classification-head module per feature level, in prior order; a teacher's
      features are imitated at their inputs (see :mod:`qcompress.training.distill`).
    - ``native_taps``: for ``"native"`` training, ``(input transform, feature levels, anchor generator)``
      module names: a teacher's feature levels are imitated near objects, the mask from those anchors
      (transform ``""``: the network takes the batch and its targets as they are; anchor generator ``""``: an
      anchor-free detector, whose features module's *input* is imitated at the locations inside the boxes).
    """

    int8_parts: tuple[str, ...] | None = None
    lowbit_scopes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    keep_float: tuple[str, ...] = ()
    training: str = "native"
    priors: Callable[[ModelSpec], torch.Tensor] | None = None
    output_names: tuple[str, ...] = ()  # the network's raw outputs, for reports and ONNX
    heads: tuple[str, ...] = ()
    feature_taps: tuple[str, ...] = ()
    native_taps: tuple[str, ...] = ()

    def scope_patterns(self, scope: str) -> tuple[str, ...]:
        """The conv-name globs of ``--scope scope`` (declared scopes combine with commas, e.g.
        ``encoder,decoder``); a clear error lists the declared scopes."""
        if scope == "all":
            return ("*",)
        parts = [p.strip() for p in scope.split(",")]
        unknown = [p for p in parts if p not in self.lowbit_scopes]
        if unknown or not parts:
            raise QCompressError(
                f"unknown scope {unknown[0] if unknown else scope!r} for this architecture",
                f"use one of: {', '.join(self.scope_names)} (declared scopes combine with commas)",
            )
        return tuple(dict.fromkeys(g for p in parts for g in self.lowbit_scopes[p]))

    @property
    def scope_names(self) -> tuple[str, ...]:
        return (*self.lowbit_scopes, "all")


@dataclass(frozen=True)
class ArchInfo:
    name: str
    builder: Builder
    description: str
    # state_dict -> number of classes (background included), or None if it cannot tell.
    infer_num_classes: Callable[[Mapping[str, torch.Tensor]], int | None]
    compression: CompressionSpec = CompressionSpec()


_REGISTRY: dict[str, ArchInfo] = {}


def register_arch(
    name: str,
    description: str,
    infer_num_classes: Callable[[Mapping[str, torch.Tensor]], int | None] = lambda sd: None,
    compression: CompressionSpec = CompressionSpec(),
) -> Callable[[Builder], Builder]:
    """Register ``builder(class_names, **options) -> Detector`` under ``name``, with its declarations."""

    def wrapper(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = ArchInfo(name, builder, description, infer_num_classes, compression)
        return builder

    return wrapper


def _load_builders() -> None:
    for module in _BUILDER_MODULES:
        importlib.import_module(module)


def list_archs() -> list[ArchInfo]:
    _load_builders()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_arch(name: str) -> ArchInfo:
    _load_builders()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QCompressError(
            f"unknown architecture {name!r}", f"choose one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


def check_builder_options(arch: str, options: Mapping[str, Any]) -> None:
    """Refuse builder options that ``arch`` does not take (``--arch-options``, ``--input-size``), naming those
    it does."""
    import inspect

    accepted = [p for p in inspect.signature(get_arch(arch).builder).parameters if p != "class_names"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise QCompressError(f"{arch} has no option {', '.join(unknown)}",
                             f"its options: {', '.join(accepted) or 'none'} (see qcompress models)")


def build_detector(arch: str, class_names: Sequence[str], **options: Any) -> Detector:
    """A freshly initialised detector of architecture ``arch`` for ``class_names`` (background first)."""
    return get_arch(arch).builder(tuple(class_names), **options)


def classes_from_head(state_dict: Mapping[str, torch.Tensor], key: str, boxes_per_location: int) -> int | None:
    """Number of classes (background included) from a class-head tensor whose rows are
    ``boxes_per_location * num_classes``; None without that tensor; a named error on a wrong shape."""
    weight = state_dict.get(key)
    if weight is None:
        return None
    rows = int(weight.shape[0]) if weight.ndim else 0
    if rows < 2 * boxes_per_location or rows % boxes_per_location:
        raise QCompressError(
            f"class-head tensor {key} has shape {tuple(weight.shape)}; expected {boxes_per_location} x num_classes "
            f"rows (num_classes >= 2, background included)",
            "the file is damaged or from another architecture: pass the original checkpoint or the right --arch",
        )
    return rows // boxes_per_location


def compression_spec(arch: str) -> CompressionSpec:
    """What architecture ``arch`` declares for compression (see :class:`CompressionSpec`)."""
    return get_arch(arch).compression
