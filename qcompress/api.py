"""The library surface the CLI calls: each function takes a frozen config and returns a result.

Nothing here prints; progress is reported through optional callbacks so the CLI can render it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcompress.checkpoints import load_detector, save_detector, versions
from qcompress.data.dataset import DetectionDataset
from qcompress.defaults import DEFAULT_REPORTS, default_data_dir, default_model_path
from qcompress.errors import QCompressError
from qcompress.inference import predict_dataset
from qcompress.io_utils import sha256_file
from qcompress.models.detector import Detections, Detector
from qcompress.reports import Report, md_table, write_report

Progress = Callable[[str, int | None], Callable[[int], None]]  # (description, total) -> advance(n)
METRICS = ("voc07", "voc", "coco")


def _no_progress(description: str, total: int | None) -> Callable[[int], None]:
    return lambda n=1: None


# --------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ModelConfig:
    model_path: Path | None = None  # None: the embedded default checkpoint
    arch: str | None = None  # None: from the sidecar, else mb2-ssd-lite
    labels: Path | None = None  # class names, one per line (BACKGROUND first or implied)
    input_size: int | None = None  # builder input size for files without a sidecar (e.g. 640)


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
    return Path(config.model_path) if config.model_path is not None else default_model_path()


def load_model(config: ModelConfig) -> Detector:
    options = {"input_size": config.input_size} if config.input_size else None
    return load_detector(resolve_model_path(config), arch=config.arch, labels=config.labels, options=options)


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
    candidates = sorted(folder.glob("*.json"))
    if len(candidates) == 1:
        return candidates[0]
    raise QCompressError(f"no unique COCO annotation json beside {folder}", "pass --ann instances.json")


def _image_dir_for_coco(data: Path) -> Path:
    return data / "images" if (data / "images").is_dir() else data


def limited_indices(dataset: DetectionDataset, limit: int | None) -> list[int]:
    n = len(dataset)
    if limit is not None and limit <= 0:
        raise QCompressError(f"--limit must be positive, got {limit}", "omit it to use every image")
    return list(range(min(n, limit) if limit else n))


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class EvalResult:
    metric: str
    mAP: float
    ap_per_class: dict[str, float]
    num_images: int
    num_objects: int
    seconds: float
    metric_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("nan")


def score_detections(
    dataset: DetectionDataset,
    indices: Sequence[int],
    detections: Sequence[Detections],
    metric: str,
    annotations: Sequence[Any] | None = None,
) -> tuple[float, dict[str, float], int, dict[str, Any]]:
    """(mAP, per-class AP, number of objects, extra stats) for detections of ``dataset[indices]``."""
    if annotations is None:
        annotations = [dataset.annotation(i) for i in indices]
    num_objects = int(sum((~a.difficult).sum() for a in annotations))
    if metric in ("voc07", "voc"):
        from qcompress.metrics.voc_ap import evaluate_voc_detections

        res = evaluate_voc_detections(annotations, detections, dataset.class_names, use_07_metric=metric == "voc07")
        return res.mAP, res.ap_per_class, num_objects, {}
    from qcompress.metrics.coco_ap import annotations_to_coco, detections_to_coco, evaluate_coco

    coco_gt = getattr(dataset, "coco", None)
    if coco_gt is not None:
        image_ids = [dataset.coco_image_id(i) for i in indices]
        label_map = dataset.label_to_category_id
        if not label_map:  # no COCO category is one of the model's classes: nothing to score, not AP 0
            return float("nan"), {}, num_objects, {"class_overlap": class_overlap(dataset)}
        # Detections of classes the json does not annotate can be neither right nor wrong: left out.
        results = detections_to_coco(_only_labels(detections, label_map), image_ids, label_map)
        # Only the categories the model can predict: others would count as AP 0 against it.
        res = evaluate_coco(coco_gt, results, image_ids=image_ids, category_ids=sorted(label_map.values()))
    else:
        sizes = [dataset.image_size(i) for i in indices]
        coco_gt = annotations_to_coco(annotations, dataset.class_names, sizes)
        results = detections_to_coco(detections, list(range(len(indices))))
        res = evaluate_coco(coco_gt, results)
    return res.stats["AP"], res.ap_per_class, num_objects, {"coco": res.stats}


def evaluate_detector(
    detector: Detector,
    dataset: DetectionDataset,
    metric: str = "voc07",
    limit: int | None = None,
    batch_size: int = 16,
    progress: Progress = _no_progress,
    description: str = "eval",
) -> tuple[EvalResult, list[Detections]]:
    if metric not in METRICS:
        raise QCompressError(f"unknown metric {metric!r}", f"use one of: {', '.join(METRICS)}")
    indices = limited_indices(dataset, limit)
    started = time.perf_counter()
    annotations = [dataset.annotation(i) for i in indices]  # bad annotations fail before inference
    advance = progress(description, len(indices))
    detections = predict_dataset(detector, dataset, indices, batch_size=batch_size, on_batch=advance)
    metric_started = time.perf_counter()
    mAP, per_class, num_objects, extra = score_detections(dataset, indices, detections, metric, annotations)
    done = time.perf_counter()
    result = EvalResult(metric, mAP, per_class, len(indices), num_objects, done - started, done - metric_started, extra)
    return result, detections


@dataclass(frozen=True)
class EvalConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    metric: str | None = None  # default: voc07 for VOC data, coco for COCO data
    batch_size: int = 16
    seed: int = 0
    report_name: str | None = None
    out_dir: Path = DEFAULT_REPORTS
    reference: Path | None = None  # fp32 checkpoint whose detections (score >= reference_score) are pseudo labels
    reference_score: float = 0.5


def model_summary(detector: Detector) -> dict[str, Any]:
    source = getattr(detector, "source", {}) or {}
    sidecar = source.get("sidecar") or {}
    return {
        "path": source.get("path"),
        "sha256": source.get("sha256"),
        "arch": detector.spec.arch,
        "classes": list(detector.class_names),
        "input_size": list(detector.spec.input_size),
        "quantization": sidecar.get("quantization"),
        "compression": sidecar.get("compression", []),
    }


def evaluate(config: EvalConfig, progress: Progress = _no_progress) -> tuple[EvalResult, Report]:
    """``qcompress eval``: mAP of one checkpoint on one dataset, with a JSON + Markdown report."""
    detector = load_model(config.model)
    dataset = load_dataset(config.data, detector.class_names)
    metric = config.metric or ("coco" if config.data.dataset == "coco" else "voc07")
    result, detections = evaluate_detector(detector, dataset, metric, config.data.limit, config.batch_size, progress)
    overlap = class_overlap(dataset)
    if overlap is not None:
        result.extra["class_overlap"] = overlap
    if config.reference is not None:
        reference = load_reference(config.reference, config.model, detector)
        _, fidelity = evaluate_fidelity(
            detector, reference, dataset, config.data.limit, config.batch_size, progress, config.reference_score,
            detections=detections,
        )
        result.extra["fidelity"] = fidelity
    name = config.report_name or f"eval-{Path(detector.source['path']).stem}"
    report = eval_report(name, detector, result, config)
    add_overlap_and_fidelity_sections(report, result.extra)
    write_report(report, config.out_dir)
    return result, report


def eval_report(name: str, detector: Detector, result: EvalResult, config: EvalConfig) -> Report:
    report = Report(name, f"Evaluation of {Path(detector.source['path']).name}")
    report.data.update(
        {
            "command": "eval",
            "model": model_summary(detector),
            "data": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config.data).items()},
            "metric": result.metric,
            "mAP": result.mAP,
            "ap_per_class": result.ap_per_class,
            "num_images": result.num_images,
            "num_objects": result.num_objects,
            "seconds": result.seconds,
            "metric_seconds": result.metric_seconds,
            "images_per_second": result.images_per_second,
            "seed": config.seed,
            "versions": versions(),
            **result.extra,
        }
    )
    report.add(
        "Summary",
        md_table(
            ["metric", "mAP", "images", "objects", "seconds", "images/s"],
            [[result.metric, result.mAP, result.num_images, result.num_objects, result.seconds, result.images_per_second]],
        ),
    )
    report.add("Per class", md_table(["class", "AP"], sorted(result.ap_per_class.items())))
    if "coco" in result.extra:
        report.add("COCO", md_table(list(result.extra["coco"]), [list(result.extra["coco"].values())]))
    report.add("Model", md_table(["field", "value"], [[k, v] for k, v in model_summary(detector).items() if k != "classes"]))
    return report


# -------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainJobConfig:
    arch: str = "mb2-ssd-lite"
    data: DataConfig = DataConfig(split="train")
    labels: Path | None = None  # default: the dataset's labels.txt, else the init checkpoint's classes
    init: Path | None = None  # fine-tune from this checkpoint instead of random initialisation
    out: Path = Path("trained_models/mb2-ssd-lite-trained.pth")
    val_split: str = "val"
    resume: bool = False
    train: Any = None  # qcompress.training.loop.TrainConfig; None: its defaults


def run_dir_for(out: Path) -> Path:
    return out.parent / f"{out.stem}-run"


def train(
    config: TrainJobConfig,
    on_step: Callable[..., None] | None = None,
    on_epoch: Callable[..., None] | None = None,
    progress: Progress = _no_progress,
) -> tuple[Detector, Any, Report]:
    """``qcompress train``: SSD training with per-epoch checkpoints and validation mAP."""
    import torch

    from qcompress.checkpoints import read_state_dict
    from qcompress.io_utils import read_labels
    from qcompress.models.registry import build_detector
    from qcompress.training.loop import TrainConfig, train_detector

    train_cfg = config.train or TrainConfig()
    out = Path(config.out)
    run_dir = run_dir_for(out)
    data_root = Path(config.data.data) if config.data.data is not None else default_data_dir()
    data_cfg = DataConfig(config.data.dataset, data_root, config.data.split, config.data.ann, config.data.limit)
    if config.init is not None:
        detector = load_detector(Path(config.init), labels=config.labels)
    else:
        labels = config.labels or _dataset_labels(data_root)
        detector = build_detector(config.arch, read_labels(labels))
    resume_state = None
    if config.resume:
        last, state = run_dir / "last.pth", run_dir / "last.state.pt"
        if not (last.is_file() and state.is_file()):
            raise QCompressError(f"nothing to resume in {run_dir}", "start without --resume")
        detector.model.load_state_dict(read_state_dict(last))
        resume_state = torch.load(state, map_location="cpu", weights_only=True)
    train_set = load_dataset(data_cfg, detector.class_names, config.data.split)
    if config.data.limit:
        train_set = _Subset(train_set, limited_indices(train_set, config.data.limit))
    val_set = load_dataset(data_cfg, detector.class_names, config.val_split)

    def evaluate_fn(det: Detector) -> dict[str, Any]:
        res, _ = evaluate_detector(det, val_set, "voc07", train_cfg.eval_limit, description="validate", progress=progress)
        return {"val_mAP": res.mAP}

    def checkpoint_fn(epoch: int, state: dict[str, Any]) -> None:
        save_detector(detector, run_dir / "last.pth", parent=config.init)
        from qcompress.io_utils import atomic_path

        with atomic_path(run_dir / "last.state.pt") as tmp:
            torch.save(state, tmp)

    result = train_detector(
        detector,
        train_set,
        train_cfg,
        evaluate_fn=evaluate_fn,
        checkpoint_fn=checkpoint_fn,
        resume_state=resume_state,
        on_step=on_step,
        on_epoch=on_epoch,
    )
    save_detector(
        detector,
        out,
        parent=config.init,
        compression=[{"step": "train", "epochs": result.epochs_run, "config": asdict(train_cfg)}],
        extra={"training": {"history": result.history, "data": str(data_root), "seconds": result.seconds}},
    )
    from qcompress.io_utils import write_labels

    write_labels(out.with_name(f"{out.stem}-labels.txt"), detector.class_names)
    report = Report(f"train-{out.stem}", f"Training of {out.name}")
    report.data.update(
        {"command": "train", "out": str(out), "config": asdict(train_cfg), "history": result.history,
         "seconds": result.seconds, "versions": versions()}
    )
    rows = [[h["epoch"], h["regression_loss"], h["classification_loss"], h.get("val_mAP", float("nan")), h["seconds"]]
            for h in result.history]
    report.add("Epochs", md_table(["epoch", "regression loss", "classification loss", "val mAP (voc07)", "seconds"], rows))
    return detector, result, report


def _dataset_labels(root: Path) -> Path:
    for candidate in (root / "labels.txt", root.parent / "labels.txt"):
        if candidate.is_file():
            return candidate
    raise QCompressError(f"no labels.txt found beside {root}", "pass --labels FILE")


class _Subset:
    """The first images of a dataset, same contract."""

    def __init__(self, dataset: DetectionDataset, indices: list[int]) -> None:
        self.dataset, self.indices, self.class_names = dataset, indices, dataset.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.dataset, name)
        return lambda index, *a, **k: method(self.indices[index], *a, **k)


# ---------------------------------------------------------------------------------- quantization
@dataclass(frozen=True)
class QuantizeJobConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    backend: str = "x86"
    observer: str = "histogram"
    per_channel: bool = True
    calib_images: int = 200
    calib_split: str = "train"
    skip: tuple[str, ...] = ()
    equalize: bool = False
    absorb_bias: bool = False
    bias_correction: str | None = None  # analytic | empirical
    data_free: bool = False
    seed: int = 0
    out: Path | None = None  # default: trained_models/quantized/<parent>-int8.pth
    evaluate: bool = True
    latency_runs: int = 20
    threads: int | None = None
    report_name: str | None = None
    out_dir: Path = DEFAULT_REPORTS
    fidelity: bool | None = None  # int8 vs fp32 detections; None: when the test data has no labels for the classes
    fidelity_score: float = 0.5


@dataclass
class QuantizeResult:
    out: Path
    recipe: dict[str, Any]
    fp32: EvalResult | None
    int8: EvalResult | None
    fp32_latency: Any
    int8_latency: Any
    fp32_bytes: int
    int8_bytes: int
    layer_sqnr: dict[str, float]
    output_sqnr: list[float]
    steps: list[dict[str, Any]] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None  # qcompress.fidelity.fidelity_scores of int8 vs fp32
    parts: list[list[Any]] = field(default_factory=list)  # [part, precision, layers] where not all int8


def calibration_batches(
    detector: Detector, dataset: DetectionDataset, count: int, seed: int, batch_size: int = 16
) -> list:
    """Deterministic subset of ``dataset``, preprocessed for ``detector``, in batches."""
    import torch

    from qcompress.data.calibration import calibration_indices

    indices = calibration_indices(len(dataset), count, seed)
    images = [detector.preprocess(dataset.load_image(i)) for i in indices]
    return [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]


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
    out = Path(out) if out is not None else default_output(parent_path, suffix, folder)
    if out.resolve() == parent_path.resolve():
        raise QCompressError(f"refusing to overwrite the input checkpoint {out}", "choose another --out")
    return parent_path, detector, out


def _calibration_dataset(config: DataConfig, class_names: Sequence[str], split: str) -> DetectionDataset:
    if config.dataset == "coco":
        return load_dataset(config, class_names)
    return load_dataset(config, class_names, split)


def quantize(config: QuantizeJobConfig, progress: Progress = _no_progress) -> tuple[QuantizeResult, Report]:
    """``qcompress quantize``: eager-mode int8 of a float checkpoint, saved and compared with its parent."""
    from qcompress._warnings import quiet_torch_ao
    from qcompress.bench.latency import measure_latency
    from qcompress.quant.parts import parts_summary
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

    parent_path, detector, out = load_float_parent(config.model, config.out, _recipe_suffix(config), "quantized")
    options = QuantizeOptions(
        backend=config.backend, observer=config.observer, per_channel=config.per_channel, skip=config.skip,
        equalize=config.equalize, absorb_bias=config.absorb_bias, bias_correction=config.bias_correction,
        data_free=config.data_free,
    )
    options.validate(have_data=True)  # bad options fail before any image is read
    calib = []
    if not config.data_free:
        if config.calib_images <= 0:
            raise QCompressError(f"--calib-images must be positive, got {config.calib_images}", "or use --data-free")
        calib_set = _calibration_dataset(config.data, detector.class_names, config.calib_split)
        advance = progress("calibration images", None)
        calib = calibration_batches(detector, calib_set, config.calib_images, config.seed)
        advance(sum(b.shape[0] for b in calib))
    with quiet_torch_ao():
        qdet, record = quantize_detector(detector, calib, options)
    recipe = {**record.recipe, "calib_images": 0 if config.data_free else sum(b.shape[0] for b in calib),
              "calib_split": None if config.data_free else config.calib_split, "seed": config.seed}
    save_detector(qdet, out, parent=parent_path, quantization=recipe,
                  compression=[{"step": "quantize", **recipe}])
    # Measure: accuracy, speed, size, where the error is.
    h, w = detector.spec.input_size
    fp32_eval = int8_eval = fidelity = None
    if config.evaluate:
        test_set = load_dataset(config.data, detector.class_names)
        metric = "coco" if config.data.dataset == "coco" else "voc07"
        fp32_eval, fp32_dets = evaluate_detector(detector, test_set, metric, config.data.limit, progress=progress, description="eval fp32")
        with quiet_torch_ao():
            int8_eval, int8_dets = evaluate_detector(qdet, test_set, metric, config.data.limit, progress=progress, description="eval int8")
        if config.fidelity or (config.fidelity is None and fp32_eval.num_objects == 0):
            from qcompress.fidelity import fidelity_scores

            fidelity = fidelity_scores(fp32_dets, int8_dets, detector.class_names, config.fidelity_score)
    probe = calib[:1] if calib else [_random_probe(h, w, config.seed)]
    with quiet_torch_ao():
        fp32_lat = measure_latency(detector.model, (1, 3, h, w), runs=config.latency_runs, threads=config.threads)
        int8_lat = measure_latency(qdet.model, (1, 3, h, w), runs=config.latency_runs, threads=config.threads)
        from qcompress.quant.sqnr import layer_sqnr, output_sqnr

        sqnr = layer_sqnr(record.float_fused, qdet.model, [b[:8] for b in probe])
        import torch

        with torch.inference_mode():
            out_sqnr = output_sqnr(detector.model(probe[0][:8]), qdet.model(probe[0][:8]))
    result = QuantizeResult(
        out=out, recipe=recipe, fp32=fp32_eval, int8=int8_eval, fp32_latency=fp32_lat, int8_latency=int8_lat,
        fp32_bytes=parent_path.stat().st_size, int8_bytes=out.stat().st_size, layer_sqnr=sqnr,
        output_sqnr=out_sqnr, steps=record.steps, fidelity=fidelity, parts=parts_summary(qdet.model, recipe),
    )
    report = quantize_report(config.report_name or f"quantize-{out.stem}", detector, result)
    write_report(report, config.out_dir)
    return result, report


def _random_probe(h: int, w: int, seed: int):
    import torch

    return torch.randn(8, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _recipe_suffix(config: QuantizeJobConfig) -> str:
    parts = ["int8", "pc" if config.per_channel else "pt"]
    if config.data_free:
        parts.append("datafree")
    else:
        if config.equalize:
            parts.append("cle")
        if config.bias_correction:
            parts.append(f"bc-{config.bias_correction}")
    return "-".join(parts)


def quantize_report(name: str, detector: Detector, r: QuantizeResult) -> Report:
    report = Report(name, f"int8 quantization of {Path(detector.source['path']).name}")
    rows = []
    if r.fp32 and r.int8:
        rows.append(["mAP (" + r.fp32.metric + ")", r.fp32.mAP, r.int8.mAP, r.int8.mAP / r.fp32.mAP if r.fp32.mAP else float("nan")])
    rows += [
        ["latency median ms (batch 1)", r.fp32_latency.median_ms, r.int8_latency.median_ms, r.int8_latency.median_ms / r.fp32_latency.median_ms],
        ["latency p90 ms", r.fp32_latency.p90_ms, r.int8_latency.p90_ms, r.int8_latency.p90_ms / r.fp32_latency.p90_ms],
        ["size on disk bytes", r.fp32_bytes, r.int8_bytes, r.int8_bytes / r.fp32_bytes],
    ]
    report.add("fp32 vs int8", md_table(["", "fp32", "int8", "int8 / fp32"], rows)
               + f"\n\nLatency: {r.int8_latency.runs} timed runs after {r.int8_latency.warmup} warm-up, "
               f"{r.int8_latency.threads} threads, input {tuple(detector.spec.input_size)}.")
    if r.fp32 and r.int8:
        report.add("Per-class AP", md_table(
            ["class", "fp32", "int8", "delta"],
            [[c, r.fp32.ap_per_class[c], r.int8.ap_per_class.get(c, float("nan")),
              r.int8.ap_per_class.get(c, float("nan")) - r.fp32.ap_per_class[c]] for c in sorted(r.fp32.ap_per_class)],
        ))
    if r.fidelity is not None:
        add_overlap_and_fidelity_sections(report, {"fidelity": r.fidelity}, heading="Fidelity of int8 vs fp32 (no labels needed)")
    if r.parts:
        report.add("Which parts run in int8", md_table(["part", "precision", "layers with weights"], r.parts)
                   + "\n\nThe float parts are code eager-mode int8 cannot take (see qcompress/quant/parts.py).")
    report.add("Recipe", md_table(["field", "value"], [[k, v] for k, v in r.recipe.items()
                                                     if k not in ("fusion_groups", "int8_parts", "float_parts")]))
    if r.steps:
        report.add("Function-changing and data-free steps", md_table(["step", "details"], [[s["step"], s.get("summary", "")] for s in r.steps]))
    worst = sorted(r.layer_sqnr.items(), key=lambda kv: kv[1])[:10]
    report.add("Worst layers by SQNR (int8 vs fp32 output at that layer, dB)", md_table(["layer", "SQNR dB"], worst))
    report.add("Raw head outputs SQNR (dB)", md_table(["output", "SQNR dB"], [[i, v] for i, v in enumerate(r.output_sqnr)]))
    report.data.update({
        "command": "quantize",
        "model": model_summary(detector),
        "out": str(r.out),
        "recipe": r.recipe,
        "fp32": asdict(r.fp32) if r.fp32 else None,
        "int8": asdict(r.int8) if r.int8 else None,
        "fp32_latency": r.fp32_latency.as_dict(),
        "int8_latency": r.int8_latency.as_dict(),
        "latency_ratio": r.int8_latency.median_ms / r.fp32_latency.median_ms,
        "fp32_bytes": r.fp32_bytes,
        "int8_bytes": r.int8_bytes,
        "size_ratio": r.int8_bytes / r.fp32_bytes,
        "layer_sqnr_db": r.layer_sqnr,
        "output_sqnr_db": r.output_sqnr,
        "parts": [{"part": p, "precision": q, "layers": n} for p, q, n in r.parts],
        "steps": r.steps,
        "fidelity": r.fidelity,
        "versions": versions(),
    })
    return report


# ------------------------------------------------------------------------------------- fidelity
def class_overlap(dataset: DetectionDataset) -> dict[str, Any] | None:
    """Which of the model's classes a COCO json annotates (None for datasets without a category map)."""
    label_map = getattr(dataset, "label_to_category_id", None)
    if label_map is None:
        return None
    names = dataset.class_names
    return {
        "matched": [names[label] for label in sorted(label_map)],
        "dataset_categories_without_class": list(getattr(dataset, "absent_categories", ())),
        "classes_not_in_dataset": list(getattr(dataset, "classes_not_in_coco", ())),
    }


