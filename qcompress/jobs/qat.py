"""``qcompress qat``: quantization-aware fine-tuning of a float (or pruned) checkpoint.

``method="int8"``: eager-mode QAT (:mod:`qcompress.quant.qat`), converted to a real int8 model that
``qcompress eval`` reloads. ``lsq | pact | dorefa | binary``: low-bit fake quantization for research
(:mod:`qcompress.quant.lowbit`), saved as float weights + the recipe that rebuilds the quantizers.

The report puts every configuration of the run on one row ("steps", as in the 1-bit Faster R-CNN
seed): fp32, post-training int8 (the baseline QAT must beat), and the trained model, with the layers
quantized, mAP, weight compression and the speed-up estimated from bit-operations.

Under ``torchrun`` (see :mod:`qcompress.training.distributed`) every rank trains its shard with
DDP; rank 0 alone saves, evaluates and reports, and the other ranks return ``(None, None)``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcompress.bench.latency import describe_timing
from qcompress.core import (
    DataConfig,
    EvalResult,
    ModelConfig,
    Progress,
    Subset,
    calibration_batches,
    evaluate_detector,
    limited_indices,
    load_dataset,
    load_float_parent,
    model_summary,
    no_progress,
    output_names,
    read_run_state,
    run_dir_for,
)
from qcompress.core.checkpoints import load_detector, read_state_dict, save_detector, versions
from qcompress.core.context import restores_torch_state
from qcompress.defaults import DEFAULT_REPORTS
from qcompress.errors import QCompressError
from qcompress.io_utils import atomic_path, check_writable
from qcompress.jobs.finetune import mask_words, reestimate_bn_after_training, split_dataset, teacher_distiller
from qcompress.models.detector import Detector
from qcompress.models.registry import compression_spec
from qcompress.reports import Report, check_report_target, md_table, write_report
from qcompress.training import distributed
from qcompress.training.distill import DistillConfig

METHODS = ("int8", "lsq", "pact", "dorefa", "binary", "lqnet", "lqnet-ternary")
DEFAULT_LR = {"int8": 1e-4, "lowbit": 5e-4}


@dataclass(frozen=True)
class QATJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # evaluation data: data.split (test) and data.limit
    train_split: str = "train"
    train_limit: int | None = None  # first N training images (smoke runs)
    method: str = "int8"  # int8 | lsq | pact | dorefa | binary
    bits_w: int | None = None  # lsq/pact/dorefa only (None: 4); an error with int8 or binary
    bits_a: int | None = None
    scope: str = "backbone"  # low-bit: backbone | all
    keep_first_and_heads: bool = True
    heads: bool = False  # low-bit, --scope all: fully quantized (heads too, per-channel, percentile, BN frozen)
    binary_scale: str = "layer"  # binary: one activation scale per layer, or XNOR-Net's K(x) per position
    # The teacher: "parent" (the float parent), a checkpoint path, or None (labels alone).
    teacher: str | Path | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Recompute BN statistics after training where BN trained on batch statistics. Off by default: measured on
    # LSQ w4a4 backbone (2 epochs x 400 images) with 64 calibration images it cost 1.2 mAP points (README).
    bn_reestimate: bool = False
    steps: str | None = None  # low-bit, group by group: "glob,glob;glob;..." (see qcompress.jobs.qat_steps)
    step_epochs: str | None = None  # with steps: "6,1,1" epochs per step (default: epochs for every step)
    steps_from: Path | None = None  # with steps: a checkpoint whose quantized layers are the first step(s)
    epochs: int = 2
    lr: float | None = None  # None: 1e-4 for int8, 5e-4 for low-bit
    batch_size: int = 16  # per process under torchrun
    warmup_epochs: float = 0.1
    # int8: BN statistics frozen after this many epochs; -1: never; None: 1, or 0 with pseudo labels
    # (foreign images must not rewrite the parent's statistics).
    freeze_bn_epoch: int | None = None
    freeze_observer_epoch: int | None = 1  # int8: quantization ranges frozen after this many epochs
    backend: str = "x86"
    calib_images: int = 200  # initial ranges (int8), quantizer initialisation (low-bit), PTQ baseline
    calib_split: str = "train"
    ptq_baseline: bool = True
    evaluate: bool = True
    out: Path | None = None  # default: trained_models/quantized/<model>-qat-<method...>.pth
    resume: bool = False
    seed: int = 0
    workers: int = 1
    threads: int | None = None
    latency_runs: int = 20  # timed runs of the fp32 parent vs the output (batch 1)
    report_name: str | None = None
    out_dir: Path = DEFAULT_REPORTS

    @property
    def bn_freeze_epoch(self) -> int | None:
        """The epoch BN statistics freeze at (None: never), with the default resolved: int8 1 (0 with pseudo
        labels); low-bit never, or 1 when fully quantized (FQN)."""
        if self.freeze_bn_epoch is None:
            if not self.is_int8:
                return 1 if self.heads else None
            return 0 if self.data.pseudo_labels is not None else 1
        return None if self.freeze_bn_epoch < 0 else self.freeze_bn_epoch

    @property
    def bits(self) -> tuple[int, int]:
        """(weight bits, activation bits) of a low-bit method, with the default 4 / 4 resolved."""
        return (4 if self.bits_w is None else self.bits_w, 4 if self.bits_a is None else self.bits_a)

    @property
    def is_int8(self) -> bool:
        return self.method == "int8"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR["int8" if self.is_int8 else "lowbit"]

    def validate(self) -> None:
        if self.method not in METHODS:
            raise QCompressError(f"unknown QAT method {self.method!r}", f"use one of: {', '.join(METHODS)}")
        if self.epochs < 1:
            raise QCompressError(f"--epochs must be at least 1, got {self.epochs}", "QAT needs training")
        if self.calib_images < 1:
            raise QCompressError(f"--calib-images must be positive, got {self.calib_images}", "e.g. 200")
        if self.latency_runs < 1:
            raise QCompressError(f"--runs must be >= 1, got {self.latency_runs}", "e.g. --runs 20")
        if self.batch_size < 1:
            raise QCompressError(f"--batch-size must be positive, got {self.batch_size}", "e.g. 16")
        if self.train_limit is not None and self.train_limit < 1:
            raise QCompressError(f"--train-limit must be positive, got {self.train_limit}", "omit it to train on every image")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise QCompressError(f"--lr must be a positive number, got {self.lr}", "omit it for the method's default")
        if self.freeze_bn_epoch is not None and self.freeze_bn_epoch < -1:
            raise QCompressError(f"--freeze-bn-epoch must be >= -1, got {self.freeze_bn_epoch}", "-1 never freezes")
        for name, epoch in (("--freeze-observer-epoch", self.freeze_observer_epoch),):
            if epoch is not None and epoch < 0:
                raise QCompressError(f"{name} must be >= 0, got {epoch}", "0 freezes from the start")
        if not self.is_int8:
            from qcompress.quant.lowbit import LowBitConfig

            LowBitConfig(self.method, *self.bits, self.scope, self.keep_first_and_heads, self.heads,
                         self.binary_scale).validate()
        elif self.binary_scale != "layer":
            raise QCompressError(f"--binary-scale {self.binary_scale} is for --method binary, not int8",
                                 "drop --binary-scale")
        elif self.heads:
            raise QCompressError("--heads (fully quantized low-bit) does not apply to --method int8",
                                 "int8 quantizes the parts the architecture declares; choose a low-bit --method")
        if self.teacher is not None:
            self.distill.validate()
        if self.steps is not None:
            from qcompress.jobs.qat_steps import parse_steps

            if self.is_int8:
                raise QCompressError("--steps quantizes group by group with a low-bit method, not int8",
                                     "add --method binary (or lsq, dorefa, ...)")
            if self.heads:
                raise QCompressError("--steps does not combine with --heads yet", "drop --heads for a steps run")
            parse_steps(self.steps)
            if self.step_epochs is not None:
                from qcompress.jobs.qat_steps import epochs_per_step

                epochs_per_step(self)
            if self.steps_from is not None and not Path(self.steps_from).is_file():
                raise QCompressError(f"--steps-from: checkpoint not found: {self.steps_from}",
                                     "pass the .pth a qat run wrote from this --model-path")
        elif self.step_epochs is not None or self.steps_from is not None:
            flag = "--step-epochs" if self.step_epochs is not None else "--steps-from"
            raise QCompressError(f"{flag} belongs to a --steps run", "add --steps, or drop it")
        given = [flag for flag, v in (("--bits-w", self.bits_w), ("--bits-a", self.bits_a)) if v is not None]
        if self.method == "lqnet-ternary" and self.bits_w is not None:
            raise QCompressError("--bits-w does not apply to --method lqnet-ternary (ternary weights)",
                                 "drop it, or use --method lqnet --bits-w 2")
        if given and self.method in ("int8", "binary"):
            raise QCompressError(f"{' and '.join(given)} do not apply to --method {self.method} "
                                 f"({'8' if self.is_int8 else '1'} bit by definition)",
                                 "drop them, or choose --method lsq, pact or dorefa")
        if self.is_int8 and self.scope != "backbone":
            raise QCompressError(f"--scope {self.scope} does not apply to --method int8 (its parts are declared "
                                 "by the architecture)", "drop --scope, or choose a low-bit --method")

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its --resume."""
        keys = ("method", "bits_w", "bits_a", "scope", "keep_first_and_heads", "heads", "epochs", "batch_size",
                "backend", "seed")
        teacher = None if self.teacher is None else {"teacher": str(self.teacher), **asdict(self.distill)}
        return {k: getattr(self, k) for k in keys} | {"lr": self.learning_rate, "teacher": teacher,
                                                       "bn_freeze_epoch": self.bn_freeze_epoch}

    @property
    def bn_frozen_at_end(self) -> bool:
        """Whether BN used its running statistics (not batch statistics) in the last epoch of training."""
        return self.bn_freeze_epoch is not None and self.bn_freeze_epoch < self.epochs


