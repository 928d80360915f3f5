"""``qcompress bench``, ``compare`` and ``detect``: speed, size and cost of checkpoints side by side.

``bench`` measures every checkpoint the same way (latency per batch size, peak memory, size on disk,
parameters, MACs/BOPs) and reports ratios to the first one. ``compare`` adds accuracy on the same
images and a gallery of those images with each model's detections drawn side by side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcompress._warnings import quiet_torch_ao
from qcompress.bench.latency import LatencyStats, describe_timing, interleaved_latency, measure_latency
from qcompress.bench.size import (
    ComputeCost,
    PeakMemory,
    count_buffers,
    count_macs,
    count_parameters,
    describe_peak_memory,
    peak_forward_memory,
    state_dict_bytes,
)
from qcompress.core import (
    DataConfig,
    EvalResult,
    ModelConfig,
    Progress,
    evaluate_detector,
    evaluate_fidelity,
    load_dataset,
    load_model,
    model_summary,
    no_progress,
    resolve_model_path,
)
from qcompress.core.checkpoints import sidecar_path, versions
from qcompress.core.context import restores_torch_state
from qcompress.defaults import DEFAULT_REPORTS
from qcompress.errors import QCompressError
from qcompress.io_utils import atomic_path, check_writable
from qcompress.models.detector import Detections, Detector
from qcompress.reports import Report, md_table, write_report

MACS_NOTE = (
    "MACs: multiply-accumulates of every conv/linear layer per image (output elements x in_channels/groups "
    "x kH x kW). BOPs = MACs x weight bits x activation bits (32x32 float, 8x8 int8)."
)


# ----------------------------------------------------------------------------------- shared parts
@dataclass
class ModelCost:
    """What one checkpoint costs, measured the same way for every model."""

    label: str
    path: str
    summary: dict[str, Any]
    input_size: tuple[int, int]
    quantized: bool
    backend: str | None
    file_bytes: int
    sidecar_bytes: int
    state_dict_bytes: int
    params: int
    buffers: int
    compute: ComputeCost
    latency: dict[int, LatencyStats] = field(default_factory=dict)  # batch size -> stats
    memory: dict[int, PeakMemory] = field(default_factory=dict)  # batch size -> peak memory

    @property
    def macs(self) -> int:
        return self.compute.macs

    @property
    def bops(self) -> int:
        return self.compute.bops

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "path": self.path,
            "model": self.summary,
            "input_size": list(self.input_size),
            "quantized": self.quantized,
            "backend": self.backend,
            "file_bytes": self.file_bytes,
            "sidecar_bytes": self.sidecar_bytes,
            "state_dict_bytes": self.state_dict_bytes,
            "params": self.params,
            "buffers": self.buffers,
            **self.compute.as_dict(),
            "latency": {str(b): s.as_dict() for b, s in self.latency.items()},
            "peak_memory": {str(b): m.as_dict() for b, m in self.memory.items()},
        }


def metric_values(cost: ModelCost, accuracy: EvalResult | None = None, batch_size: int = 1) -> dict[str, float]:
    """The comparable numbers of one model (latency and memory at ``batch_size``)."""
    values: dict[str, float] = {
        "size_bytes": float(cost.file_bytes),
        "params": float(cost.params),
        "macs": float(cost.macs),
        "bops": float(cost.bops),
    }
    stats = cost.latency.get(batch_size)
    if stats is not None:
        values.update(
            latency_median_ms=stats.median_ms, latency_p90_ms=stats.p90_ms, images_per_second=stats.images_per_second
        )
    memory = cost.memory.get(batch_size)
    if memory is not None:
        values["peak_memory_bytes"] = float(memory.peak_bytes)
    if accuracy is not None:
        values["mAP"] = accuracy.mAP
    return values


def ratio(value: float, reference: float) -> float:
    """``value / reference``; NaN when the reference is 0 or missing."""
    if reference is None or value is None or reference == 0 or math.isnan(reference):
        return float("nan")
    return value / reference


def ratios_to_first(values: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """For each model, every metric divided by the first model's (the first model's ratios are 1)."""
    if not values:
        return []
    first = values[0]
    return [{k: ratio(v, first.get(k, float("nan"))) for k, v in model.items()} for model in values]


def model_labels(paths: Sequence[Path]) -> list[str]:
    """Short names for table columns: the file stem, made unique with its folder or position."""
    stems = [p.stem for p in paths]
    labels = []
    for i, path in enumerate(paths):
        if stems.count(path.stem) == 1:
            labels.append(path.stem)
        else:
            candidate = f"{path.parent.name}/{path.stem}"
            labels.append(candidate if [f"{p.parent.name}/{p.stem}" for p in paths].count(candidate) == 1 else f"{path.stem}#{i + 1}")
    return labels


def _check_paths(model: ModelConfig, paths: Sequence[Path | None]) -> list[Path]:
    resolved = [resolve_model_path(ModelConfig(p, model.arch, model.labels, model.input_size)) for p in (paths or (None,))]
    for path in resolved:
        if not path.is_file():
            raise QCompressError(f"model file not found: {path}", "pass --model-path to an existing .pth file")
    return resolved


def _check_measurement(runs: int, warmup: int, threads: int | None, batch_sizes: Sequence[int] = (1,)) -> None:
    if runs < 1:
        raise QCompressError(f"--runs must be at least 1, got {runs}", "use e.g. --runs 50")
    if warmup < 0:
        raise QCompressError(f"--warmup must be >= 0, got {warmup}", "use e.g. --warmup 10")
    if threads is not None and threads < 1:
        raise QCompressError(f"--threads must be at least 1, got {threads}", "omit it to use torch's default")
    bad = [b for b in batch_sizes if b < 1]
    if bad:
        raise QCompressError(f"--batch-size must be positive, got {bad[0]}", "use e.g. --batch-size 1 --batch-size 8")


def _quantization(detector: Detector) -> dict[str, Any] | None:
    return ((getattr(detector, "source", None) or {}).get("sidecar") or {}).get("quantization") or None


def _use_backend(detector: Detector) -> None:
    """Quantized kernels are packed for one engine; run each int8 model on the engine it was built for."""
    recipe = _quantization(detector)
    backend = recipe.get("backend") if recipe else None
    if backend and backend in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = backend


def _load(model: ModelConfig, path: Path, threads: int | None = None) -> Detector:
    with quiet_torch_ao():  # .onnx files run in ONNX Runtime with ``threads`` intra-op threads
        return load_model(ModelConfig(path, model.arch, model.labels, model.input_size, None, threads))


def measure_model(
    detector: Detector,
    label: str,
    batch_sizes: Sequence[int] = (1,),
    runs: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    seed: int = 0,
    memory: bool = True,
    latency: dict[int, LatencyStats] | None = None,
) -> ModelCost:
    """Size, parameter, MAC/BOP counts, and latency + peak memory at each batch size, of one detector."""
    path = Path(detector.source["path"])
    recipe = _quantization(detector)
    h, w = detector.spec.input_size
    sidecar = sidecar_path(path)
    _use_backend(detector)
    with quiet_torch_ao():
        # Peak memory before the latency runs, so its first pass is as cold as a deployed model's.
        peaks = {b: peak_forward_memory(detector.model, (b, 3, h, w), threads, seed) for b in batch_sizes} if memory else {}
        compute = count_macs(detector.model, (1, 3, h, w), seed)
        if latency is None:
            latency = {b: measure_latency(detector.model, (b, 3, h, w), runs, warmup, threads, seed) for b in batch_sizes}
    return ModelCost(
        label=label,
        path=str(path),
        summary=model_summary(detector),
        input_size=(h, w),
        quantized=bool(recipe),
        backend=recipe.get("backend") if recipe else None,
        file_bytes=path.stat().st_size,
        sidecar_bytes=sidecar.stat().st_size if sidecar.is_file() else 0,
        state_dict_bytes=state_dict_bytes(detector.model),
        params=count_parameters(detector.model),
        buffers=count_buffers(detector.model),
        compute=compute,
        latency=latency,
        memory=peaks,
    )


def _fmt_ratio(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}x"


# Rows of the side-by-side tables: (metric key, row title, scale, digits).
_ROWS: tuple[tuple[str, str, float, int], ...] = (
    ("mAP", "mAP", 1.0, 4),
    ("latency_median_ms", "latency median ms (batch 1)", 1.0, 2),
    ("latency_p90_ms", "latency p90 ms (batch 1)", 1.0, 2),
    ("images_per_second", "images/s (batch 1)", 1.0, 1),
    ("peak_memory_bytes", "peak forward memory MB (batch 1)", 1e-6, 2),
    ("size_bytes", "size on disk MB", 1e-6, 3),
    ("params", "parameters M", 1e-6, 3),
    ("macs", "GMACs", 1e-9, 3),
    ("bops", "GBOPs", 1e-9, 1),
)


def comparison_rows(labels: Sequence[str], values: Sequence[dict[str, float]]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a metric x model table, each model after the first followed by its ratio."""
    ratios = ratios_to_first(values)
    headers = ["metric", labels[0]]
    for label in labels[1:]:
        headers += [label, f"{label} / {labels[0]}"]
    rows = []
    for key, title, scale, digits in _ROWS:
        if not any(key in v for v in values):
            continue
        row = [title]
        for i, v in enumerate(values):
            value = v.get(key)
            row.append("–" if value is None or math.isnan(value) else f"{value * scale:,.{digits}f}")
            if i:
                row.append(_fmt_ratio(ratios[i].get(key, float("nan"))))
        rows.append(row)
    return headers, rows


