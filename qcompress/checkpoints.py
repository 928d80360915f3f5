"""Checkpoints on disk: a ``state_dict`` file plus a JSON sidecar.

``model.pth`` holds only tensors (read with ``torch.load(weights_only=True)``, so nothing arbitrary is
ever unpickled). ``model.json`` beside it says how to rebuild the network around those tensors:
architecture, classes, input size, structural changes (pruned widths, quantization recipe) and
provenance. A plain pytorch-ssd / torchvision file without a sidecar loads too, given ``arch``.
"""

from __future__ import annotations

import datetime as _dt
import platform
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompress._warnings import quiet_torch_ao
from qcompress.errors import QCompressError
from qcompress.io_utils import atomic_path, read_json, read_labels, sha256_file, write_json_atomic
from qcompress.models.detector import Detector
from qcompress.models.registry import build_detector, get_arch, list_archs

SIDECAR_FORMAT = "qcompress-checkpoint/1"
DEFAULT_ARCH = "mb2-ssd-lite"


def sidecar_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def versions() -> dict[str, str]:
    import numpy
    import torchvision

    from qcompress import __version__

    return {
        "qcompress": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "machine": f"{platform.system()} {platform.machine()}",
    }


def _is_weight_entry(key: str, value: Any) -> bool:
    """A tensor, or what quantized Linear layers store: their dtype and a (weight, bias) tuple."""
    if isinstance(value, torch.Tensor):
        return True
    if key.endswith("_packed_params.dtype"):
        return isinstance(value, torch.dtype)
    if key.endswith("_packed_params._packed_params"):
        return isinstance(value, tuple) and all(v is None or isinstance(v, torch.Tensor) for v in value)
    return False


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (and the dtypes quantized Linear layers record). Accepts a plain state_dict or one nested under 'state_dict' / 'model'."""
    path = Path(path)
    if not path.is_file():
        raise QCompressError(f"model file not found: {path}", "pass --model-path to an existing .pth file")
    try:
        with quiet_torch_ao():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or non-weights files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QCompressError(
            f"cannot read model file {path}: {reason[:200]}",
            "the file is corrupt or not a tensor-only PyTorch checkpoint; re-save it with torch.save(model.state_dict())",
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(_is_weight_entry(k, v) for k, v in obj.items()):
        raise QCompressError(
            f"model file {path} does not hold a state_dict of tensors",
            "save weights with torch.save(model.state_dict(), path)",
        )
    state_dict = OrderedDict(obj)
    metadata = getattr(obj, "_metadata", None)  # per-module versions: quantized Linear needs them
    if isinstance(metadata, Mapping):
        state_dict._metadata = metadata  # type: ignore[attr-defined]
    return state_dict


def _class_names(
    arch: str, state_dict: Mapping[str, torch.Tensor], labels: Path | None, sidecar: Mapping[str, Any] | None
) -> tuple[str, ...]:
    if labels is not None:
        names = read_labels(labels)
    elif sidecar and sidecar.get("class_names"):
        names = tuple(sidecar["class_names"])
    else:
        count = get_arch(arch).infer_num_classes(state_dict)
        if count is None:
            raise QCompressError("cannot tell the class list of this checkpoint", "pass --labels FILE")
        names = ("BACKGROUND",) + tuple(f"class{i}" for i in range(1, count))
    expected = get_arch(arch).infer_num_classes(state_dict)
    if expected is not None and expected != len(names):
        raise QCompressError(
            f"checkpoint has {expected} classes (background included) but the labels give {len(names)}",
            "pass the labels file the model was trained with",
        )
    return names


def _mismatch_error(arch: str, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> QCompressError:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of other shape (e.g. {k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)})")
    guesses = [a.name for a in list_archs() if a.name != arch]
    return QCompressError(
        f"checkpoint does not match architecture {arch!r}: " + ", ".join(parts),
        f"pick the right --arch (one of: {', '.join(guesses)}) or the matching --labels/--num-classes",
    )


def apply_structure(detector: Detector, sidecar: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> Detector:
    """Rebuild structural changes recorded in the sidecar (pruned widths, quantization)."""
    if sidecar.get("pruned"):
        from qcompress.prune.reshape import resize_to_state_dict

        resize_to_state_dict(detector.model, state_dict)
    recipe = sidecar.get("quantization")
    if recipe:
        from qcompress.quant.io import rebuild_quantized

        detector = rebuild_quantized(detector, recipe)
    return detector


def load_detector(
    path: Path,
    arch: str | None = None,
    labels: Path | None = None,
    options: Mapping[str, Any] | None = None,
) -> Detector:
    """Load ``path`` (and its sidecar, if any) into a ready :class:`Detector` in eval mode.

    ``options`` are builder options (e.g. ``{"input_size": 640}``) for files without a sidecar;
    they must agree with a sidecar when there is one.
    """
    path = Path(path)
    if arch is not None:
        get_arch(arch)
    state_dict = read_state_dict(path)
    sidecar_file = sidecar_path(path)
    sidecar = read_json(sidecar_file, "checkpoint sidecar") if sidecar_file.is_file() else None
    if sidecar is not None and not isinstance(sidecar, Mapping):
        raise QCompressError(f"checkpoint sidecar {sidecar_file} is not a JSON object", "delete or regenerate it")
    if sidecar and arch and sidecar.get("arch") and sidecar["arch"] != arch:
        raise QCompressError(
            f"--arch {arch} contradicts the checkpoint sidecar ({sidecar['arch']})", "omit --arch for qcompress checkpoints"
        )
    arch = arch or (sidecar or {}).get("arch") or DEFAULT_ARCH
    get_arch(arch)
    names = _class_names(arch, state_dict, labels, sidecar)
    recorded = dict((sidecar or {}).get("options", {}))
    for key, value in (options or {}).items():
        if key in recorded and recorded[key] != value:
            raise QCompressError(
                f"{key}={value} contradicts the checkpoint sidecar ({key}={recorded[key]})",
                "omit the option for qcompress checkpoints",
            )
    options = {**recorded, **(options or {})}
    detector = build_detector(arch, names, **options)
    if sidecar:
        detector = apply_structure(detector, sidecar, state_dict)
    try:
        detector.model.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        raise _mismatch_error(arch, detector.model, state_dict) from None
    detector.model.eval()
    detector.source = {"path": str(path), "sha256": sha256_file(path), "sidecar": sidecar}
    return detector


def save_detector(
    detector: Detector,
    path: Path,
    *,
    parent: Path | None = None,
    command: Sequence[str] | None = None,
    compression: Sequence[Mapping[str, Any]] = (),
    quantization: Mapping[str, Any] | None = None,
    pruned: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``path`` (weights) and its sidecar atomically; refuse to overwrite the parent checkpoint."""
    path = Path(path)
    if parent is not None and path.resolve() == Path(parent).resolve():
        raise QCompressError(f"refusing to overwrite the input checkpoint {path}", "choose another --out")
    parent_sidecar = getattr(detector, "source", {}).get("sidecar") or {}
    sidecar = {
        "format": SIDECAR_FORMAT,
        "arch": detector.spec.arch,
        "class_names": list(detector.spec.class_names),
        "input_size": list(detector.spec.input_size),
        "mean": list(detector.spec.mean),
        "std": detector.spec.std,
        "options": dict(detector.spec.options),
        "pruned": bool(pruned or parent_sidecar.get("pruned")),
        "quantization": dict(quantization) if quantization else None,
        "compression": list(parent_sidecar.get("compression", [])) + [dict(c) for c in compression],
        "parent_sha256": sha256_file(parent) if parent is not None and Path(parent).is_file() else None,
        "command": list(command) if command is not None else list(sys.argv),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        sidecar.update(extra)
    with atomic_path(path) as tmp:
        torch.save(detector.model.state_dict(), tmp)
    write_json_atomic(sidecar_path(path), sidecar)
    return path


__all__ = ["load_detector", "read_state_dict", "save_detector", "sidecar_path", "versions"]