@dataclass
class QATResult:
    out: Path
    method: str
    recipe: dict[str, Any]
    fp32: EvalResult | None
    ptq: EvalResult | None
    qat: EvalResult | None
    steps: list[dict[str, Any]]
    history: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)  # measured, batch 1: fp32 parent vs the output
    layers: dict[str, dict[str, int]] = field(default_factory=dict)
    fake_quant_vs_int8_sqnr: list[float] = field(default_factory=list)
    bn_reestimation: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] | None = None
    seconds: float = 0.0
    world_size: int = 1
    param_divergence: float = 0.0
    train_steps: int = 0  # optimizer steps this process ran (this session: after --resume, the remaining ones)

    @property
    def label(self) -> str:
        return self.steps[-1]["step"] if self.steps else self.method


def _suffix(config: QATJobConfig) -> str:
    if config.is_int8:
        return "qat-int8"
    tail = ("-fq" if config.heads else "") + ("-kd" if config.teacher is not None else "")
    if config.method == "binary":
        return f"qat-binary-{config.scope}{tail}"
    bits_w, bits_a = config.bits
    return f"qat-{config.method}-w{bits_w}a{bits_a}-{config.scope}{tail}"


@restores_torch_state
def qat(
    config: QATJobConfig,
    progress: Progress = no_progress,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> tuple[QATResult | None, Report | None]:
    """Fine-tune with fake quantization, convert/save, evaluate fp32 / PTQ / QAT and write the steps report.

    Under torchrun, ranks other than 0 train and return ``(None, None)``.
    """
    config.validate()
    check_writable(config.out_dir, "--out-dir", is_dir=True)
    if config.steps is not None:
        from qcompress.jobs.qat_steps import run_steps

        return run_steps(config, progress, on_epoch)
    with distributed.session() as main:
        if not main:
            progress, on_epoch = no_progress, None
        return _run(config, progress, on_epoch)


def _run(config: QATJobConfig, progress: Progress, on_epoch) -> tuple[QATResult | None, Report | None]:
    from qcompress._warnings import quiet_torch_ao
    from qcompress.training.loop import TrainConfig, train_detector

    started = time.perf_counter()
    parent_path, detector, out = load_float_parent(config.model, config.out, _suffix(config), "quantized")
    report_name = config.report_name or f"qat-{out.stem}"
    check_report_target(config.out_dir, report_name, [out])
    run_dir = run_dir_for(out)
    if config.threads:
        torch.set_num_threads(config.threads)

    pool = split_dataset(config.data, detector.class_names, config.train_split, detector)
    train_set = Subset(pool, limited_indices(pool, config.train_limit)) if config.train_limit else pool
    # Same split: one dataset (pseudo labels are computed once, not once per role).
    calib_set = pool if config.calib_split == config.train_split else split_dataset(
        config.data, detector.class_names, config.calib_split, detector)
    advance = progress("calibration images", None)
    calib = calibration_batches(detector, calib_set, config.calib_images, config.seed)
    advance(sum(b.shape[0] for b in calib))

    # The network that trains: fake-quantized copy of the float model.
    torch.manual_seed(config.seed)
    with quiet_torch_ao():
        if config.is_int8:
            from qcompress.quant.qat import FreezeSchedule, observe, prepare_qat_model

            train_model, groups, int8_parts = prepare_qat_model(detector.model, config.backend, detector.spec.arch)
            schedule = FreezeSchedule(config.bn_freeze_epoch, config.freeze_observer_epoch)
            record = None
        else:
            from qcompress.quant.lowbit import apply_lowbit, initialize_lowbit

            train_model = copy.deepcopy(detector.model)
            record = apply_lowbit(train_model, config.method, *config.bits, config.scope,
                                  config.keep_first_and_heads, spec=compression_spec(detector.spec.arch),
                                  fully_quantized=config.heads, binary_scale=config.binary_scale)
            groups, schedule = [], None

    distiller, teacher_info = teacher_distiller(config.teacher, config.distill, detector, train_model, detector,
                                                parent_path, calib[0][:1], probe=detector.model)
    events: list[dict[str, Any]] = []
    resume_state = None
    if config.resume:
        resume_state = _load_resume(run_dir, train_model, config)
        if distiller is not None:
            distiller.adapters.load_state_dict(resume_state["adapters"])
            distiller.pending_fit = []  # trained adapters: no first-batch fit
        events = list(resume_state.get("events", []))
        if schedule is not None:  # freezing is not in the state_dict: re-apply what was due
            schedule.apply(train_model, int(resume_state["epoch"]) + 1)
    else:
        with quiet_torch_ao():
            if config.is_int8:
                observe(train_model, calib)
                events += [{"epoch": 0, "event": e} for e in schedule.apply(train_model, 0)]
            else:
                initialize_lowbit(train_model, calib)

    distributed_run = distributed.is_distributed()
    net = distributed.wrap(train_model if distiller is None else distiller)
    train_cfg = TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, lr=config.learning_rate, warmup_epochs=config.warmup_epochs,
        num_workers=config.workers, seed=config.seed, threads=config.threads, eval_limit=None,
        channels_last=not distributed_run,  # DDP's gradient buckets want the layout they were built with
        freeze_bn_epoch=None if config.is_int8 else config.bn_freeze_epoch,  # int8: the FreezeSchedule above
    )

    def checkpoint_fn(epoch: int, state: dict[str, Any]) -> None:
        if not distributed.is_main_process():
            return
        with atomic_path(run_dir / "last.pth") as tmp:
            torch.save(train_model.state_dict(), tmp)
        with atomic_path(run_dir / "last.state.pt") as tmp:
            adapters = distiller.adapters.state_dict() if distiller is not None else {}
            torch.save({**state, "qat": config.fingerprint(), "events": events, "adapters": adapters}, tmp)

    bars: dict[int, Callable[[int], None]] = {}
    steps_run = [0]

    def step_fn(epoch: int, step: int, steps: int, stats: dict[str, float]) -> None:
        steps_run[0] += 1
        if epoch not in bars:
            bars[epoch] = progress(f"QAT epoch {epoch + 1}/{config.epochs}", steps)
        bars[epoch](1)

    def epoch_fn(epoch: int, record_: dict[str, Any]) -> None:
        if schedule is not None:
            events.extend({"epoch": epoch + 1, "event": e} for e in schedule.apply(train_model, epoch + 1))
        if on_epoch:
            on_epoch(epoch, record_)

    with quiet_torch_ao():
        trained = train_detector(
            detector, train_set, train_cfg, model=net, checkpoint_fn=checkpoint_fn, resume_state=resume_state,
            on_step=step_fn, on_epoch=epoch_fn, distiller=distiller,
        )
    divergence = distributed.max_parameter_divergence(net)
    world = distributed.world_size()
    if distiller is not None:
        distiller.detach_hooks()
    if not distributed.is_main_process():
        return None, None
    train_model.eval()
    bn_info = reestimate_bn_after_training(config, train_model, lambda: calib)

    # Convert (int8) or keep the fake-quant model (low-bit), save, reload from disk.
    common = {"epochs": config.epochs, "lr": config.learning_rate, "batch_size": config.batch_size,
              "world_size": world, "calib_images": sum(b.shape[0] for b in calib), "calib_split": config.calib_split,
              "seed": config.seed, "teacher": teacher_info, "bn_reestimated": bool(bn_info.get("layers"))}
    sqnr: list[float] = []
    with quiet_torch_ao():
        if config.is_int8:
            from qcompress.quant.qat import convert_qat, qat_recipe
            from qcompress.quant.sqnr import output_sqnr

            qmodel = convert_qat(train_model, config.backend)
            from qcompress.quant.parts import float_parts

            floats = float_parts(train_model, int8_parts)
            recipe = {**qat_recipe(config.backend, len(groups), schedule, int8_parts, floats), **common}
            with torch.inference_mode():
                probe = calib[0][:4]
                sqnr = output_sqnr(train_model(probe), qmodel(probe))
            saved = detector.with_model(qmodel)
            extra = None
        else:
            recipe = {**record.recipe, **common}
            saved = detector.with_model(train_model)
            extra = {"research_model": (
                f"{config.method} fake quantization (w{record.bits_w}/a{record.bits_a}, scope {config.scope}): float "
                "weights plus quantizer state; reloads for evaluation, runs no low-bit kernels")}
        saved.source = detector.source  # sidecar provenance: pruned widths and compression history carry over
        save_detector(saved, out, parent=parent_path, quantization=recipe,
                      compression=[{"step": "qat", **{k: v for k, v in recipe.items() if k not in ("layers", "kept_float")}}],
                      extra={**(extra or {}), "training": {"history": trained.history, "events": events}})
        reloaded = load_detector(out)

    # Measure fp32 / PTQ / QAT side by side.
    fp32_eval = ptq_eval = qat_eval = None
    metric = "voc" if config.data.pseudo_labels is not None else "coco" if config.data.dataset == "coco" else "voc07"
    ptq_record = None
    if config.evaluate:
        test_set = load_dataset(config.data, detector.class_names, reference=detector)

        def run_eval(det: Detector, description: str) -> EvalResult:
            with quiet_torch_ao():
                res, _ = evaluate_detector(det, test_set, metric, config.data.limit, progress=progress, description=description)
            if config.data.pseudo_labels is not None:
                res.metric = "fidelity-AP50"  # area AP at IoU 0.5 against the fp32 parent's detections
            return res

        fp32_eval = run_eval(detector, "eval fp32")
        if config.ptq_baseline:
            from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

            with quiet_torch_ao():
                ptq_det, ptq_record = quantize_detector(detector, calib, QuantizeOptions(backend=config.backend))
            ptq_eval = run_eval(ptq_det, "eval PTQ int8")
        qat_eval = run_eval(reloaded, f"eval QAT {config.method}")

    steps, layers = _steps(detector, config, record, recipe, fp32_eval, ptq_eval, qat_eval, ptq_record,
                           parent_path, out)
    from qcompress.bench.latency import interleaved_latency

    h, w = detector.spec.input_size
    with quiet_torch_ao():
        fp32_lat, out_lat = interleaved_latency(
            [detector.model, reloaded.model], (1, 3, h, w), runs=config.latency_runs, threads=config.threads,
            engines=[None, config.backend if config.is_int8 else None])
    latency = {"fp32": fp32_lat.as_dict(), "output": out_lat.as_dict(), "ratio": out_lat.median_ms / fp32_lat.median_ms,
               "runtime": "torch eager " + (f"int8 ({config.backend})" if config.is_int8 else
                                            "float (fake quantization: no low-bit kernel)"),
               "timing": describe_timing([fp32_lat, out_lat])}
    result = QATResult(
        out=out, method=config.method, recipe=recipe, fp32=fp32_eval, ptq=ptq_eval, qat=qat_eval, steps=steps,
        history=trained.history, events=events, layers=layers, fake_quant_vs_int8_sqnr=sqnr,
        seconds=time.perf_counter() - started, world_size=world, param_divergence=divergence,
        train_steps=steps_run[0], latency=latency, bn_reestimation=bn_info, teacher=teacher_info,
    )
    report = qat_report(report_name, detector, result, config)
    write_report(report, config.out_dir)
    return result, report