def _report_stem(prefix: str, labels: Sequence[str]) -> str:
    safe = [re.sub(r"[^A-Za-z0-9_.-]+", "_", label) for label in labels]
    if len(safe) == 1:
        return f"{prefix}-{safe[0]}"
    more = f"-and-{len(safe) - 2}-more" if len(safe) > 2 else ""
    return f"{prefix}-{safe[0]}-vs-{safe[1]}{more}"


# ------------------------------------------------------------------------------------------ bench
@dataclass(frozen=True)
class BenchConfig:
    model_paths: tuple[Path | None, ...] = (None,)  # None: the embedded default checkpoint
    arch: str | None = None
    labels: Path | None = None
    input_size: int | None = None
    batch_sizes: tuple[int, ...] = (1,)  # batch 1 is always measured
    runs: int = 50
    warmup: int = 10
    threads: int | None = None
    seed: int = 0
    memory: bool = True
    report_name: str | None = None
    out_dir: Path = DEFAULT_REPORTS

    def validate(self) -> list[Path]:
        """Checks the options and that every checkpoint exists; returns the resolved paths."""
        _check_measurement(self.runs, self.warmup, self.threads, self.batch_sizes)
        return _check_paths(ModelConfig(None, self.arch, self.labels, self.input_size), self.model_paths)


