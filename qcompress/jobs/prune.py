"""``qcompress prune``: load, prune (unstructured or channels), optionally fine-tune, measure, save, report.

Mirrors :func:`qcompress.api.quantize`: a frozen config in, ``(PruneResult, Report)`` out, nothing
printed. Before/after numbers: mAP (right after pruning, and after fine-tuning), parameters
(total and non-zero), MACs per image, size on disk (raw and zlib-compressed), batch-1 latency.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcompress import core
from qcompress.bench.latency import describe_timing
from qcompress.core import DataConfig, EvalResult, ModelConfig, Progress, no_progress
from qcompress.core.checkpoints import save_detector, versions
from qcompress.core.context import restores_torch_state
from qcompress.defaults import DEFAULT_REPORTS
from qcompress.errors import QCompressError
from qcompress.io_utils import check_writable, read_json, write_json_atomic
from qcompress.jobs.onnx_latency import eager_and_onnx_latency, onnx_rows
from qcompress.models.detector import Detector
from qcompress.reports import Report, check_report_target, md_table, write_report
from qcompress.torch_state import torch_state
from qcompress.training.distill import DistillConfig

METHODS = ("l1-unstructured", "channels")


@dataclass(frozen=True)
class PruneJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: str = "l1-unstructured"  # l1-unstructured | channels
    amount: float = 0.2  # fraction of weights (unstructured) or of each group's channels (channels)
    scope: str = "global"  # unstructured: global | layer
    criterion: str = "l1"  # channels: l1 | l2 norm importance
    round_to: int = 16  # channels: kept widths rounded to a multiple (16 = one AVX-512 fp32 vector; measured)
    include_residual: bool = False  # channels: also prune residual-coupled block outputs as one group each
    amounts_file: Path | None = None  # JSON {layer or group name (or glob): amount}
    finetune_epochs: int = 0
    teacher: str | Path | None = None  # fine-tune with a teacher: "parent" or a float checkpoint (see training.distill)
    distill: DistillConfig = field(default_factory=DistillConfig)
    bn_reestimate: bool = False  # recompute BN statistics after fine-tuning (opt-in: see QATJobConfig.bn_reestimate)
    lr: float = 1e-3
    finetune_split: str = "train"
    finetune_batch_size: int = 16
    train_limit: int | None = None  # fine-tune on the first N training images only (smoke runs)
    sensitivity: bool = False  # analyse only: prune each target alone, tabulate the mAP drop, save nothing
    sensitivity_amounts: tuple[float, ...] | None = None  # default: (0.2, 0.4, 0.6) channels, (0.3, 0.6, 0.9) unstructured
    sensitivity_max_drop: float = 0.01  # suggested amount: largest with mAP drop <= this
    evaluate: bool = True
    out: Path | None = None  # default: trained_models/pruned/<parent>-<method>-<amount>.pth
    latency_runs: int = 20
    threads: int | None = None
    seed: int = 0
    report_name: str | None = None
    out_dir: Path = DEFAULT_REPORTS
    # Also export parent and pruned model to temporary .onnx files and time them in ONNX Runtime (threads or 1).
    onnx_latency: bool = True

    @property
    def bn_frozen_at_end(self) -> bool:
        """Pseudo-labelled images are not the parent's training distribution: fine-tuning keeps its BN statistics."""
        return self.data.pseudo_labels is not None


@dataclass
class ModelStats:
    params: int
    nonzero_params: int
    macs: int
    bytes: int
    compressed_bytes: int  # zlib level 6 of the weights file: where unstructured zeros pay off
    latency: Any  # bench.latency.LatencyStats
    eval: EvalResult | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params, "nonzero_params": self.nonzero_params, "macs": self.macs, "bytes": self.bytes,
            "compressed_bytes": self.compressed_bytes, "latency": self.latency.as_dict() if self.latency else None,
            "eval": asdict(self.eval) if self.eval else None,
        }