def _load_resume(run_dir: Path, model: torch.nn.Module, config: QATJobConfig) -> dict[str, Any]:
    state = read_run_state(run_dir, "start without --resume")
    if state is None:
        raise QCompressError(f"nothing to resume in {run_dir}", "start without --resume")
    last = run_dir / "last.pth"
    if state.get("qat") != config.fingerprint():
        raise QCompressError(
            f"the run in {run_dir} used other settings: {state.get('qat')}",
            "resume with the same --method/--bits/--scope/--epochs/--batch-size/--lr/--seed, or start without --resume",
        )
    try:
        model.load_state_dict(read_state_dict(last), strict=True)
    except RuntimeError as exc:
        raise QCompressError(f"cannot resume from {last}: {str(exc).splitlines()[0][:200]}", "start without --resume") from None
    return state


def _steps(detector, config, record, recipe, fp32_eval, ptq_eval, qat_eval, ptq_record, parent_path, out):
    """One row per configuration: layers quantized, bits, mAP, weight compression, BOPs speed-up."""
    from qcompress.bench.size import conv_macs, estimate_bops, weight_compression
    from qcompress.quant.lowbit import layer_bits

    h, w = detector.spec.input_size
    macs = conv_macs(detector.model, (1, 3, h, w))
    all_convs = list(macs)
    fp32_map = fp32_eval.mAP if fp32_eval else float("nan")

    def row(step: str, description: str, bits: dict[str, tuple[int, int]], ev: EvalResult | None, size: int | None):
        bops = estimate_bops(macs, bits)
        return {
            "step": step,
            "description": description,
            "quantized_layers": len(bits),
            "total_conv_layers": len(all_convs),
            "mAP": ev.mAP if ev else None,
            "delta_mAP_points": (ev.mAP - fp32_map) * 100 if ev and fp32_eval else None,
            "weight_compression": weight_compression(detector.model, bits),
            "gbops": bops.total_bops / 1e9,
            "bops_speedup": bops.speedup,
            "file_bytes": size,
        }, bops

    def inside(name: str, modules) -> bool:
        return any(name == m or name.startswith(m + ".") for m in modules)

    # Architectures quantized in parts (torchvision's) run only the convs of those parts in int8.
    parts = recipe.get("int8_parts") if config.is_int8 else None
    int8_convs = [n for n in all_convs if parts is None or inside(n, parts)]
    steps = [row("fp32", "float model", {}, fp32_eval, parent_path.stat().st_size)[0]]
    if ptq_eval is not None:
        kept = set(ptq_record.recipe.get("kept_float", [])) if ptq_record else set()
        int8_bits = {n: (8, 8) for n in int8_convs if not inside(n, kept)}
        steps.append(row("ptq-int8", "post-training int8 (histogram, per-channel)", int8_bits, ptq_eval, None)[0])
    if config.is_int8:
        bits = {n: (8, 8) for n in int8_convs}
        final, bops = row("qat-int8", f"QAT int8 ({config.epochs} epochs), converted", bits, qat_eval, out.stat().st_size)
    else:
        bits = layer_bits(record)
        final, bops = row(
            f"qat-{config.method}-w{record.bits_w}a{record.bits_a}-{config.scope}",
            f"{config.method} fake-quant, scope {config.scope}"
            + (", first conv and heads float" if config.keep_first_and_heads else ""),
            bits, qat_eval, None,
        )
    steps.append(final)
    return steps, bops.per_layer