@dataclass
class BenchResult:
    models: list[ModelCost]
    values: list[dict[str, float]]  # per model, batch 1
    ratios: list[dict[str, float]]  # per model, to the first
    batch_sizes: tuple[int, ...]
    # label -> qcompress.bench.binary.BinaryEngineReport.as_dict() for models with binary layers
    binary_engine: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.models]


@restores_torch_state
def bench(config: BenchConfig, progress: Progress = no_progress) -> tuple[BenchResult, Report]:
    """``qcompress bench``: latency, peak memory, size, params, MACs/BOPs of each checkpoint, ratios to the first."""
    model_cfg = ModelConfig(None, config.arch, config.labels, config.input_size)
    batch_sizes = tuple(sorted({1, *config.batch_sizes}))
    paths = config.validate()
    check_writable(config.out_dir, "--out-dir", is_dir=True)
    labels = model_labels(paths)
    advance = progress("benchmark", len(paths) + len(batch_sizes))
    detectors = []
    for path in paths:
        detectors.append(_load(model_cfg, path, config.threads))
        advance(1)
    # Every model on the same input, timed round-robin, so machine load falls on all of them alike.
    engines = [(_quantization(d) or {}).get("backend") for d in detectors]
    latencies: dict[int, list[Any]] = {}
    same_size = len({tuple(d.spec.input_size) for d in detectors}) == 1
    for b in batch_sizes if same_size else ():  # different input sizes: each model timed on its own
        h, w = detectors[0].spec.input_size
        with quiet_torch_ao():
            latencies[b] = interleaved_latency([d.model for d in detectors], (b, 3, h, w), config.runs, config.warmup,
                                               config.threads, config.seed, engines)
        advance(1)
    models = [
        measure_model(detector, label, batch_sizes, config.runs, config.warmup, config.threads, config.seed,
                      config.memory, latency={b: latencies[b][i] for b in batch_sizes} if same_size else None)
        for i, (detector, label) in enumerate(zip(detectors, labels))
    ]
    values = [metric_values(m) for m in models]
    result = BenchResult(models, values, ratios_to_first(values), batch_sizes)
    from qcompress.bench.binary import has_binary_layers, measure_binary_engine

    for detector, label in zip(detectors, labels):
        if isinstance(detector.model, torch.nn.Module) and has_binary_layers(detector.model):
            h, w = detector.spec.input_size
            engine = measure_binary_engine(detector.model, (1, 3, h, w), runs=min(config.runs, 20),
                                           threads=config.threads or 1, seed=config.seed)
            result.binary_engine[label] = engine.as_dict()
    report = bench_report(config.report_name or _report_stem("bench", labels), result, config)
    write_report(report, config.out_dir)
    return result, report


