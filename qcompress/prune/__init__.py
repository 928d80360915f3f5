"""Pruning: unstructured magnitude (:mod:`.magnitude`), structured dependency-aware channels (:mod:`.channels`),
rebuilding pruned checkpoints (:mod:`.reshape`), per-layer sensitivity (:mod:`.sensitivity`) and the
``qcompress prune`` job (:mod:`.job`).

Submodules are imported lazily so that loading a checkpoint (which needs only :mod:`.reshape`) stays cheap.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "prune_unstructured": "magnitude",
    "apply_unstructured": "magnitude",
    "make_permanent": "magnitude",
    "prune_channels": "channels",
    "find_channel_groups": "channels",
    "resize_to_state_dict": "reshape",
    "sensitivity_scan": "sensitivity",
    "PruneJobConfig": "job",
    "PruneResult": "job",
    "prune": "job",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"qcompress.prune.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qcompress.prune' has no attribute {name!r}")


__all__ = [
    "PruneJobConfig",
    "PruneResult",
    "apply_unstructured",
    "find_channel_groups",
    "make_permanent",
    "prune",
    "prune_channels",
    "prune_unstructured",
    "resize_to_state_dict",
    "sensitivity_scan",
]