def _only_labels(detections: Sequence[Detections], labels: Any) -> list[Detections]:
    import torch

    wanted = torch.tensor(sorted(labels), dtype=torch.int64)
    kept = []
    for d in detections:
        keep = torch.isin(torch.as_tensor(d.labels), wanted)
        kept.append(Detections(d.boxes[keep], d.labels[keep], d.scores[keep]))
    return kept


def load_reference(path: Path, model: ModelConfig, detector: Detector) -> Detector:
    """The reference checkpoint of a fidelity evaluation; a plain file gets the model's arch, labels and
    builder options, a qcompress checkpoint its own sidecar."""
    from qcompress.checkpoints import sidecar_path

    path = Path(path)
    if sidecar_path(path).is_file():
        reference = load_detector(path, labels=model.labels)
    else:
        options = dict(detector.spec.options) or None
        reference = load_detector(path, arch=model.arch or detector.spec.arch, labels=model.labels, options=options)
    if len(reference.class_names) != len(detector.class_names):
        raise QCompressError(
            f"the reference {path.name} has {len(reference.class_names)} classes, the model {len(detector.class_names)}",
            "pass the float checkpoint the model was compressed from",
        )
    return reference


def evaluate_fidelity(
    detector: Detector,
    reference_detector: Detector,
    dataset: DetectionDataset,
    limit: int | None = None,
    batch_size: int = 16,
    progress: Progress = _no_progress,
    score_threshold: float = 0.5,
    *,
    detections: Sequence[Detections] | None = None,
    reference_detections: Sequence[Detections] | None = None,
    iou: float = 0.5,
) -> tuple[EvalResult, dict[str, Any]]:
    """``detector`` scored against ``reference_detector``'s own detections (``score >= score_threshold``)
    on the first ``limit`` images of ``dataset``: no labels needed. Returns an :class:`EvalResult` whose
    mAP is the fidelity AP50 and the full :func:`qcompress.fidelity.fidelity_scores` dict.
    ``detections`` / ``reference_detections``, when given, are reused instead of running a model."""
    from qcompress.fidelity import fidelity_scores

    if len(reference_detector.class_names) != len(detector.class_names):
        raise QCompressError(
            f"reference has {len(reference_detector.class_names)} classes, the model {len(detector.class_names)}",
            "compare a compressed model with the float model it came from",
        )
    indices = limited_indices(dataset, limit)
    started = time.perf_counter()
    if detections is None:
        detections = predict_dataset(detector, dataset, indices, batch_size=batch_size,
                                     on_batch=progress("model", len(indices)))
    if reference_detections is None:
        reference_detections = predict_dataset(reference_detector, dataset, indices, batch_size=batch_size,
                                               on_batch=progress("reference", len(indices)))
    if not len(detections) == len(reference_detections) == len(indices):
        raise QCompressError(
            f"{len(detections)} model and {len(reference_detections)} reference results for {len(indices)} images",
            "pass detections for the same first images of the dataset",
        )
    metric_started = time.perf_counter()
    scores = fidelity_scores(reference_detections, detections, detector.class_names, score_threshold, iou)
    done = time.perf_counter()
    scores["reference"] = {"path": reference_detector.source.get("path"), "sha256": reference_detector.source.get("sha256")}
    result = EvalResult("fidelity-AP50", scores["AP50"], scores["ap_per_class"], len(indices), scores["num_pseudo_gt"],
                        done - started, done - metric_started, {"fidelity": scores})
    return result, scores


