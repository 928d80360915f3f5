"""``qcompress qat --steps "g1;g2;..."``: low-bit (binary first of all) layer group by layer group.

Each step quantizes the convs its globs select on top of the previous steps' (the 1-bit Faster
R-CNN recipe: binarize group by group and let each step recover), fine-tunes ``--epochs`` from the
previous step, re-estimates BN, saves ``<out>-step<k>.pth``, evaluates, and measures the whole
network: for binary, the fp32 parent against the step's model with its binary layers in the
bitpacked XNOR engine (:mod:`qcompress.runtime.binary`), timed interleaved in one run; the
bit-operation estimate stands beside it. One report: the step table and a gallery of fp32 vs every
step on the same test images.

``--resume`` continues an interrupted run: a step whose checkpoint was saved by a run with the same
settings (recorded in its sidecar) is loaded and evaluated again instead of trained; training restarts at
the first step without one, from its last finished epoch (``<out>-step<k>-run/last.pth``, saved after each
epoch and removed once the step's checkpoint is saved) where the interrupted run got that far.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompress.core import (
    Progress,
    Subset,
    calibration_batches,
    evaluate_detector,
    limited_indices,
    load_dataset,
    load_float_parent,
    model_summary,
)
from qcompress.core.checkpoints import load_detector, read_state_dict, save_detector, sidecar_path, versions
from qcompress.core.loading import read_run_state, run_dir_for
from qcompress.errors import QCompressError
from qcompress.io_utils import atomic_path
from qcompress.models.detector import Detector
from qcompress.reports import Report, check_report_target, md_table, write_report


def parse_steps(text: str) -> list[list[str]]:
    """``"conv1_*,conv2_*;conv3_*"`` -> ``[["conv1_*", "conv2_*"], ["conv3_*"]]``; empty groups are an error."""
    groups = [[g.strip() for g in step.split(",") if g.strip()] for step in text.split(";")]
    if not text.strip() or any(not g for g in groups):
        raise QCompressError(f"--steps {text!r} has an empty step",
                             'separate steps by ";" and globs inside a step by "," (e.g. "base_net.1*;base_net.2*")')
    return groups


def parse_step_epochs(text: str, steps: int) -> list[int]:
    """``"6,1,1"`` -> ``[6, 1, 1]``: the fine-tuning epochs of each step; one positive integer per step."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise QCompressError(f"--step-epochs {text!r} is not a list of positive integers",
                             'give one epoch count per step, separated by "," (e.g. "6,1,1,1,1")')
    if len(parts) != steps:
        raise QCompressError(f"--step-epochs gives {len(parts)} epoch count(s) for {steps} step(s)",
                             "give one epoch count per step of --steps")
    return [int(p) for p in parts]


def epochs_per_step(config) -> list[int]:
    """Each step's epochs: ``--step-epochs`` where given, else ``--epochs`` for every step."""
    count = len(parse_steps(config.steps))
    return parse_step_epochs(config.step_epochs, count) if config.step_epochs else [config.epochs] * count


def resolve_steps(model: nn.Module, groups: list[list[str]], binary: bool) -> list[list[str]]:
    """Conv (transposed conv, Linear) names each step adds (a layer belongs to the first step that matches it). Binary skips grouped
    convs (too few weights per filter). A step that adds nothing is an error naming its globs."""
    convs = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)]
    taken: set[str] = set()
    steps = []
    for k, globs in enumerate(groups, 1):
        names = [n for n, m in convs if n not in taken and any(fnmatch.fnmatchcase(n, g) for g in globs)
                 and not (binary and getattr(m, "groups", 1) > 1)]
        if not names:
            example = ", ".join(n for n, _ in convs[:4])
            raise QCompressError(f"step {k} ({','.join(globs)}) selects no new convolution or linear layer",
                                 f"globs match conv/linear module names, e.g. {example}")
        taken.update(names)
        steps.append(names)
    return steps


