"""Checkpoints on disk: a ``state_dict`` file plus a JSON sidecar.

``model.pth`` holds only tensors (read with ``torch.load(weights_only=True)``, so nothing arbitrary is
ever unpickled). ``model.json`` beside it says how to rebuild the network around those tensors:
architecture, classes, input size, structural changes (pruned widths, quantization recipe) and
provenance. A plain pytorch-ssd / torchvision file without a sidecar loads too, given ``arch``.
"""

from __future__ import annotations

import datetime as _dt
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompress._warnings import quiet_torch_ao
from qcompress.errors import QCompressError
from qcompress.io_utils import atomic_path, read_json, read_labels, sha256_file, versions, write_json_atomic
from qcompress.models.detector import Detector
from qcompress.models.registry import (
    DEFAULT_ARCH,
    build_detector,
    check_builder_options,
    get_arch,
    list_archs,
)

SIDECAR_KIND, SIDECAR_VERSION = "qcompress-checkpoint", 1
SIDECAR_FORMAT = f"{SIDECAR_KIND}/{SIDECAR_VERSION}"


@dataclass(frozen=True)
class Sidecar:
    """The JSON beside a checkpoint, validated on read (schema ``qcompress-checkpoint/<version>``).

    ``data`` keeps every field as written (training history, recipes) for reports; the typed fields
    are what loading relies on.
    """

    arch: str | None
    class_names: tuple[str, ...] | None
    options: dict[str, Any]
    pruned: bool
    quantization: dict[str, Any] | None
    data: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any, where: Path) -> Sidecar:
        hint = "regenerate it with qcompress, or delete it and pass --arch/--labels"
        if not isinstance(data, Mapping):
            raise QCompressError(f"checkpoint sidecar {where} is not a JSON object", hint)
        kind, _, version = str(data.get("format", "")).partition("/")
        if kind != SIDECAR_KIND or not version.isdigit():
            raise QCompressError(f"checkpoint sidecar {where} has unknown format {data.get('format')!r}", hint)
        if int(version) > SIDECAR_VERSION:
            raise QCompressError(
                f"checkpoint sidecar {where} has schema version {version}, newer than this qcompress reads "
                f"({SIDECAR_VERSION})", "upgrade qcompress")
        checks = (("arch", str), ("class_names", list), ("options", dict), ("pruned", bool),
                  ("quantization", dict), ("compression", list))
        for key, kind_ in checks:
            if data.get(key) is not None and not isinstance(data[key], kind_):
                raise QCompressError(
                    f"checkpoint sidecar {where}: {key!r} should be a {kind_.__name__}, "
                    f"got {type(data[key]).__name__}", hint)
        names = data.get("class_names")
        if names is not None and not all(isinstance(n, str) for n in names):
            raise QCompressError(f"checkpoint sidecar {where}: class_names must be strings", hint)
        return cls(data.get("arch"), tuple(names) if names is not None else None, dict(data.get("options") or {}),
                   bool(data.get("pruned")), data.get("quantization") or None, dict(data))


def sidecar_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def _is_weight_entry(key: str, value: Any) -> bool:
    """A tensor, or what quantized Linear layers store: their dtype and a (weight, bias) tuple."""
    if isinstance(value, torch.Tensor):
        return True
    if value is None:  # a quantized conv without bias saves its bias as None
        return key.endswith(".bias")
    if key.endswith("_packed_params.dtype"):
        return isinstance(value, torch.dtype)
    if key.endswith("_packed_params._packed_params"):
        return isinstance(value, tuple) and all(v is None or isinstance(v, torch.Tensor) for v in value)
    return False


_MAGIC = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"))