@dataclass
class PruneResult:
    method: str
    amount: float
    out: Path | None
    recipe: dict[str, Any]
    before: ModelStats | None = None
    pruned: ModelStats | None = None  # right after pruning (eval before fine-tuning)
    finetuned_eval: EvalResult | None = None
    layers: dict[str, Any] = field(default_factory=dict)  # per-layer sparsity or per-group widths
    skipped: dict[str, str] = field(default_factory=dict)
    finetune_history: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: Any = None  # prune.sensitivity.SensitivityResult
    amounts_out: Path | None = None
    timing: Any = None  # jobs.onnx_latency.EagerAndOnnxLatency: eager and ONNX Runtime latencies of both
    teacher: dict[str, Any] | None = None
    bn_reestimation: dict[str, Any] = field(default_factory=dict)

    @property
    def final_eval(self) -> EvalResult | None:
        return self.finetuned_eval or (self.pruned.eval if self.pruned else None)


# ----------------------------------------------------------------------------------- validation
def _validate(config: PruneJobConfig) -> None:
    if config.method not in METHODS:
        raise QCompressError(f"unknown pruning method {config.method!r}", f"use --method {' or '.join(METHODS)}")
    if not (isinstance(config.amount, (int, float)) and 0.0 <= config.amount < 1.0):
        raise QCompressError(f"--amount must be in [0, 1), got {config.amount}", "e.g. --amount 0.2 removes 20%")
    if config.scope not in ("global", "layer"):
        raise QCompressError(f"unknown --scope {config.scope!r}", "use --scope global or --scope layer")
    if config.criterion not in ("l1", "l2"):
        raise QCompressError(f"unknown --criterion {config.criterion!r}", "use --criterion l1 or l2")
    if config.train_limit is not None and config.train_limit < 1:
        raise QCompressError(f"--train-limit must be positive, got {config.train_limit}",
                             "omit it to fine-tune on every image")
    if config.finetune_epochs < 0:
        raise QCompressError(f"--finetune-epochs must be >= 0, got {config.finetune_epochs}", "0 skips fine-tuning")
    if config.finetune_epochs and not (config.lr > 0 and math.isfinite(config.lr)):
        raise QCompressError(f"--lr must be positive, got {config.lr}", "e.g. --lr 1e-3")
    if config.latency_runs < 1:
        raise QCompressError(f"--runs must be >= 1, got {config.latency_runs}", "e.g. --runs 20")
    if config.round_to < 0:
        raise QCompressError(f"--round-to must be >= 0, got {config.round_to}", "0 or 1 disables rounding")
    if config.teacher is not None:
        if not config.finetune_epochs:
            raise QCompressError("--teacher needs --finetune-epochs (the teacher guides fine-tuning)",
                                 "add --finetune-epochs 1, or drop --teacher")
        config.distill.validate()
    if config.method == "l1-unstructured" and config.amounts_file and config.scope == "global":
        raise QCompressError("--amounts-file needs --scope layer with l1-unstructured", "global scope has one threshold")


def read_amounts(path: Path | None) -> dict[str, float]:
    """``{name or glob: amount}`` from a JSON file; every amount in [0, 1)."""
    if path is None:
        return {}
    data = read_json(Path(path), "amounts file")
    if isinstance(data, Mapping) and isinstance(data.get("amounts"), Mapping):
        data = data["amounts"]  # also accept a sensitivity report's suggestion file as a whole
    if not isinstance(data, Mapping):
        raise QCompressError(f"amounts file {path} is not a JSON object", 'write {"layer name": 0.3, ...}')
    amounts = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise QCompressError(f"amount for {key!r} in {path} must be a number in [0, 1), got {value!r}", "e.g. 0.3")
        amounts[str(key)] = float(value)
    return amounts


def _check_keys(amounts: Mapping[str, float], names: Sequence[str], what: str) -> None:
    import fnmatch

    unknown = [k for k in amounts if k not in names and not any(fnmatch.fnmatchcase(n, k) for n in names)]
    if unknown:
        raise QCompressError(
            f"amounts file names {len(unknown)} unknown {what} (e.g. {unknown[0]!r})",
            f"use names such as {', '.join(list(names)[:3])} (see `qcompress prune --sensitivity`)",
        )


# ------------------------------------------------------------------------------------- measuring
def _compressed_size(path: Path) -> int:
    return len(zlib.compress(Path(path).read_bytes(), 6))


def _stats(model: torch.nn.Module, input_size: Sequence[int], path: Path, latency: Any,
           evaluation: EvalResult | None) -> ModelStats:
    from qcompress.bench.size import count_macs, count_parameters

    h, w = input_size
    return ModelStats(
        params=count_parameters(model),
        nonzero_params=count_parameters(model, nonzero=True),
        macs=count_macs(model, (1, 3, h, w)).macs,
        bytes=Path(path).stat().st_size,
        compressed_bytes=_compressed_size(path),
        latency=latency,
        eval=evaluation,
    )