def _latency_table(models: Sequence[ModelCost]) -> str:
    rows = []
    for m in models:
        for b, s in m.latency.items():
            peak = m.memory.get(b)
            rows.append([m.label, b, s.median_ms, s.p90_ms, s.min_ms, s.mean_ms, s.median_ms / b,
                         s.images_per_second, s.threads, s.runs, s.warmup,
                         f"{peak.peak_bytes / 1e6:.2f}" if peak else "–"])
    return md_table(["model", "batch", "median ms", "p90 ms", "min ms", "mean ms", "median ms / image", "images/s",
                     "threads", "timed runs", "warm-up", "peak MB"], rows)


def _models_table(models: Sequence[ModelCost]) -> str:
    rows = [[m.label, m.path, m.summary.get("arch"), "x".join(map(str, m.input_size)),
             f"int8 ({m.backend})" if m.quantized else "float32", m.file_bytes, m.sidecar_bytes, m.state_dict_bytes,
             m.params, m.buffers, m.macs, m.bops, f"{m.compute.int8_macs_fraction:.2f}",
             (m.summary.get("sha256") or "")[:12]] for m in models]
    return md_table(["model", "path", "arch", "input (h x w)", "precision (backend)", "file bytes", "sidecar bytes",
                     "state_dict bytes", "params", "buffers", "MACs", "BOPs", "int8 MAC fraction", "sha256"], rows)