def run_steps(config, progress: Progress, on_epoch) -> tuple[Any, Report]:
    """The ``--steps`` mode of :func:`qcompress.jobs.qat.qat` (``config`` a ``QATJobConfig``)."""
    from qcompress._warnings import quiet_torch_ao
    from qcompress.bench.size import conv_macs, estimate_bops, weight_compression
    from qcompress.jobs.finetune import reestimate_bn_after_training, split_dataset, teacher_distiller
    from qcompress.quant.lowbit import LowBitRecord, initialize_lowbit, wrap_convs
    from qcompress.training.loop import TrainConfig, train_detector

    started = time.perf_counter()
    parent_path, detector, out = load_float_parent(config.model, config.out, f"qat-{config.method}-steps", "quantized")
    binary = config.method == "binary"
    bits_w, bits_a = (1, 1) if binary else config.bits
    steps = resolve_steps(detector.model, parse_steps(config.steps), binary)
    step_epochs = epochs_per_step(config)
    # --steps-from: a checkpoint that holds the first `given` steps; their row is that checkpoint
    given, start = steps_from_checkpoint(config, steps, detector, parent_path) if config.steps_from else (0, None)
    outs = [out.with_name(f"{out.stem}-step{k}{out.suffix}") for k in range(1, len(steps) + 1)]
    if start is not None:
        outs[given - 1] = Path(config.steps_from)
    check_report_target(config.out_dir, _report_name(config), outs[given:])
    run_id = steps_fingerprint(config, detector, start.source["sha256"] if start is not None else None)
    resumable = config.resume
    first = outs[given]  # the first step this run trains
    if resumable and not (finished_step(first, run_id, given + 1)
                          or _step_resume_state(run_dir_for(first), run_id, given + 1)):
        raise QCompressError(f"nothing to resume: {first} was not saved by a steps run with these settings",
                             "start without --resume (or with the settings of the interrupted run)")

    pool = split_dataset(config.data, detector.class_names, config.train_split, detector)
    train_set = Subset(pool, limited_indices(pool, config.train_limit)) if config.train_limit else pool
    calib = calibration_batches(detector, pool, config.calib_images, config.seed)
    test_set = load_dataset(config.data, detector.class_names, reference=detector)
    metric = "coco" if config.data.dataset == "coco" else "voc07"

    def evaluate(det: Detector, description: str):
        with quiet_torch_ao():
            return evaluate_detector(det, test_set, metric, config.data.limit, progress=progress, description=description)

    fp32_eval, fp32_dets = evaluate(detector, "eval fp32")
    h, w = detector.spec.input_size
    macs = conv_macs(detector.model, (1, 3, h, w))
    params = sum(p.numel() for p in detector.model.parameters())
    fp32_bits = params * 32
    rows: list[dict[str, Any]] = [{"step": 0, "added": [], "layers": 0, "mAP": fp32_eval.mAP, "delta_points": 0.0,
                                   "measured_speedup": None, "bops_speedup": 1.0, "weight_bits_removed": 0.0,
                                   "weights_quantized": 0.0, "parameters": params, "checkpoint": str(parent_path)}]
    detections = [fp32_dets]
    model = copy.deepcopy(detector.model)
    cumulative: list[str] = []
    history: list[dict[str, Any]] = []
    teacher_info: dict[str, Any] | None = None
    torch.manual_seed(config.seed)
    for k, (names, path, epochs) in enumerate(zip(steps, outs, step_epochs), 1):
        wrap_convs(model, names, config.method, bits_w, bits_a, binary_scale=config.binary_scale)
        initialize_lowbit(model, calib)  # the new quantizers take their first values; the others keep theirs
        cumulative += names
        if k < given:  # inside the --steps-from checkpoint: no row of its own
            continue
        bars: dict[int, Any] = {}

        def step_fn(epoch: int, step: int, steps_per_epoch: int, stats: dict[str, float], k=k, bars=bars,
                    epochs=epochs) -> None:
            if epoch not in bars:
                bars[epoch] = progress(f"step {k}/{len(steps)} epoch {epoch + 1}/{epochs}", steps_per_epoch)
            bars[epoch](1)

        train_cfg = TrainConfig(epochs=epochs, batch_size=config.batch_size, lr=config.learning_rate,
                                warmup_epochs=config.warmup_epochs, num_workers=config.workers, seed=config.seed + k,
                                threads=config.threads, eval_limit=None, freeze_bn_epoch=config.bn_freeze_epoch)
        if k == given:  # the --steps-from checkpoint (checked against these steps before any work)
            model.load_state_dict(start.model.state_dict(), strict=True)
            model.eval()
            sidecar = start.source.get("sidecar") or {}
            training = sidecar.get("training") or {}
            step_history = list(training.get("history", []))
            bn = training.get("bn_reestimation")
            epochs = (sidecar.get("quantization") or {}).get("epochs", len(step_history))
        elif finished_step(path, run_id, k) if resumable else False:  # --resume: it finished with these settings
            model.load_state_dict(read_state_dict(path), strict=True)
            model.eval()
            done = json.loads(sidecar_path(path).read_text())
            step_history = list(done.get("training", {}).get("history", []))
            bn = done.get("training", {}).get("bn_reestimation")
            teacher_info = done.get("steps_run", {}).get("teacher", teacher_info)
        else:
            resumable = False  # from here on every step trains
            # --teacher: each step imitates the float parent (a fresh adapter per step; identity where widths agree)
            distiller, teacher_info = teacher_distiller(config.teacher, config.distill, detector, model, detector,
                                                        parent_path, calib[0][:1])
            run_dir = run_dir_for(path)
            # --resume inside the first unfinished step: its last finished epoch, if this run saved one
            state = _step_resume_state(run_dir, run_id, k) if config.resume else None
            if state is not None:
                model.load_state_dict(read_state_dict(run_dir / "last.pth"), strict=True)
                if distiller is not None:
                    distiller.adapters.load_state_dict(state["adapters"])
                    distiller.pending_fit = []  # trained adapters: no first-batch fit

            def checkpoint_fn(epoch: int, train_state: dict[str, Any], k=k, run_dir=run_dir, distiller=distiller) -> None:
                run_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(run_dir / "last.pth") as tmp:
                    torch.save(model.state_dict(), tmp)
                with atomic_path(run_dir / "last.state.pt") as tmp:
                    adapters = distiller.adapters.state_dict() if distiller is not None else {}
                    torch.save({**train_state, "steps_run": json.dumps(run_id, sort_keys=True), "step": k,
                                "adapters": adapters}, tmp)

            with quiet_torch_ao():
                trained = train_detector(detector, train_set, train_cfg, model=model if distiller is None else distiller,
                                         on_step=step_fn, distiller=distiller, checkpoint_fn=checkpoint_fn,
                                         resume_state=state,
                                         on_epoch=(lambda e, r, k=k: on_epoch(e, {**r, "step": k})) if on_epoch else None)
            if distiller is not None:
                distiller.detach_hooks()
            model.eval()
            bn = reestimate_bn_after_training(config, model, lambda: calib)
            step_history = trained.history
        mark = {"from": str(path)} if k == given else {"resumed": True} if resumable else {}
        history += [{**r, "step": k, **mark} for r in step_history]
        record = LowBitRecord(config.method, bits_w, bits_a, f"steps 1-{k}", list(cumulative), [],
                              binary_scale=config.binary_scale)
        if not resumable and k != given:
            saved = detector.with_model(model)
            saved.source = detector.source
            save_detector(saved, path, parent=parent_path, quantization={**record.recipe, "steps": steps[:k]},
                          compression=[{"step": "qat-steps", "method": config.method, "step_index": k,
                                        "layers": len(cumulative)}],
                          extra={"research_model": f"{config.method} fake quantization, steps 1-{k}",
                                 "training": {"history": step_history, "bn_reestimation": bn},
                                 "steps_run": {"settings": run_id, "step": k, "teacher": teacher_info}})
            shutil.rmtree(run_dir, ignore_errors=True)  # the step's checkpoint now stands for its epochs
        reloaded = start if k == given else load_detector(path)  # the --steps-from checkpoint is loaded already
        ev, dets = evaluate(reloaded, f"eval step {k}")
        detections.append(dets)
        bits = {n: (bits_w, bits_a) for n in cumulative}
        quantized_weights = sum(model.get_submodule(n).layer.weight.numel() for n in cumulative)
        measured = _measured_speedup(detector.model, model, (1, 3, h, w), config.threads) if binary else None
        rows.append({"step": k, "added": list(cumulative) if k == given else names, "layers": len(cumulative),
                     "epochs": epochs, "mAP": ev.mAP,
                     "delta_points": (ev.mAP - fp32_eval.mAP) * 100, "measured_speedup": measured,
                     "bops_speedup": estimate_bops(macs, bits).speedup,
                     "weight_bits_removed": 1 - 1 / weight_compression(detector.model, bits),
                     "weights_quantized": quantized_weights * 32 / fp32_bits, "parameters": params,
                     "checkpoint": str(path), "bn_reestimation": bn, **({"from": True} if k == given else {})})
    gallery = _gallery(config, test_set, detector, rows, detections)
    report = steps_report(config, detector, rows, history, gallery, time.perf_counter() - started, teacher_info)
    write_report(report, config.out_dir)
    return rows, report