def _fmt_opt(value: Any, fmt: str = "{:.4f}") -> str:
    return "–" if value is None else fmt.format(value)


def qat_report(name: str, detector: Detector, r: QATResult, config: QATJobConfig) -> Report:
    report = Report(name, f"Quantization-aware training ({r.method}) of {Path(detector.source['path']).name}")
    report.add("Steps", md_table(
        ["step", "quantized conv layers", r.fp32.metric if r.fp32 else "mAP", "Δ (points)", "weight compression", "GBOPs",
         "fp32 BOPs / BOPs (estimate)"],
        [[s["step"], f"{s['quantized_layers']}/{s['total_conv_layers']}", _fmt_opt(s["mAP"]),
          _fmt_opt(s["delta_mAP_points"], "{:+.2f}"), f"{s['weight_compression']:.2f}x", f"{s['gbops']:.2f}",
          f"{s['bops_speedup']:.1f}x"] for s in r.steps],
    ) + "\n\nBOPs = sum over conv layers of MACs x weight bits x activation bits (float layers count 32 x 32); "
        "the last column is a bit-operation count ratio for bit-serial hardware, not a speed-up: the measured "
        "latency is below. "
        "Weight compression counts parameter bits (biases, BN and float layers at 32)."
        + ("" if config.is_int8 else "\n\nLow-bit models are research models: fake-quantized float weights that "
           "reload for evaluation; no low-bit kernel runs them."))
    if r.latency:
        lat = r.latency
        report.add("Measured latency (batch 1)", md_table(
            ["", "fp32 parent (torch eager)", f"output ({lat['runtime']})", "output / fp32"],
            [["median ms", lat["fp32"]["median_ms"], lat["output"]["median_ms"], lat["ratio"]],
             ["p90 ms", lat["fp32"]["p90_ms"], lat["output"]["p90_ms"], lat["output"]["p90_ms"] / lat["fp32"]["p90_ms"]]],
        ) + "\n\n" + lat["timing"])
    if r.fp32 and r.fp32.metric == "fidelity-AP50":
        report.add("Fidelity (pseudo labels)", (
            f"No labels: the fp32 parent's detections with score >= {config.data.pseudo_labels} on the first "
            f"{r.fp32.num_images} images are the ground truth ({r.fp32.num_objects} boxes); the columns are AP50 "
            "against them (fidelity; the parent scores 1.0 by construction). The images after those trained the model."))
    if r.fp32 and r.qat:
        evals = [("fp32", r.fp32), ("PTQ int8", r.ptq), (r.label, r.qat)]
        evals = [(n, e) for n, e in evals if e is not None]
        report.add(("Per-class fidelity AP50" if r.fp32.metric == "fidelity-AP50" else "Per-class AP (" + r.fp32.metric + ")"),
                   md_table(
            ["class", *[n for n, _ in evals]],
            [[c, *[e.ap_per_class.get(c, float("nan")) for _, e in evals]] for c in sorted(r.fp32.ap_per_class)],
        ))
    kd = r.teacher is not None
    report.add("Training", md_table(
        ["epoch", "regression loss", "classification loss", *(["imitation loss", "output distillation"] if kd else []),
         "seconds"],
        [[h["epoch"], h["regression_loss"], h["classification_loss"],
          *([h.get("imitation_loss"), h.get("output_distill_loss")] if kd else []), h["seconds"]] for h in r.history],
    ) + ("\n\nTask losses (regression, classification) and the teacher's terms, as weighted in the total "
         "loss, averaged per step." if kd else "") + ("\n\n" + "\n".join(f"- after epoch {e['epoch']}: {e['event']}" for e in r.events) if r.events else "")
        + (f"\n\nDistributedDataParallel over {r.world_size} processes (gloo); largest parameter difference "
           f"between replicas after training: {r.param_divergence:.3g}." if r.world_size > 1 else ""))
    if r.teacher:
        t = r.teacher
        report.add("Teacher", (
            f"Teacher {Path(t['teacher']).name}: fine-grained feature imitation (Wang et al. 2019) at "
            f"{t.get('imitated', 'the inputs of ' + ', '.join(t['feature_taps']))}, weight {t['imitation']:g}"
            f"{mask_words(t)}, 1x1 adaptation per level; output distillation weight {t['outputs']:g} "
            f"(temperature {t['temperature']:g})."))
    if r.bn_reestimation:
        b = r.bn_reestimation
        report.add("BN re-estimation", f"Skipped: {b['skipped']}." if "skipped" in b else (
            f"{b['layers']} BN layers re-estimated on {b['images']} calibration images before saving; largest change "
            f"of a running mean {b['largest_mean_shift']:.3g}, of a running variance {b['largest_var_shift']:.3g}."))
    if r.fake_quant_vs_int8_sqnr:
        report.add("Fake-quant model vs converted int8 (raw head outputs SQNR, dB)",
                   md_table(["output", "SQNR dB"], list(zip(output_names(detector, len(r.fake_quant_vs_int8_sqnr)),
                                                        r.fake_quant_vs_int8_sqnr))))
    report.add("Recipe", md_table(["field", "value"], [[k, v] for k, v in r.recipe.items() if k not in ("layers", "kept_float")]))
    report.add("Layers (MACs per image, bits, BOPs) of the trained configuration", md_table(
        ["layer", "MACs", "bits w", "bits a", "BOPs"],
        [[n, v["macs"], v["bits_w"], v["bits_a"], v["bops"]] for n, v in r.layers.items()],
    ))
    report.data.update({
        "command": "qat",
        "model": model_summary(detector),
        "out": str(r.out),
        "method": r.method,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()
                   if k not in ("model", "data")},
        "data": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config.data).items()},
        "recipe": r.recipe,
        "steps": r.steps,
        "fp32": asdict(r.fp32) if r.fp32 else None,
        "ptq": asdict(r.ptq) if r.ptq else None,
        "latency": r.latency,
        "qat": asdict(r.qat) if r.qat else None,
        "history": r.history,
        "events": r.events,
        "layers": r.layers,
        "fake_quant_vs_int8_sqnr_db": r.fake_quant_vs_int8_sqnr,
        "world_size": r.world_size,
        "param_divergence": r.param_divergence,
        "train_steps": r.train_steps,
        "teacher": r.teacher,
        "bn_reestimation": r.bn_reestimation,
        "seconds": r.seconds,
        "seed": config.seed,
        "versions": versions(),
    })
    return report


__all__ = ["METHODS", "QATJobConfig", "QATResult", "qat", "qat_report"]