def bench_report(name: str, result: BenchResult, config: BenchConfig) -> Report:
    labels = result.labels
    report = Report(name, "Benchmark of " + ", ".join(labels))
    headers, rows = comparison_rows(labels, result.values)
    report.add(f"Comparison (ratios to {labels[0]})", md_table(headers, rows))
    report.add("Latency and peak memory per batch size", _latency_table(result.models))
    report.add("Models", _models_table(result.models))
    report.add("How this was measured", "\n".join([
        (f"- Latency: forward pass of the network only (no decoding/NMS), random input, {config.warmup} warm-up "
         f"runs, then {config.runs} timed runs with the models interleaved run by run; median, p90, min. "
         f"{describe_timing([m.latency[1] for m in result.models])}"),
        "- Peak memory: " + describe_peak_memory(),
        f"- {MACS_NOTE}",
        "- Size on disk: the .pth weights file (the JSON sidecar is listed separately).",
    ]))
    for label, engine in result.binary_engine.items():
        rows = [[e["name"], e["kernel"], e["in_channels"], e["out_channels"], "x".join(map(str, e["out_hw"])),
                 e["engine_ms"], e["fp32_ms"], e["int8_ms"], e["speedup_vs_fp32"], e["speedup_vs_int8"],
                 e["max_abs_diff"]] for e in engine["layers"]]
        report.add(f"Binary engine: {label}", (
            f"Whole network: fp32 simulation {engine['model_fp32_ms']:.1f} ms, bitpacked engine "
            f"{engine['model_engine_ms']:.1f} ms (**{engine['model_speedup'] or float('nan'):.2f}x**, measured; "
            f"{len(engine['converted'])} layers on the engine, {len(engine['skipped'])} left float). Kernel "
            f"`{engine['kernel']}` on {engine['cpu']} "
            f"({', '.join(k for k, v in engine['instruction_sets'].items() if v)}), {engine['threads']} thread.\n\n")
            + md_table(["layer", "kernel", "in", "out", "out hw", "engine ms", "fp32 ms", "int8 ms", "x fp32",
                        "x int8", "max |diff| / scale"], rows))
    report.data.update({
        # The first model with binary layers at the top level (name, kernel, speed-ups, max_abs_diff per
        # layer), every such model by label beside it.
        "binary_engine": ({"model": next(iter(result.binary_engine)), **next(iter(result.binary_engine.values()))}
                          if result.binary_engine else None),
        "binary_engine_by_model": result.binary_engine or None,
        "command": "bench",
        "config": _jsonable(asdict(config)),
        "reference": labels[0],
        "batch_sizes": list(result.batch_sizes),
        "models": [_jsonable(m.as_dict()) for m in result.models],
        "values": _jsonable(dict(zip(labels, result.values))),
        "ratios": _jsonable(dict(zip(labels, result.ratios))),
        "peak_memory_method": describe_peak_memory(),
        "macs_method": MACS_NOTE,
        "seed": config.seed,
        "versions": versions(),
    })
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None  # strict JSON has no NaN (e.g. a ratio to an mAP of 0)
    return value


# ---------------------------------------------------------------------------------------- compare
@dataclass(frozen=True)
class CompareConfig:
    model_paths: tuple[Path | None, ...] = (None,)
    arch: str | None = None
    labels: Path | None = None
    input_size: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    metric: str | None = None  # default: voc07 for VOC data, coco for COCO data
    batch_size: int = 16  # inference batch for the accuracy pass
    gallery: int = 6  # images drawn side by side
    score_threshold: float = 0.4  # detections drawn in the gallery
    ground_truth: bool = True  # a ground-truth panel first in each gallery row
    runs: int = 50
    warmup: int = 10
    threads: int | None = None
    seed: int = 0
    report_name: str | None = None
    out_dir: Path = DEFAULT_REPORTS

    def validate(self) -> list[Path]:
        """Checks the options and that every checkpoint exists; returns the resolved paths."""
        _check_measurement(self.runs, self.warmup, self.threads)
        if self.gallery < 0:
            raise QCompressError(f"--images must be >= 0, got {self.gallery}", "use e.g. --images 6")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise QCompressError(f"--score-threshold must be in [0, 1], got {self.score_threshold}", "use e.g. 0.4")
        return _check_paths(ModelConfig(None, self.arch, self.labels, self.input_size), self.model_paths)


@dataclass
class CompareResult:
    models: list[ModelCost]
    accuracy: list[EvalResult]
    values: list[dict[str, float]]
    ratios: list[dict[str, float]]
    gallery: list[Path]  # written images, in gallery order
    image_ids: list[str]

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.models]


def _gallery_picks(detections: Sequence[Sequence[Detections]], wanted: int, threshold: float) -> list[int]:
    """Images worth looking at when there are no labels: half with the most detections of the first
    (reference) model, half where the models disagree most in how many objects they find."""
    if wanted <= 0 or not detections or not detections[0]:
        return []

    def count(d: Detections) -> int:
        return int((d.scores >= threshold).sum())

    reference = [count(d) for d in detections[0]]
    disagreement = [sum(abs(count(dets[i]) - reference[i]) for dets in detections[1:]) for i in range(len(reference))]
    busiest = sorted(range(len(reference)), key=lambda i: (-reference[i], i))
    differing = sorted(range(len(reference)), key=lambda i: (-disagreement[i], -reference[i], i))
    picks: list[int] = []
    for i in [j for pair in zip(busiest, differing) for j in pair]:
        if i not in picks:
            picks.append(i)
        if len(picks) == min(wanted, len(reference)):
            break
    return picks