def _report_name(config) -> str:
    return config.report_name or "qat-steps"


def steps_fingerprint(config, detector: Detector, steps_from_sha256: str | None = None) -> dict[str, Any]:
    """What a steps run's checkpoints must share with the run that resumes from them (``steps_from_sha256``: the
    ``--steps-from`` checkpoint's, read when it was loaded)."""
    run_id = {**config.fingerprint(), "steps": config.steps, "binary_scale": config.binary_scale,
              "train_limit": config.train_limit, "parent": detector.source.get("sha256")}
    if config.step_epochs:  # absent otherwise, so that runs saved before the option still resume
        run_id["step_epochs"] = epochs_per_step(config)
    if steps_from_sha256 is not None:
        run_id["steps_from"] = steps_from_sha256
    return run_id


def steps_from_checkpoint(config, steps: list[list[str]], detector: Detector,
                          parent_path: Path) -> tuple[int, Detector]:
    """``--steps-from``: the checkpoint and how many of ``steps`` it holds. It must come from this parent with
    this method (and binary scale), and quantize exactly the layers of the first steps: not all of them."""
    path = Path(config.steps_from)
    start = load_detector(path)
    sidecar = start.source.get("sidecar") or {}
    recipe = sidecar.get("quantization") or {}
    if sidecar.get("parent_sha256") != detector.source.get("sha256"):
        raise QCompressError(f"--steps-from {path} was not fine-tuned from {parent_path} (its sidecar names "
                             "another parent, or none)", "pass a checkpoint qat wrote from this --model-path")
    bits = (1, 1) if config.method == "binary" else config.bits
    theirs = (recipe.get("method"), recipe.get("bits_w"), recipe.get("bits_a"), recipe.get("binary_scale", "layer"))
    ours = (config.method, *bits, config.binary_scale)
    if recipe.get("fully_quantized"):
        raise QCompressError(f"--steps-from {path} is fully quantized (--heads: per-channel weights, heads too)",
                             "a steps run continues from a checkpoint of qat --scope or of another steps run")
    if recipe.get("scheme") != "lowbit-fake-quant" or theirs != ours:
        raise QCompressError(f"--steps-from {path} holds {theirs[0] or 'no low-bit'} w{theirs[1]}a{theirs[2]} "
                             f"({theirs[3]} scale); this run is {ours[0]} w{ours[1]}a{ours[2]} ({ours[3]} scale)",
                             "use the --method, bits and --binary-scale the checkpoint was trained with")
    layers, cumulative = set(recipe.get("layers") or []), set()
    for k, names in enumerate(steps, 1):
        cumulative |= set(names)
        if cumulative == layers:
            if k == len(steps):
                raise QCompressError(f"--steps-from {path} already quantizes every step of --steps",
                                     "add the steps that should follow it")
            return k, start
    raise QCompressError(f"--steps-from {path} quantizes {len(layers)} layers ({', '.join(sorted(layers)[:4])}"
                         f"{', ...' if len(layers) > 4 else ''}), not exactly those of the first step(s) of --steps",
                         "make the first step's globs select the checkpoint's layers")