def _export_sample(detector: Detector, dataset: Any, example: torch.Tensor, count: int = 8) -> torch.Tensor:
    """Images an ONNX export is verified on: the first test images, else the random example."""
    if dataset is None or len(dataset) == 0:
        return example
    return torch.stack([detector.preprocess(dataset.load_image(i)) for i in range(min(count, len(dataset)))])


def _metric(config: PruneJobConfig) -> str:
    if config.data.pseudo_labels is not None:
        return "voc"  # fidelity AP: area AP at IoU 0.5 against the parent's detections
    return "coco" if config.data.dataset == "coco" else "voc07"


# ------------------------------------------------------------------------------------ the command
@restores_torch_state
def prune(config: PruneJobConfig, progress: Progress = no_progress) -> tuple[PruneResult, Report]:
    """``qcompress prune``: prune a float checkpoint, measure it against its parent, save it (unless --sensitivity).

    ``config.threads`` (if set) is the torch intra-op thread count for the whole job, restored afterwards.
    """

    _validate(config)
    check_writable(config.out_dir, "--out-dir", is_dir=True)
    from qcompress.training import distributed

    # torchrun: fine-tuning runs data-parallel; rank 0 alone saves and reports (the others return None, None).
    with distributed.session() as main, torch_state(config.threads):
        return _prune(config, progress if main else no_progress, main)


def _prune(config: PruneJobConfig, progress: Progress, main: bool = True) -> tuple[PruneResult, Report]:
    amounts = read_amounts(config.amounts_file)
    parent_path = core.resolve_model_path(config.model)
    detector = core.load_model(config.model)
    sidecar = (detector.source.get("sidecar") or {}) if hasattr(detector, "source") else {}
    if sidecar.get("quantization"):
        raise QCompressError(f"{parent_path} is quantized; prune its float parent", "then quantize the pruned model")
    torch.manual_seed(config.seed)
    h, w = detector.spec.input_size
    example = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(config.seed))
    if config.sensitivity:
        return _sensitivity(config, detector, example, amounts, progress)

    out = core.derived_output(parent_path, config.out, f"{config.method}-{config.amount:g}", "pruned")
    name = config.report_name or f"prune-{out.stem}"
    check_report_target(config.out_dir, name, [out])
    test_set = core.load_dataset(config.data, detector.class_names, reference=detector) if config.evaluate else None

    def evaluate(det: Detector, description: str) -> EvalResult | None:
        if test_set is None:
            return None
        res, _ = core.evaluate_detector(det, test_set, _metric(config), config.data.limit, progress=progress,
                                       description=description)
        if config.data.pseudo_labels is not None:
            res.metric = "fidelity-AP50"  # area AP at IoU 0.5 against the fp32 parent's detections
        return res

    parent_eval = evaluate(detector, "eval parent")

    model = copy.deepcopy(detector.model).eval()
    pruned = detector.with_model(model)
    pruned.source = detector.source
    recipe: dict[str, Any] = {"step": "prune", "method": config.method, "amount": config.amount, "seed": config.seed}
    result = PruneResult(config.method, config.amount, out, recipe)
    if config.method == "channels":
        from qcompress.prune.channels import find_channel_groups, prune_channels
        from qcompress.quant.parts import make_functional_ops_quantizable

        # torchvision blocks share one ReLU module and add in place; their FloatFunctional twins
        # (same parameters and state_dict keys) expose every channel dependency to the tracer.
        make_functional_ops_quantizable(model)

        if amounts:
            groups = find_channel_groups(model, example)
            _check_keys(amounts, [n for g in groups for n in (g.name, *g.members)], "layers or groups")
        record = prune_channels(model, example, config.amount, config.criterion, amounts, config.round_to,
                                config.include_residual)
        result.layers = record.groups
        result.skipped = record.skipped
        recipe.update({"criterion": config.criterion, "round_to": config.round_to,
                       "include_residual": config.include_residual, "amounts": amounts,
                       "widths": {name: [g["before"], g["after"]] for name, g in record.groups.items()},
                       "channels_requested": record.requested, "channels_removed": record.achieved,
                       "shortfall": record.shortfall})
    else:
        from qcompress.prune.magnitude import apply_unstructured, prunable_layers

        if amounts:
            _check_keys(amounts, list(prunable_layers(model)), "layers")
        record = apply_unstructured(model, config.amount, config.scope, amounts)
        result.layers = record.layers
        recipe.update({"scope": config.scope, "amounts": amounts, "sparsity": record.sparsity,
                       "layers_pruned": len(record.layers)})
    pruned_eval = evaluate(pruned, "eval pruned")

    if config.finetune_epochs:
        result.finetune_history, result.teacher, result.bn_reestimation = _finetune(
            config, pruned, progress, parent=detector, parent_path=parent_path)
        if not main:  # torchrun: rank 0 evaluates, saves and reports
            return None, None  # type: ignore[return-value]
        recipe.update({"finetune_epochs": config.finetune_epochs, "lr": config.lr, "finetune_split": config.finetune_split,
                       "teacher": result.teacher, "bn_reestimation": result.bn_reestimation})
        result.finetuned_eval = evaluate(pruned, "eval fine-tuned")
    if config.method == "l1-unstructured":
        from qcompress.prune.magnitude import make_permanent, prunable_layers, sparsity_record

        make_permanent(model)
        final = sparsity_record(prunable_layers(model), config.scope, config.amount)
        result.layers, recipe["sparsity"] = final.layers, final.sparsity
    model.eval()
    save_detector(pruned, out, parent=parent_path, pruned=config.method == "channels", compression=[recipe])
    timing = eager_and_onnx_latency(
        [detector, pruned], _export_sample(detector, test_set, example), engines=[None, None],
        runs=config.latency_runs, threads=config.threads, seed=config.seed, onnx=config.onnx_latency,
        onnx_threads=config.threads or 1)
    parent_latency, pruned_latency = timing.eager
    result.timing = timing
    result.before = _stats(detector.model, (h, w), parent_path, parent_latency, parent_eval)
    result.pruned = _stats(model, (h, w), out, pruned_latency, pruned_eval)
    report = prune_report(name, detector, result, config)
    write_report(report, config.out_dir)
    return result, report