def gallery_indices(count: int, wanted: int) -> list[int]:
    """``wanted`` positions spread evenly over ``count`` images (all of them when there are fewer)."""
    if wanted <= 0 or count <= 0:
        return []
    if wanted >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / (wanted - 1)) for i in range(wanted)}) if wanted > 1 else [0]


@restores_torch_state
def compare(config: CompareConfig, progress: Progress = no_progress) -> tuple[CompareResult, Report]:
    """``qcompress compare``: mAP, latency and size of each checkpoint on the same images, one report,
    with a gallery of those images showing each model's detections side by side."""
    from qcompress.reports.draw import draw_boxes, draw_detections, side_by_side

    model_cfg = ModelConfig(None, config.arch, config.labels, config.input_size)
    paths = config.validate()
    check_writable(config.out_dir, "--out-dir", is_dir=True)
    labels = model_labels(paths)
    metric = config.metric or ("coco" if config.data.dataset == "coco" else "voc07")

    dataset = None
    class_names: tuple[str, ...] = ()
    models, accuracy, all_detections = [], [], []
    unlabelled = False
    for path, label in zip(paths, labels):
        detector = _load(model_cfg, path)
        if dataset is None:
            class_names = detector.class_names
            dataset = load_dataset(config.data, class_names)
        elif tuple(detector.class_names) != tuple(class_names):
            raise QCompressError(
                f"{path.name} has other classes than {paths[0].name}: {list(detector.class_names)} vs {list(class_names)}",
                "compare checkpoints trained on the same label set",
            )
        _use_backend(detector)
        with quiet_torch_ao():
            result, detections = evaluate_detector(
                detector, dataset, metric, config.data.limit, config.batch_size, progress, description=f"eval {label}"
            )
        if not all_detections and result.num_objects == 0:
            unlabelled = True  # no labels for these classes: score fidelity to the first model instead
        if unlabelled:
            result, _ = evaluate_fidelity(detector, detector, dataset, config.data.limit,
                                          detections=detections,
                                          reference_detections=all_detections[0] if all_detections else detections)
        accuracy.append(result)
        all_detections.append(detections)
        models.append(measure_model(detector, label, (1,), config.runs, config.warmup, config.threads, config.seed))
        del detector

    picks = _gallery_picks(all_detections, config.gallery, config.score_threshold) if unlabelled else \
        gallery_indices(len(all_detections[0]), config.gallery)
    gallery_dir_name = None
    gallery: list[Path] = []
    image_ids: list[str] = []
    name = config.report_name or _report_stem("compare", labels)
    if picks:
        gallery_dir_name = f"{name}_images"
        folder = Path(config.out_dir) / gallery_dir_name
        for row, index in enumerate(picks):
            image = dataset.load_image(index)
            image_id = str(dataset.image_id(index))
            panels, titles = [], []
            ann = dataset.annotation(index)
            if config.ground_truth and not unlabelled and len(ann.labels):
                panels.append(draw_boxes(image, ann.boxes, ann.labels.tolist(), class_names))
                titles.append("ground truth")
            for label, result, dets in zip(labels, accuracy, all_detections):
                panels.append(draw_detections(image, dets[index], class_names, config.score_threshold))
                what = "fidelity AP50" if unlabelled else "mAP"
                titles.append(f"{label} ({what} {result.mAP:.3f})" if result.mAP == result.mAP else label)
            out = folder / f"{row + 1:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', image_id)}.jpg"
            _save_image(side_by_side(panels, titles), out)
            gallery.append(out)
            image_ids.append(image_id)

    values = [metric_values(m, a) for m, a in zip(models, accuracy)]
    result = CompareResult(models, accuracy, values, ratios_to_first(values), gallery, image_ids)
    report = compare_report(name, result, config, metric, gallery_dir_name)
    write_report(report, config.out_dir)
    return result, report


def _save_image(image, path: Path, quality: int = 90) -> None:
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))