def finished_step(path: Path, run_id: dict[str, Any], k: int) -> bool:
    """``path`` holds step ``k`` of a steps run with the settings ``run_id`` (its sidecar says so)."""
    side = sidecar_path(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        recorded = json.loads(side.read_text()).get("steps_run") or {}
    except (OSError, ValueError):
        return False
    return recorded.get("step") == k and recorded.get("settings") == json.loads(json.dumps(run_id))


def _step_resume_state(run_dir: Path, run_id: dict[str, Any], k: int) -> dict[str, Any] | None:
    """The training state a run with the settings ``run_id`` saved after its last finished epoch of step ``k``
    (``<out>-step<k>-run/``), or None: the step then trains from its start."""
    state = read_run_state(run_dir, f"delete {run_dir} to train step {k} from its start")
    if state is None or state.get("step") != k or state.get("steps_run") != json.dumps(run_id, sort_keys=True):
        return None
    return state


def _measured_speedup(fp32: nn.Module, model: nn.Module, shape: tuple[int, ...], threads: int | None,
                      runs: int = 10) -> dict[str, Any]:
    """fp32 parent vs the step's model with its binary layers in the XNOR engine, interleaved in one run; both
    with their BatchNorms folded into the convs before them (as a deployed network is)."""
    from qcompress.bench.latency import interleaved_latency
    from qcompress.runtime.binary import convert_binary, cpu_info, fold_batchnorm

    engine_model, conversion = convert_binary(model.eval(), fold_bn=True)
    reference = copy.deepcopy(fp32).eval()
    fold_batchnorm(reference)
    with torch.no_grad():
        a, b = interleaved_latency([reference, engine_model], shape, runs=runs, warmup=2, threads=threads or 1)
    info = cpu_info()
    return {"speedup": a.median_ms / b.median_ms, "fp32_ms": a.median_ms, "engine_ms": b.median_ms,
            "engine_layers": len(conversion.converted), "not_in_engine": len(conversion.skipped),
            "threads": threads or 1, "cpu": info.model,
            "instruction_sets": [k for k, v in info.instruction_sets.items() if v]}


def _gallery(config, dataset, detector: Detector, rows, detections, count: int = 4) -> list[str]:
    from qcompress.jobs.bench import _save_image, gallery_indices
    from qcompress.reports.draw import draw_detections, side_by_side

    name = _report_name(config)
    folder = Path(config.out_dir) / f"{name}_images"
    written = []
    for row_index, index in enumerate(gallery_indices(len(detections[0]), count)):
        image = dataset.load_image(index)
        panels = [draw_detections(image, dets[index], detector.class_names, 0.4) for dets in detections]
        titles = ["fp32" if r["step"] == 0 else f"step {r['step']} ({r['layers']} layers)" for r in rows]
        image_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(dataset.image_id(index)))
        out = folder / f"{row_index + 1:02d}-{image_id}.jpg"
        _save_image(side_by_side(panels, titles), out)
        written.append(f"{folder.name}/{out.name}")
    return written


