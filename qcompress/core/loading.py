"""What every job loads: the model, the dataset, calibration batches and the output path.

The overwrite rules live here (:func:`load_float_parent`), so every command refuses the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qcompress.core.checkpoints import load_detector
from qcompress.data.dataset import DetectionDataset
from qcompress.defaults import EMBEDDED_PREFIX, default_model_path, embedded_model_path
from qcompress.errors import QCompressError
from qcompress.io_utils import check_writable
from qcompress.models.detector import Detector

Progress = Callable[[str, int | None], Callable[[int], None]]  # (description, total) -> advance(n)


def no_progress(description: str, total: int | None) -> Callable[[int], None]:
    return lambda n=1: None


def default_data_dir() -> Path:
    """The generated default dataset (generated on first use into the user cache)."""
    from qcompress.data.synthetic import ensure_default_dataset

    return ensure_default_dataset()


@dataclass(frozen=True)
class ModelConfig:
    model_path: Path | None = None  # None: the embedded default checkpoint
    arch: str | None = None  # None: from the sidecar, else mb2-ssd-lite
    labels: Path | None = None  # class names, one per line (BACKGROUND first or implied)
    input_size: int | None = None  # builder input size for files without a sidecar (e.g. 640)
    # Where the network runs: None = torch for .pth, onnxruntime for .onnx; "openvino" for .onnx too.
    runtime: str | None = None
    threads: int | None = None  # runtime threads for ONNX models (torch's are set by the job)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "voc"  # voc | coco
    data: Path | None = None  # VOC: VOCdevkit or year folder; COCO: image folder. None: generated default
    split: str = "test"  # VOC image set
    ann: Path | None = None  # COCO instances json
    limit: int | None = None  # first N images
    # Annotations = the fp32 parent's detections with score >= this (see qcompress.data.pseudo);
    # the first ``limit`` images evaluate, the rest train.
    pseudo_labels: float | None = None


def resolve_model_path(config: ModelConfig) -> Path:
    """``--model-path``: a file, ``embedded:NAME`` (a checkpoint shipped in the package), or None (the
    embedded default)."""
    if config.model_path is None:
        return default_model_path()
    text = str(config.model_path)
    if text.startswith(EMBEDDED_PREFIX):
        return embedded_model_path(text[len(EMBEDDED_PREFIX):])
    return Path(config.model_path)


def load_model(config: ModelConfig) -> Detector:
    """The detector ``config`` names: a torch checkpoint (``.pth`` + sidecar) or an exported ``.onnx``
    run by ONNX Runtime / OpenVINO behind the same :class:`Detector` interface."""
    path = resolve_model_path(config)
    runtime = config.runtime or ("onnxruntime" if path.suffix.lower() == ".onnx" else "torch")
    if runtime == "torch":
        if path.suffix.lower() == ".onnx":
            raise QCompressError(f"{path} is an ONNX model; torch runs .pth checkpoints",
                                 "use --runtime onnxruntime (or openvino) for .onnx files")
        if config.input_size is not None and config.input_size < 1:
            raise QCompressError(f"--input-size must be positive, got {config.input_size}", "e.g. --input-size 640")
        options = {"input_size": config.input_size} if config.input_size is not None else None
        return load_detector(path, arch=config.arch, labels=config.labels, options=options)
    if path.suffix.lower() != ".onnx":
        raise QCompressError(f"--runtime {runtime} runs exported .onnx files, not {path.name}",
                             f"export it first: qcompress export -m {path}")
    from qcompress.runtime.onnxruntime import load_onnx_detector

    return load_onnx_detector(path, threads=config.threads, runtime=runtime)


def load_dataset(
    config: DataConfig, class_names: Sequence[str], split: str | None = None, reference: Detector | None = None
) -> DetectionDataset:
    """The dataset ``config`` names.

    With ``config.pseudo_labels`` the images of ``config.split`` (or the COCO folder) are one pool,
    relabelled by ``reference`` (the fp32 parent): without ``split`` the evaluation set (the first
    ``limit`` images), with a ``split`` (a training/calibration request) the images after those.
    """
    if config.pseudo_labels is not None:
        from qcompress.data.pseudo import PseudoLabeled, pseudo_split_indices

        if reference is None:
            raise QCompressError("--pseudo-labels needs a float parent model to label the images",
                                 "use it with prune --finetune-epochs or qat")
        base = load_dataset(replace(config, pseudo_labels=None), class_names)
        indices = pseudo_split_indices(len(base), config.limit, "eval" if split is None else "train")
        return PseudoLabeled(base, reference, config.pseudo_labels, indices)
    split = split or config.split
    if config.dataset == "voc":
        from qcompress.data.voc import VOCDataset

        root = Path(config.data) if config.data is not None else default_data_dir()
        return VOCDataset(root, split, class_names)
    if config.dataset == "coco":
        from qcompress.data.coco import CocoDataset

        if config.data is None:
            raise QCompressError("--dataset coco needs --data IMAGE_DIR", "pass the COCO image folder and --ann")
        data = Path(config.data)
        if not data.is_dir():
            raise QCompressError(f"COCO image folder not found: {data}", "pass --data IMAGE_DIR")
        ann = Path(config.ann) if config.ann is not None else _find_coco_json(data)
        return CocoDataset(_image_dir_for_coco(data), ann, class_names)
    raise QCompressError(f"unknown dataset kind {config.dataset!r}", "use --dataset voc or --dataset coco")


def _find_coco_json(folder: Path) -> Path:
    """The only ``*.json`` in the data folder, or beside it when the folder is the image folder itself
    (``coco/images`` with ``coco/instances.json``)."""
    for place in (folder, folder.parent):
        candidates = sorted(place.glob("*.json"))
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise QCompressError(
                f"{len(candidates)} json files in {place}, cannot tell which holds the COCO annotations",
                "pass --ann instances.json")
    raise QCompressError(f"no COCO annotation json in {folder} or beside it", "pass --ann instances.json")


def _image_dir_for_coco(data: Path) -> Path:
    return data / "images" if (data / "images").is_dir() else data


def limited_indices(dataset: DetectionDataset, limit: int | None) -> list[int]:
    n = len(dataset)
    if limit is not None and limit <= 0:
        raise QCompressError(f"--limit must be positive, got {limit}", "omit it to use every image")
    return list(range(min(n, limit) if limit else n))


class Subset:
    """The first images of a dataset, same contract."""

    def __init__(self, dataset: DetectionDataset, indices: list[int]) -> None:
        self.dataset, self.indices, self.class_names = dataset, indices, dataset.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.dataset, name)
        return lambda index, *a, **k: method(self.indices[index], *a, **k)


def dataset_labels(root: Path) -> Path:
    for candidate in (root / "labels.txt", root.parent / "labels.txt"):
        if candidate.is_file():
            return candidate
    raise QCompressError(f"no labels.txt found beside {root}", "pass --labels FILE")


def default_output(parent: Path, suffix: str, folder: str) -> Path:
    from qcompress.defaults import TRAINED_MODELS

    return TRAINED_MODELS / folder / f"{parent.stem}-{suffix}.pth"


def load_float_parent(model: ModelConfig, out: Path | None, suffix: str, folder: str) -> tuple[Path, Detector, Path]:
    """(parent path, float detector, output path) for a command that derives a new checkpoint.

    Refuses an already-quantized parent and an output that would overwrite it.
    """
    parent_path = resolve_model_path(model)
    detector = load_model(model)
    if (detector.source.get("sidecar") or {}).get("quantization"):
        raise QCompressError(f"{parent_path} is already quantized", "pass the float (or pruned) checkpoint it came from")
    return parent_path, detector, derived_output(parent_path, out, suffix, folder)


def derived_output(parent_path: Path, out: Path | None, suffix: str, folder: str) -> Path:
    """The checkpoint a command derives from ``parent_path``: ``out``, or the default under
    ``trained_models/<folder>/``; refused when it would overwrite the parent or cannot be written."""
    out = Path(out) if out is not None else default_output(parent_path, suffix, folder)
    if out.resolve() == parent_path.resolve():
        raise QCompressError(f"refusing to overwrite the input checkpoint {out}", "choose another --out")
    check_writable(out, "--out")
    return out


def calibration_dataset(config: DataConfig, class_names: Sequence[str], split: str) -> DetectionDataset:
    if config.dataset == "coco":
        return load_dataset(config, class_names)
    return load_dataset(config, class_names, split)


def calibration_batches(
    detector: Detector, dataset: DetectionDataset, count: int, seed: int, batch_size: int = 16
) -> list:
    """Deterministic subset of ``dataset``, preprocessed for ``detector``, in batches."""
    import torch

    from qcompress.data.calibration import calibration_indices

    indices = calibration_indices(len(dataset), count, seed)
    images = [detector.preprocess(dataset.load_image(i)) for i in indices]
    return [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def run_dir_for(out: Path) -> Path:
    return out.parent / f"{out.stem}-run"


def read_run_state(run_dir: Path, hint: str) -> dict[str, Any] | None:
    """The training state an interrupted run saved in ``run_dir`` after its last finished epoch (``last.state.pt``,
    loaded without unpickling arbitrary objects), or None where the run left no ``last.pth`` and state; a damaged
    state file is one :class:`QCompressError` with ``hint``."""
    import torch

    last, state_file = run_dir / "last.pth", run_dir / "last.state.pt"
    if not (last.is_file() and state_file.is_file()):
        return None
    try:
        return torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or malicious: one line, never a traceback
        raise QCompressError(f"cannot resume from {state_file}: {str(exc).splitlines()[0][:200]}", hint) from None