def compare_report(
    name: str, result: CompareResult, config: CompareConfig, metric: str, gallery_dir: str | None
) -> Report:
    labels = result.labels
    report = Report(name, "Comparison of " + " | ".join(labels))
    headers, rows = comparison_rows(labels, result.values)
    first = result.accuracy[0]
    report.add(
        f"Side by side (ratios to {labels[0]})",
        md_table(headers, rows)
        + (f"\n\nNo labels for the models' classes in these images: accuracy is fidelity AP50 against "
           f"{labels[0]}'s own detections (score >= 0.5, {first.num_objects} boxes) on {first.num_images} images"
           if first.metric == "fidelity-AP50" else
           f"\n\nmAP: {metric} on {first.num_images} images ({first.num_objects} objects) of {config.data.dataset}"
           f" split {config.data.split}")
        + f". Latency: batch 1, {config.warmup} warm-up + {config.runs} timed runs,"
        f" {result.models[0].latency[1].threads} thread{'s' if result.models[0].latency[1].threads != 1 else ''}.",
    )
    classes = sorted(first.ap_per_class)
    ap_headers = ["class"] + labels
    ap_rows = [[c] + [a.ap_per_class.get(c, float("nan")) for a in result.accuracy] for c in classes]
    report.add("Per-class AP", md_table(ap_headers, ap_rows))
    if result.gallery:
        with_truth = config.ground_truth and first.metric != "fidelity-AP50"
        what = ("ground truth (where the image has labels) | " if with_truth else "") + " | ".join(labels)
        lines = [f"Panels: {what}. Detections with score >= {config.score_threshold} are drawn.", ""]
        for path, image_id in zip(result.gallery, result.image_ids):
            lines += [f"**{image_id}**", "", f"![{image_id}]({gallery_dir}/{path.name})", ""]
        report.add("Detections on the same images", "\n".join(lines))
    report.add("Models", _models_table(result.models))
    report.data.update({
        "command": "compare",
        "config": _jsonable(asdict(config)),
        "metric": first.metric,
        "reference": labels[0],
        "models": [
            _jsonable({**m.as_dict(), "accuracy": asdict(a)}) for m, a in zip(result.models, result.accuracy)
        ],
        "values": _jsonable(dict(zip(labels, result.values))),
        "ratios": _jsonable(dict(zip(labels, result.ratios))),
        "gallery": [
            {"image_id": i, "file": f"{gallery_dir}/{p.name}"} for p, i in zip(result.gallery, result.image_ids)
        ],
        "peak_memory_method": describe_peak_memory(),
        "macs_method": MACS_NOTE,
        "seed": config.seed,
        "versions": versions(),
    })
    return report


# ----------------------------------------------------------------------------------------- detect
def detect_image(
    detector: Detector, image_path: Path, out_path: Path, score_threshold: float = 0.4
) -> Detections:
    """Run ``detector`` on one image file, draw its detections scoring at least ``score_threshold``
    and save the picture to ``out_path``; returns those detections (pixel boxes of the image)."""
    from qcompress.data.images import decode_image
    from qcompress.reports.draw import draw_detections

    if not 0.0 <= score_threshold <= 1.0:
        raise QCompressError(f"--score-threshold must be in [0, 1], got {score_threshold}", "use e.g. 0.4")
    out_path = Path(out_path)
    if out_path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
        raise QCompressError(f"cannot tell the image format of {out_path}", "end --out with .jpg or .png")
    image = decode_image(Path(image_path))
    _use_backend(detector)
    with quiet_torch_ao():
        detections = detector.detect([image])[0]
    keep = detections.scores >= score_threshold
    kept = Detections(detections.boxes[keep], detections.labels[keep], detections.scores[keep])
    _save_image(draw_detections(image, kept, detector.class_names), out_path, quality=95)
    return kept


__all__ = [
    "BenchConfig",
    "BenchResult",
    "CompareConfig",
    "CompareResult",
    "ModelCost",
    "bench",
    "compare",
    "detect_image",
    "gallery_indices",
    "measure_model",
    "metric_values",
    "model_labels",
    "ratio",
    "ratios_to_first",
]
