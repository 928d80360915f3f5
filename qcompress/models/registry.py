"""Architecture registry: one name -> one builder.

Builders register themselves with :func:`register_arch`; :func:`get_arch` and
:func:`list_archs` import the builder modules on first use, so importing qcompress stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qcompress.errors import QCompressError
from qcompress.models.detector import Detector

Builder = Callable[..., Detector]

_BUILDER_MODULES = (
    "qcompress.models.ssd_lite_arch",
    "qcompress.models.torchvision_det",
    "qcompress.models.ultralight",
)


@dataclass(frozen=True)
class ArchInfo:
    name: str
    builder: Builder
    description: str
    # state_dict -> number of classes (background included), or None if it cannot tell.
    infer_num_classes: Callable[[Mapping[str, torch.Tensor]], int | None]


_REGISTRY: dict[str, ArchInfo] = {}


def register_arch(
    name: str,
    description: str,
    infer_num_classes: Callable[[Mapping[str, torch.Tensor]], int | None] = lambda sd: None,
) -> Callable[[Builder], Builder]:
    """Register ``builder(class_names, **options) -> Detector`` under ``name``."""

    def wrapper(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = ArchInfo(name, builder, description, infer_num_classes)
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


def build_detector(arch: str, class_names: Sequence[str], **options: Any) -> Detector:
    """A freshly initialised detector of architecture ``arch`` for ``class_names`` (background first)."""
    return get_arch(arch).builder(tuple(class_names), **options)


def load_detector(*args: Any, **kwargs: Any) -> Detector:
    """See :func:`qcompress.checkpoints.load_detector` (kept here for discoverability)."""
    from qcompress.checkpoints import load_detector as _load

    return _load(*args, **kwargs)