def add_overlap_and_fidelity_sections(report: Report, extra: dict[str, Any], heading: str = "Fidelity vs reference") -> None:
    """Report sections, right after the summary: the class-overlap note and the fidelity table."""
    sections = []
    overlap = extra.get("class_overlap")
    if overlap is not None and not overlap["matched"]:
        sections.append(("Class overlap", (
            "**No class of the model is annotated in this dataset**: mAP is not applicable (reported as nan). "
            f"Model classes: {', '.join(overlap['classes_not_in_dataset']) or '-'}; dataset categories: "
            f"{', '.join(overlap['dataset_categories_without_class']) or '-'}. "
            "Use `--reference FP32.pth` to measure fidelity to the float model instead.")))
    elif overlap is not None and overlap["classes_not_in_dataset"]:
        sections.append(("Class overlap", (
            f"Scored classes: {', '.join(overlap['matched'])}. Not annotated in this dataset (detections left out): "
            f"{', '.join(overlap['classes_not_in_dataset'])}.")))
    fidelity = extra.get("fidelity")
    if fidelity is not None:
        ref = (fidelity.get("reference") or {}).get("path")
        rows = [
            ["AP50 (VOC area, vs pseudo ground truth)", fidelity["AP50"]],
            ["recall of pseudo ground truth (test score >= threshold)", fidelity["recall"]],
            ["recall, any test score", fidelity["recall_any_score"]],
            ["precision (test score >= threshold)", fidelity["precision"]],
            ["mean IoU of matched boxes", fidelity["mean_iou"]],
            ["score drift, mean abs(test - ref)", fidelity["score_drift_abs"]],
            ["score drift, mean (test - ref)", fidelity["score_drift_signed"]],
            ["pseudo ground-truth boxes", fidelity["num_pseudo_gt"]],
            ["matched pairs", fidelity["num_matched"]],
            ["images", fidelity["num_images"]],
        ]
        body = md_table(["", "value"], rows) + (
            f"\n\nPseudo ground truth: the reference's detections with score >= {fidelity['score_threshold']}"
            + (f" ({Path(ref).name})" if ref else "") + f"; matches at IoU >= {fidelity['iou_threshold']}. "
            "1.0 / 1.0 / 0 means the detections are unchanged.")
        if len(fidelity["ap_per_class"]) > 1:
            body += "\n\n" + md_table(["class", "fidelity AP50", "pseudo gt"], [
                [c, ap, fidelity["num_pseudo_gt_per_class"].get(c, 0)] for c, ap in sorted(fidelity["ap_per_class"].items())])
        sections.append((heading, body))
    at = 1 if report.sections else 0
    report.sections[at:at] = sections