def _fmt(v: Any, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def _added(globs: list[list[str]], row: dict[str, Any]) -> str:
    """A row's globs; the --steps-from row names all the steps its checkpoint holds, and the checkpoint."""
    if not row["step"]:
        return "–"
    if row.get("from"):
        return f"{'; '.join(', '.join(g) for g in globs[:row['step']])} (--steps-from {Path(row['checkpoint']).name})"
    return ", ".join(globs[row["step"] - 1])


def steps_report(config, detector: Detector, rows, history, gallery: list[str], seconds: float,
                 teacher: dict[str, Any] | None = None) -> Report:
    name = _report_name(config)
    report = Report(name, f"{config.method} layer group by layer group: {config.steps}")
    measured = next((r["measured_speedup"] for r in rows if r["measured_speedup"]), None)
    globs = parse_steps(config.steps)
    report.add("Steps", md_table(
        ["step", "layers added (globs)", "quantized convs", "epochs", "mAP", "Δ points", "speed-up measured (engine)",
         "BOPs fp32/this (estimate)", "weight bits removed", "weights quantized", "parameters"],
        [[r["step"] or "original", _added(globs, r), r["layers"],
          r.get("epochs", "–"), r["mAP"], _fmt(r["delta_points"], "{:+.2f}"),
          _fmt(r["measured_speedup"]["speedup"] if r["measured_speedup"] else None, "{:.2f}x"),
          f"{r['bops_speedup']:.2f}x", f"{r['weight_bits_removed'] * 100:.2f} %",
          f"{r['weights_quantized'] * 100:.2f} %", r["parameters"]] for r in rows])
        + "\n\nEach step quantizes its convs on top of the previous steps' and fine-tunes the epochs of its row "
        "from the previous step. "
        + ("Binary activation scale: XNOR-Net's K(x) per output position (--binary-scale spatial). "
           if config.method == "binary" and config.binary_scale == "spatial" else "")
        + (f"Speed-up measured: the fp32 parent in torch eager against the step's model with its binary convs "
           "and Linears in the bitpacked XNOR engine (both with BatchNorm folded into the conv before it), "
           f"batch 1, {measured['threads']} thread(s), interleaved in "
           f"one run on {measured['cpu']} ({', '.join(measured['instruction_sets']) or 'no SIMD extension listed'})."
           if measured else "No kernel runs these bit widths: only the BOPs estimate is given.")
        + " BOPs = MACs x weight bits x activation bits summed over convs (float convs 32 x 32). Weight bits removed "
        "= 1 - quantized parameter bits / fp32 parameter bits; weights quantized = share of all parameters that "
        "became low-bit (the source's 'weight compressing').")
    if gallery:
        report.add("fp32 vs every step, same test images", "\n".join(f"![{g}]({g})" for g in gallery))
    kd = teacher is not None
    report.add("Training", md_table(
        ["step", "epoch", "regression loss", "classification loss", *(["imitation loss"] if kd else []), "seconds"],
        [[h["step"], h["epoch"], h["regression_loss"], h["classification_loss"],
          *([h.get("imitation_loss")] if kd else []), h["seconds"]] for h in history]))
    if kd:
        from qcompress.jobs.finetune import mask_words

        report.add("Teacher", f"Every step imitates {Path(teacher['teacher']).name} (fine-grained feature imitation, "
                   f"Wang et al. 2019) at {teacher['imitated']}, weight {teacher['imitation']:g}{mask_words(teacher)}.")
    report.data.update({
        "command": "qat", "mode": "steps", "model": model_summary(detector), "method": config.method,
        "steps": config.steps, "rows": rows, "history": history, "gallery": gallery, "seconds": seconds,
        "teacher": teacher,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()
                   if k not in ("model", "data", "distill")},
        "versions": versions(),
    })
    return report


__all__ = ["epochs_per_step", "parse_step_epochs", "parse_steps", "resolve_steps", "run_steps", "steps_report"]