def _finetune(config: PruneJobConfig, detector: Detector, progress: Progress, parent: Detector, parent_path: Path,
              ) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, Any]]:
    """Fine-tune the pruned ``detector`` in place; returns (history, teacher summary, BN re-estimation)."""
    from qcompress.jobs.finetune import reestimate_bn_after_training, teacher_distiller
    from qcompress.training.loop import TrainConfig, train_detector

    train_set = core.load_dataset(config.data, detector.class_names, config.finetune_split, reference=parent)
    if len(train_set) == 0:
        raise QCompressError(f"no images in split {config.finetune_split!r} to fine-tune on", "pass --finetune-epochs 0")
    if config.train_limit:
        train_set = core.Subset(train_set, core.limited_indices(train_set, config.train_limit))
    train_cfg = TrainConfig(
        epochs=config.finetune_epochs, batch_size=min(config.finetune_batch_size, len(train_set)), lr=config.lr,
        warmup_epochs=min(1.0, 0.2 * config.finetune_epochs), seed=config.seed, threads=config.threads,
        eval_limit=None,
        freeze_bn=config.bn_frozen_at_end,
    )
    steps = max(1, len(train_set) // train_cfg.batch_size)
    bars: dict[int, Any] = {}

    def on_step(epoch: int, step: int, steps_per_epoch: int, stats: dict[str, float]) -> None:
        if epoch not in bars:
            bars[epoch] = progress(f"fine-tune epoch {epoch + 1}/{config.finetune_epochs}", steps_per_epoch or steps)
        bars[epoch](1)

    h, w = detector.spec.input_size
    distiller, teacher_info = teacher_distiller(config.teacher, config.distill, detector, detector.model, parent,
                                                parent_path, torch.zeros(1, 3, h, w))
    result = train_detector(detector, train_set, train_cfg, on_step=on_step, distiller=distiller,
                            model=distiller)
    if distiller is not None:
        distiller.detach_hooks()
    detector.model.eval()
    bn = reestimate_bn_after_training(
        config, detector.model,
        lambda: core.calibration_batches(detector, train_set, min(200, len(train_set)), config.seed))
    return result.history, teacher_info, bn


# ----------------------------------------------------------------------------------- sensitivity
def _sensitivity(config: PruneJobConfig, detector: Detector, example: torch.Tensor, amounts: Mapping[str, float],
                 progress: Progress) -> tuple[PruneResult, Report]:
    from qcompress.prune.sensitivity import sensitivity_scan

    channels = config.method == "channels"
    levels = config.sensitivity_amounts or ((0.2, 0.4, 0.6) if channels else (0.3, 0.6, 0.9))
    for level in levels:
        if not 0.0 <= level < 1.0:
            raise QCompressError(f"sensitivity amounts must be in [0, 1), got {level}", "e.g. 0.2 0.4 0.6")
    model = detector.model.eval()
    if channels:
        from qcompress.prune.channels import apply_pruning, find_channel_groups, plan_pruning

        groups = {g.name: g for g in find_channel_groups(model, example)
                  if config.include_residual or not g.residual}
        targets = list(groups)

        def prune_one(trial: torch.nn.Module, target: str, amount: float) -> None:
            group = groups[target]
            plan, _ = plan_pruning(trial, [group], amount, config.criterion, None, config.round_to, True)
            apply_pruning(trial, [group], plan)
    else:
        from torch.nn.utils import prune as torch_prune

        from qcompress.prune.magnitude import prunable_layers

        targets = list(prunable_layers(model))

        def prune_one(trial: torch.nn.Module, target: str, amount: float) -> None:
            layer = trial.get_submodule(target)
            torch_prune.l1_unstructured(layer, "weight", amount=amount)
            torch_prune.remove(layer, "weight")

    score = _cached_scorer(config, detector, progress)
    advance = progress("sensitivity trials", len(targets) * len(levels))
    scan = sensitivity_scan(model, targets, levels, prune_one, score, on_trial=lambda *a: advance(1))
    name = config.report_name or f"prune-sensitivity-{Path(detector.source['path']).stem}-{config.method}"
    suggestion = scan.suggest(config.sensitivity_max_drop)
    amounts_out = Path(config.out_dir) / f"{name}-amounts.json"
    write_json_atomic(amounts_out, suggestion)
    recipe = {"step": "prune-sensitivity", "method": config.method, "amounts": list(levels),
              "max_drop": config.sensitivity_max_drop}
    result = PruneResult(config.method, config.amount, None, recipe, sensitivity=scan, amounts_out=amounts_out)
    report = sensitivity_report(name, detector, result, config)
    write_report(report, config.out_dir)
    return result, report


def _cached_scorer(config: PruneJobConfig, detector: Detector, progress: Progress):
    """mAP of a network on the evaluation images, decoded and preprocessed once for every trial."""
    dataset = core.load_dataset(config.data, detector.class_names)
    indices = core.limited_indices(dataset, config.data.limit)
    advance = progress("decode images", len(indices))
    images, sizes = [], []
    for i in indices:
        image = dataset.load_image(i)
        images.append(detector.preprocess(image))
        sizes.append(tuple(image.shape[:2]))
        advance(1)
    batch = 16
    metric = _metric(config)

    def score(model: torch.nn.Module) -> float:
        model.eval()
        detections = []
        with torch.inference_mode():
            for start in range(0, len(images), batch):
                raw = model(torch.stack(images[start:start + batch]))
                detections.extend(detector.postprocess(raw, sizes[start:start + batch]))
        return core.score_detections(dataset, indices, detections, metric)[0]

    return score


# --------------------------------------------------------------------------------------- reports
def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def prune_report(name: str, detector: Detector, r: PruneResult, config: PruneJobConfig) -> Report:
    parent = Path(detector.source["path"]).name
    amounts = r.recipe.get("amounts") or {}
    if amounts:
        shown = f"{r.amount:g}; per-layer amounts from {config.amounts_file.name if config.amounts_file else 'a file'}: " \
                f"{min(amounts.values()):g}-{max(amounts.values()):g}"
    else:
        shown = f"{r.amount:g}"
    report = Report(name, f"{r.method} pruning ({shown}) of {parent}")
    b, p = r.before, r.pruned
    rows = []
    if b.eval and p.eval:
        metric = b.eval.metric
        label = metric if metric == "fidelity-AP50" else f"mAP ({metric})"
        rows.append([f"{label} right after pruning", b.eval.mAP, p.eval.mAP, _ratio(p.eval.mAP, b.eval.mAP)])
        if r.finetuned_eval:
            rows.append([f"{label} after {config.finetune_epochs} fine-tune epoch(s)", b.eval.mAP,
                         r.finetuned_eval.mAP, _ratio(r.finetuned_eval.mAP, b.eval.mAP)])
    rows += [
        ["parameters", b.params, p.params, _ratio(p.params, b.params)],
        ["non-zero parameters", b.nonzero_params, p.nonzero_params, _ratio(p.nonzero_params, b.nonzero_params)],
        ["MACs per image", b.macs, p.macs, _ratio(p.macs, b.macs)],
        ["size on disk bytes", b.bytes, p.bytes, _ratio(p.bytes, b.bytes)],
        ["size zlib-compressed bytes", b.compressed_bytes, p.compressed_bytes, _ratio(p.compressed_bytes, b.compressed_bytes)],
        ["latency median ms (batch 1), torch eager", b.latency.median_ms, p.latency.median_ms,
         _ratio(p.latency.median_ms, b.latency.median_ms)],
        ["latency p90 ms, torch eager", b.latency.p90_ms, p.latency.p90_ms, _ratio(p.latency.p90_ms, b.latency.p90_ms)],
        *(onnx_rows(r.timing) if r.timing else []),
    ]
    timed = [b.latency, p.latency, *(r.timing.timed_onnx() if r.timing else [])]
    note = (f"\n\nLatency: {describe_timing(timed)} {r.timing.describe() if r.timing else ''} "
            f"Input {tuple(detector.spec.input_size)}.")
    if r.method == "l1-unstructured":
        note += ("\n\nUnstructured pruning zeroes weights but keeps every tensor dense: parameters, MACs, size on "
                 "disk and dense latency do not change (any latency difference above is measurement noise). "
                 "The gain is in non-zero parameters and compressed size, and for sparse kernels.")
    report.add("Before vs after", md_table(["", "parent", "pruned", "pruned / parent"], rows) + note)
    if b.eval and r.final_eval:
        final = r.final_eval
        if b.eval.metric == "fidelity-AP50":
            report.add("Fidelity (pseudo labels)", (
                f"No labels: the parent's detections with score >= {config.data.pseudo_labels} on the first "
                f"{b.eval.num_images} images are the ground truth ({b.eval.num_objects} boxes); the values are AP50 "
                "against them (fidelity; the parent scores 1.0 by construction). The images after those "
                "fine-tuned the pruned model."))
        report.add("Per-class fidelity AP50" if b.eval.metric == "fidelity-AP50" else "Per-class AP", md_table(
            ["class", "parent", "pruned" + (" + fine-tune" if r.finetuned_eval else ""), "delta"],
            [[c, b.eval.ap_per_class[c], final.ap_per_class.get(c, float("nan")),
              final.ap_per_class.get(c, float("nan")) - b.eval.ap_per_class[c]] for c in sorted(b.eval.ap_per_class)]))
    if r.method == "channels":
        report.add("Channel groups (width before -> after)", md_table(
            ["group", "before", "after", "kept", "layers"],
            [[g, v["before"], v["after"], _ratio(v["after"], v["before"]), len(v["members"])] for g, v in r.layers.items()]))
        if r.skipped:
            report.add("Groups left unpruned", md_table(["group", "reason"], sorted(r.skipped.items())))
        if r.recipe.get("channels_requested") is not None:
            report.add("Requested vs removed", (
                f"The amount asked for {r.recipe['channels_requested']:.1%} of all conv output channels; "
                f"{r.recipe['channels_removed']:.1%} were removed."
                + (f" **Far less than requested:** {r.recipe['shortfall']}" if r.recipe.get("shortfall") else "")))
    else:
        report.add("Per-layer sparsity", md_table(
            ["layer", "weights", "zeros", "sparsity"],
            [[n, v["weights"], v["zeros"], v["sparsity"]] for n, v in r.layers.items()]))
    if r.finetune_history:
        from qcompress.jobs.finetune import mask_words

        kd = r.teacher is not None
        report.add("Fine-tuning", md_table(
            ["epoch", "regression loss", "classification loss",
             *(["imitation loss", "output distillation"] if kd else []), "seconds"],
            [[h["epoch"], h["regression_loss"], h["classification_loss"],
              *([h.get("imitation_loss"), h.get("output_distill_loss")] if kd else []), h["seconds"]]
             for h in r.finetune_history])
            + (f"\n\nTeacher {Path(r.teacher['teacher']).name}: fine-grained feature imitation (weight "
               f"{r.teacher['imitation']:g}{mask_words(r.teacher)}) at "
               f"{r.teacher.get('imitated', ', '.join(r.teacher['feature_taps']))}; "
               f"output distillation weight {r.teacher['outputs']:g}; the 1x1 adapters of pruned (narrower) levels "
               "start as the least-squares map from the pruned to the parent's features of the first training batch."
               if kd else "")
            + ("\n\nBN re-estimation: " + (f"skipped ({r.bn_reestimation['skipped']})." if "skipped" in r.bn_reestimation
               else f"{r.bn_reestimation['layers']} layers on {r.bn_reestimation['images']} training images.")
               if r.bn_reestimation else ""))
    report.add("Recipe", md_table(["field", "value"], [[k, v] for k, v in r.recipe.items() if k != "widths"]))
    report.data.update({
        "command": "prune",
        "model": core.model_summary(detector),
        "out": str(r.out),
        "method": r.method,
        "amount": r.amount,
        "recipe": r.recipe,
        "before": b.as_dict(),
        "pruned": p.as_dict(),
        "finetuned": asdict(r.finetuned_eval) if r.finetuned_eval else None,
        "finetune_history": r.finetune_history,
        "data": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config.data).items()},
        "latency_ratio": _ratio(p.latency.median_ms, b.latency.median_ms),
        "latency_runtime": "torch eager (before.latency, pruned.latency); onnxruntime (ort_parent_latency, "
                           "ort_pruned_latency)",
        "ort_parent_latency": r.timing.onnx_json(0) if r.timing else None,
        "ort_pruned_latency": r.timing.onnx_json(1) if r.timing else None,
        "macs_ratio": _ratio(p.macs, b.macs),
        "params_ratio": _ratio(p.params, b.params),
        "mAP_ratio": _ratio(r.final_eval.mAP, b.eval.mAP) if (b.eval and r.final_eval) else None,
        "layers": r.layers,
        "skipped": r.skipped,
        "seed": config.seed,
        "versions": versions(),
    })
    return report