def _refuse_other_file_kinds(path: Path) -> None:
    """A clear line for the usual wrong files passed as a checkpoint: an image, a sidecar or an ONNX file."""
    with open(path, "rb") as f:
        head = f.read(16)
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if kind is None and head.lstrip()[:1] in (b"{", b"["):
        kind = "a JSON file (a checkpoint's sidecar?)"
    if kind is None and path.suffix.lower() == ".onnx":
        kind = "an ONNX model"
    if kind is not None:
        raise QCompressError(f"{path} is {kind}, not PyTorch weights",
                             "pass the .pth checkpoint (its .json sidecar is read from beside it)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (and the dtypes quantized Linear layers record). Accepts a plain state_dict or one nested under 'state_dict' / 'model'."""
    path = Path(path)
    if not path.is_file():
        raise QCompressError(f"model file not found: {path}", "pass --model-path to an existing .pth file")
    _refuse_other_file_kinds(path)
    try:
        with quiet_torch_ao():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt or non-weights files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            # Never relay torch's advice to load with weights_only=False: that runs arbitrary code.
            reason = "it holds Python objects besides tensors (qcompress never unpickles those)"
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
    # Learned values and BN statistics must be finite; observer buffers start at +-inf by design.
    learned = (".weight", ".bias", ".running_mean", ".running_var")
    bad = next((k for k, v in state_dict.items() if k.endswith(learned) and isinstance(v, torch.Tensor)
                and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise QCompressError(f"model file {path} has NaN or infinite values in {bad}",
                             "the training diverged or the file is damaged: use an earlier checkpoint")
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
            matching = _archs_with_keys(set(state_dict), skip=arch)
            if matching:
                raise QCompressError(
                    f"checkpoint is not a {arch} (its keys are those of {' / '.join(matching)})",
                    f"pass --arch {matching[0]}")
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
    def shape(value: Any) -> tuple[int, ...] | None:  # None: a quantized conv's absent bias
        return tuple(value.shape) if value is not None else None

    wrong = [k for k in expected if k in state_dict and shape(expected[k]) != shape(state_dict[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of other shape (e.g. {k}: {shape(state_dict[k])} vs {shape(expected[k])})")
    matching = _archs_with_keys(set(state_dict), skip=arch)
    if matching:
        hint = f"its keys are those of {' / '.join(matching)}: pass --arch {matching[0]}"
    elif wrong and not missing and not unexpected:
        hint = "same layers, other sizes: pass the --labels file (class count) or --input-size the model was trained with"
    else:
        hint = "no registered architecture has exactly these keys: see `qcompress models` for --arch"
    return QCompressError(f"checkpoint does not match architecture {arch!r}: " + ", ".join(parts), hint)


def _archs_with_keys(keys: set[str], skip: str) -> list[str]:
    """Registered architectures whose state_dict has exactly ``keys`` (built once each, error path only)."""
    found = []
    for info in list_archs():
        if info.name == skip:
            continue
        try:
            model = info.builder(("BACKGROUND", "object"))
        except Exception:  # noqa: BLE001, S112 - a builder that needs options cannot be the match we name
            continue
        if set(model.model.state_dict()) == keys:
            found.append(info.name)
    return found


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
    sidecar = None
    if sidecar_file.is_file():
        sidecar = Sidecar.from_json(read_json(sidecar_file, "checkpoint sidecar"), sidecar_file).data
    if sidecar and arch and sidecar.get("arch") and sidecar["arch"] != arch:
        raise QCompressError(
            f"--arch {arch} contradicts the checkpoint sidecar ({sidecar['arch']})", "omit --arch for qcompress checkpoints"
        )
    arch = arch or (sidecar or {}).get("arch") or DEFAULT_ARCH
    get_arch(arch)
    names = _class_names(arch, state_dict, labels, sidecar)
    check_builder_options(arch, options or {})
    recorded = dict((sidecar or {}).get("options", {}))
    for key, value in (options or {}).items():
        if key in recorded and recorded[key] != value:
            raise QCompressError(
                f"{key}={value} contradicts the checkpoint sidecar ({key}={recorded[key]})",
                "omit the option for qcompress checkpoints",
            )
    options = {**recorded, **(options or {})}
    detector = build_detector(arch, names, **options)
    if sidecar and sidecar.get("storage") == "float16":  # a float model stored in half precision
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
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
    storage: str = "float32",
) -> Path:
    """Write ``path`` (weights) and its sidecar atomically; refuse to overwrite the parent checkpoint.

    ``storage="float16"`` stores the floating-point tensors of a float model in half precision (half the
    file; the sidecar says so and :func:`load_detector` casts them back to float32)."""
    path = Path(path)
    if storage not in ("float32", "float16"):
        raise QCompressError(f"unknown checkpoint storage {storage!r}", "use float32 or float16")
    if storage == "float16" and quantization:
        raise QCompressError("float16 storage is for float models", "store a quantized model as it is")
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
    state = detector.model.state_dict()
    if storage == "float16":
        sidecar["storage"] = "float16"
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_json_atomic(sidecar_path(path), sidecar)
    return path


__all__ = ["Sidecar", "load_detector", "read_state_dict", "save_detector", "sidecar_path", "versions"]