# ------------------------------------------------------------------------------ recipe comparison
def recipe_table(config: QuantizeJobConfig, progress: Progress = _no_progress) -> tuple[float, list[Any], Report]:
    """The data-free ladder (naive per-tensor, +CLE, +BA, +BC, data-free, per-channel, calibrated),
    each recipe evaluated on the same test images; nothing is saved but the report."""
    from qcompress._warnings import quiet_torch_ao
    from qcompress.quant.recipes import run_recipes

    detector = load_model(config.model)
    calib_set = _calibration_dataset(config.data, detector.class_names, config.calib_split)
    calib = calibration_batches(detector, calib_set, config.calib_images, config.seed)
    test_set = load_dataset(config.data, detector.class_names)
    metric = "coco" if config.data.dataset == "coco" else "voc07"

    def score(det: Detector) -> float:
        with quiet_torch_ao():
            result, _ = evaluate_detector(det, test_set, metric, config.data.limit, progress=progress,
                                          description="eval")
        return result.mAP

    with quiet_torch_ao():
        fp32, rows = run_recipes(detector, calib, score, backend=config.backend)
    name = config.report_name or f"recipes-{Path(detector.source['path']).stem}"
    report = Report(name, f"Quantization recipes for {Path(detector.source['path']).name}")
    table = [["fp32", fp32, 1.0]] + [[r.name, r.score, r.relative] for r in rows]
    report.add(f"mAP ({metric}) per recipe", md_table(["recipe", "mAP", "of fp32"], table)
               + f"\n\nCalibration: {sum(b.shape[0] for b in calib)} images (data-free rows use none); "
               "per-tensor rows use min/max ranges so each step's effect is isolated.")
    report.data.update({"command": "quantize --recipe-table", "model": model_summary(detector), "metric": metric,
                        "fp32": fp32, "recipes": [asdict(r) for r in rows], "versions": versions()})
    write_report(report, config.out_dir)
    return fp32, rows, report


# ---------------------------------------------------------------- the other commands' entry points
# Their configs and implementations live beside their algorithms; they are re-exported here so the
# library surface stays one module: api.prune / api.qat / api.bench / api.compare.
def prune(config: Any, progress: Progress = _no_progress):
    """``qcompress prune``: see :class:`qcompress.prune.job.PruneJobConfig`."""
    from qcompress.prune.job import prune as run

    return run(config, progress)


def qat(config: Any, progress: Progress = _no_progress, **kwargs: Any):
    """``qcompress qat``: see :class:`qcompress.quant.qat_job.QATJobConfig`."""
    from qcompress.quant.qat_job import qat as run

    return run(config, progress, **kwargs)


def bench(config: Any, progress: Progress = _no_progress):
    """``qcompress bench``: see :class:`qcompress.bench.job.BenchConfig`."""
    from qcompress.bench.job import bench as run

    return run(config, progress)


def compare(config: Any, progress: Progress = _no_progress):
    """``qcompress compare``: see :class:`qcompress.bench.job.CompareConfig`."""
    from qcompress.bench.job import compare as run

    return run(config, progress)