def sensitivity_report(name: str, detector: Detector, r: PruneResult, config: PruneJobConfig) -> Report:
    scan = r.sensitivity
    what = "channel group" if r.method == "channels" else "layer"
    report = Report(name, f"Pruning sensitivity ({r.method}) of {Path(detector.source['path']).name}")
    report.add("Baseline", f"{_metric(config)} mAP of the unpruned model: {scan.baseline:.4f} "
                           f"on {config.data.limit or 'all'} images of split {config.data.split!r}.")
    report.add(f"mAP drop when one {what} alone is pruned (most sensitive first)", md_table(
        [what, *[f"drop at {a:g}" for a in scan.amounts]], scan.rows()))
    suggestion = scan.suggest(config.sensitivity_max_drop)
    report.add("Suggested amounts", f"Largest tested amount with a drop of at most {config.sensitivity_max_drop:g} "
               f"mAP, written to `{r.amounts_out}` (use it with `--amounts-file`"
               + (" --scope layer" if r.method != "channels" else "") + ").\n\n"
               + md_table([what, "amount"], sorted(suggestion.items()))
               + f"\n\n**Each amount was measured with that {what} pruned alone.** Applied together the drops add "
               "up and interact: measure the combination with `qcompress prune --amounts-file` before trusting it "
               "(and fine-tune).")
    report.data.update({
        "command": "prune --sensitivity",
        "model": core.model_summary(detector),
        "method": r.method,
        "baseline_mAP": scan.baseline,
        "amounts": list(scan.amounts),
        "scores": {t: {str(a): s for a, s in row.items()} for t, row in scan.scores.items()},
        "drops": {t: {str(a): d for a, d in row.items()} for t, row in scan.drops().items()},
        "suggested_amounts": suggestion,
        "suggested_amounts_file": str(r.amounts_out),
        "recipe": r.recipe,
        "seed": config.seed,
        "versions": versions(),
    })
    return report


__all__ = ["METHODS", "ModelStats", "PruneJobConfig", "PruneResult", "prune", "read_amounts"]
