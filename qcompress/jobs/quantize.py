"""``qcompress quantize``: eager-mode int8 of a float checkpoint, and the recipe-comparison table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qcompress.bench.latency import describe_timing
from qcompress.core import (
    DataConfig,
    EvalResult,
    ModelConfig,
    Progress,
    add_overlap_and_fidelity_sections,
    calibration_batches,
    calibration_dataset,
    evaluate_detector,
    load_dataset,
    load_float_parent,
    load_model,
    model_summary,
    no_progress,
    output_names,
)
from qcompress.core.checkpoints import save_detector, versions
from qcompress.core.context import restores_torch_state
from qcompress.defaults import DEFAULT_REPORTS
from qcompress.errors import QCompressError
from qcompress.io_utils import check_writable
from qcompress.jobs.onnx_latency import onnx_rows
from qcompress.models.detector import Detector
from qcompress.reports import Report, check_report_target, md_table, write_report


@dataclass(frozen=True)
class QuantizeJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
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
    adaround: bool = False  # learned rounding (Nagel et al. 2020), see qcompress.quant.adaround
    adaround_iters: int = 500
    weight_bits: int = 8  # 4: W4A8, 16 weight levels inside the int8 kernels
    seed: int = 0
    out: Path | None = None  # default: trained_models/quantized/<parent>-int8.pth
    evaluate: bool = True
    latency_runs: int = 20
    threads: int | None = None
    report_name: str | None = None
    out_dir: Path = DEFAULT_REPORTS
    fidelity: bool | None = None  # int8 vs fp32 detections; None: when the test data has no labels for the classes
    fidelity_score: float = 0.5
    # Accuracy target: keep the fewest layers float such that the score drops at most this many points
    # (mAP x 100, or fidelity AP50 x 100 where fidelity is evaluated); see qcompress.quant.sensitivity.
    max_drop: float | None = None
    # How --max-drop ranks layers: "sqnr" (one forward pass per layer: head-output SQNR gain when the layer
    # alone is float) or "measured" (one evaluation per layer: the score gain itself, SQNR gain breaks ties)
    max_drop_ranking: str = "sqnr"
    # Also export fp32 and int8 to temporary .onnx files and time them in ONNX Runtime (threads or 1).
    onnx_latency: bool = True

    def resolved(self) -> QuantizeJobConfig:
        """``data_free`` means the whole data-free recipe: CLE + high-bias absorption + analytic bias
        correction (unless another correction is named), calibrated on BN statistics."""
        if not self.data_free:
            return self
        return replace(self, equalize=True, absorb_bias=True, bias_correction=self.bias_correction or "analytic")


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
    fidelity: dict[str, Any] | None = None  # qcompress.metrics.fidelity.fidelity_scores of int8 vs fp32
    parts: list[list[Any]] = field(default_factory=list)  # [part, precision, layers] where not all int8
    timing: Any = None  # jobs.onnx_latency.EagerAndOnnxLatency: eager and ONNX Runtime latencies of both
    search: dict[str, Any] | None = None  # --max-drop: the ranking, every evaluated split, the chosen one


@restores_torch_state
def quantize(config: QuantizeJobConfig, progress: Progress = no_progress) -> tuple[QuantizeResult, Report]:
    """``qcompress quantize``: eager-mode int8 of a float checkpoint, saved and compared with its parent."""
    config = config.resolved()
    check_max_drop(config)
    check_writable(config.out_dir, "--out-dir", is_dir=True)
    from qcompress._warnings import quiet_torch_ao
    from qcompress.jobs.onnx_latency import eager_and_onnx_latency
    from qcompress.quant.parts import parts_summary
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

    parent_path, detector, out = load_float_parent(config.model, config.out, _recipe_suffix(config), "quantized")
    report_name = config.report_name or f"quantize-{out.stem}"
    check_report_target(config.out_dir, report_name, [out])
    options = QuantizeOptions(
        backend=config.backend, observer=config.observer, per_channel=config.per_channel, skip=config.skip,
        equalize=config.equalize, absorb_bias=config.absorb_bias, bias_correction=config.bias_correction,
        data_free=config.data_free, adaround=config.adaround, adaround_iters=config.adaround_iters,
        weight_bits=config.weight_bits, seed=config.seed,
    )
    options.validate(have_data=True)  # bad options fail before any image is read
    calib = []
    if not config.data_free:
        if config.calib_images <= 0:
            raise QCompressError(f"--calib-images must be positive, got {config.calib_images}", "or use --data-free")
        calib_set = calibration_dataset(config.data, detector.class_names, config.calib_split)
        advance = progress("calibration images", None)
        calib = calibration_batches(detector, calib_set, config.calib_images, config.seed)
        advance(sum(b.shape[0] for b in calib))
    with quiet_torch_ao():
        qdet, record = quantize_detector(detector, calib, options, on_layer=_layer_progress(progress, "adaround"))
    # Measure: accuracy, speed, size, where the error is.
    h, w = detector.spec.input_size
    fp32_eval = int8_eval = fidelity = test_set = search = None
    if config.evaluate:
        test_set = load_dataset(config.data, detector.class_names)
        metric = "coco" if config.data.dataset == "coco" else "voc07"
        fp32_eval, fp32_dets = evaluate_detector(detector, test_set, metric, config.data.limit, progress=progress, description="eval fp32")
        if config.max_drop is not None:  # before anything is saved: an unreachable target writes nothing
            with quiet_torch_ao():
                qdet, record, search = _meet_target(
                    config, detector, qdet, record, options, calib, test_set, metric, fp32_eval, fp32_dets, progress)
    recipe = {**record.recipe, "calib_images": 0 if config.data_free else sum(b.shape[0] for b in calib),
              "calib_split": None if config.data_free else config.calib_split, "seed": config.seed}
    if search is not None:
        recipe["max_drop"] = {k: search[k] for k in ("points", "metric", "reference", "target", "float_layers")}
    save_detector(qdet, out, parent=parent_path, quantization=recipe,
                  compression=[{"step": "quantize", **recipe}])
    if config.evaluate:
        with quiet_torch_ao():
            int8_eval, int8_dets = evaluate_detector(qdet, test_set, metric, config.data.limit, progress=progress, description="eval int8")
        if config.fidelity or (config.fidelity is None and fp32_eval.num_objects == 0):
            from qcompress.metrics.fidelity import fidelity_scores

            fidelity = fidelity_scores(fp32_dets, int8_dets, detector.class_names, config.fidelity_score)
    probe = calib[:1] if calib else [_random_probe(h, w, config.seed)]
    # Exports are verified on real images where there are any (random input says little about int8).
    sample = probe[0][:8] if calib or test_set is None else _first_images(detector, test_set, 8)
    with quiet_torch_ao():
        timing = eager_and_onnx_latency(
            [detector, qdet], sample, engines=[None, config.backend], recipes=[None, recipe],
            runs=config.latency_runs, threads=config.threads, seed=config.seed, onnx=config.onnx_latency,
            onnx_threads=config.threads or 1)
    fp32_lat, int8_lat = timing.eager
    with quiet_torch_ao():
        from qcompress.quant.sqnr import layer_sqnr, output_sqnr

        # against the ORIGINAL float model (only BN folded), so CLE / absorption / BC costs show
        sqnr = layer_sqnr(record.float_reference, qdet.model, [b[:8] for b in probe], align=record.channel_maps)
        import torch

        with torch.inference_mode():
            out_sqnr = output_sqnr(detector.model(probe[0][:8]), qdet.model(probe[0][:8]))
    result = QuantizeResult(
        out=out, recipe=recipe, fp32=fp32_eval, int8=int8_eval, fp32_latency=fp32_lat, int8_latency=int8_lat,
        fp32_bytes=parent_path.stat().st_size, int8_bytes=out.stat().st_size, layer_sqnr=sqnr,
        output_sqnr=out_sqnr, steps=record.steps, fidelity=fidelity, parts=parts_summary(qdet.model, recipe),
        timing=timing, search=search,
    )
    if search is not None:  # the final split, re-quantized with --skip, on the fp32 reference's images
        search["final_score"] = _target_score(search["metric"], int8_eval, fidelity)
        search["final_meets"] = bool(search["final_score"] >= search["target"])
    report = quantize_report(report_name, detector, result)
    write_report(report, config.out_dir)
    return result, report


def check_max_drop(config: QuantizeJobConfig) -> None:
    """--max-drop: a finite number of points >= 0, and the evaluation it needs."""
    if config.max_drop is None:
        return
    if not math.isfinite(config.max_drop) or config.max_drop < 0:
        raise QCompressError(f"--max-drop must be a finite number of points >= 0, got {config.max_drop}",
                             "e.g. --max-drop 0.5: at most half a mAP point below fp32")
    if not config.evaluate:
        raise QCompressError("--max-drop needs the evaluation", "drop --no-eval")
    if config.max_drop_ranking not in ("sqnr", "measured"):
        raise QCompressError(f"unknown --max-drop-ranking {config.max_drop_ranking!r}", "use sqnr or measured")


def _target_score(metric: str, result: EvalResult | None, fidelity: dict[str, Any] | None) -> float:
    if metric == "fidelity AP50":
        return float("nan") if fidelity is None or fidelity.get("AP50") is None else float(fidelity["AP50"])
    return float("nan") if result is None else float(result.mAP)


def _meet_target(
    config: QuantizeJobConfig, detector: Detector, qdet: Detector, record: Any, options: Any, calib: list,
    test_set: Any, metric: str, fp32_eval: EvalResult, fp32_dets: list, progress: Progress,
) -> tuple[Detector, Any, dict[str, Any]]:
    """--max-drop: rank the int8 layers by sensitivity, search the fewest to keep float on the
    evaluation images (int8 model with float twins swapped in: no re-calibration per split), then
    quantize again with those layers as --skip islands. Raises before anything is written when even
    all layers but the least sensitive float cannot meet the target."""
    import time

    import torch

    from qcompress.metrics.fidelity import fidelity_scores
    from qcompress.quant.pipeline import quantize_detector
    from qcompress.quant.sensitivity import (
        fewest_float_layers,
        float_candidates,
        keep_float_gains,
        meets,
        rank_layers,
        with_float_layers,
    )
    from qcompress.quant.sqnr import layer_sqnr

    started = time.perf_counter()
    use_fidelity = bool(config.fidelity or (config.fidelity is None and fp32_eval.num_objects == 0))
    what = "fidelity AP50" if use_fidelity else f"mAP ({metric})"
    reference = (fidelity_scores(fp32_dets, fp32_dets, detector.class_names, config.fidelity_score)["AP50"]
                 if use_fidelity else fp32_eval.mAP)
    if reference is None or not math.isfinite(reference):
        raise QCompressError(f"the fp32 {what} is not a number on these images, so --max-drop has no reference",
                             "use images with labels (or detections) for the model's classes")
    target = reference - config.max_drop / 100
    layers = float_candidates(qdet.model)
    order = {name: i for i, name in enumerate(layers)}
    scores: dict[frozenset[str], float] = {}

    def evaluate(float_layers: frozenset[str]) -> float:
        if float_layers not in scores:
            model = with_float_layers(qdet.model, record.float_fused, sorted(float_layers, key=order.__getitem__))
            result, dets = evaluate_detector(qdet.with_model(model), test_set, metric, config.data.limit,
                                             progress=progress, description=f"eval {len(float_layers)} float")
            scores[float_layers] = (_target_score(what, None, fidelity_scores(
                fp32_dets, dets, detector.class_names, config.fidelity_score)) if use_fidelity else result.mAP)
        return scores[float_layers]

    search: dict[str, Any] = {"points": config.max_drop, "metric": what, "reference": reference, "target": target,
                              "images": fp32_eval.num_images}
    all_int8 = evaluate(frozenset())
    if meets(all_int8, target):  # nothing to search: no ranking needed
        search.update(ranking="not needed: every layer int8 meets the target", ranked=[],
                      trials=[{"float_layers": 0, "score": all_int8, "meets": True}], float_layers=[],
                      search_score=all_int8, search_seconds=time.perf_counter() - started)
        return qdet, record, search
    images = torch.cat(calib)[:8] if calib else _first_images(detector, test_set, 8)
    gains = keep_float_gains(qdet.model, record.float_fused, detector.model, layers, images,
                             on_layer=_layer_progress(progress, "sensitivity"))
    sqnr = layer_sqnr(record.float_reference, qdet.model, [images], align=record.channel_maps)
    ranking = ("keep-float gain: dB the worst raw head output's SQNR vs fp32 gains when the layer alone is "
               f"float ({images.shape[0]} images)" if gains is not None else
               f"per-layer SQNR, lowest first ({images.shape[0]} images; the outputs are not raw tensors)")
    measured = None
    if config.max_drop_ranking == "measured":
        measured = {n: evaluate(frozenset({n})) - all_int8 for n in layers}
        ranked = rank_layers(layers, measured, sqnr, tiebreak=gains)
        ranking = f"measured {what} gain when the layer alone is float ({fp32_eval.num_images} images); ties by {ranking}"
    else:
        ranked = rank_layers(layers, gains, sqnr)
    found = fewest_float_layers(ranked, evaluate, target, what)
    search.update(
        ranking=ranking,
        ranked=[{"layer": n, "keep_float_gain_db": gains.get(n) if gains else None, "sqnr_db": sqnr.get(n),
                 "measured_gain": measured.get(n) if measured else None} for n in ranked],
        trials=[{"float_layers": t.float_layers, "score": t.score, "meets": t.meets} for t in found.trials],
        float_layers=found.float_layers, search_score=found.score, search_seconds=time.perf_counter() - started)
    if found.chosen:
        final = replace(options, skip=(*options.skip, *found.float_layers))
        qdet, record = quantize_detector(detector, calib, final, on_layer=_layer_progress(progress, "adaround"))
    return qdet, record, search


def _layer_progress(progress: Progress, description: str):
    """on_layer(name, k, n) for quantize_detector -> one progress bar of n layers."""
    bar: list = []

    def on_layer(name: str, k: int, n: int) -> None:
        if not bar:
            bar.append(progress(description, n))
        elif k > 1:
            bar[0](1)

    return on_layer


def _random_probe(h: int, w: int, seed: int):
    import torch

    return torch.randn(8, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _first_images(detector: Detector, dataset: Any, count: int):
    import torch

    return torch.stack([detector.preprocess(dataset.load_image(i)) for i in range(min(count, len(dataset)))])


def _recipe_suffix(config: QuantizeJobConfig) -> str:
    parts = ["int8" if config.weight_bits == 8 else f"w{config.weight_bits}a8", "pc" if config.per_channel else "pt"]
    if config.adaround:
        parts.append("adaround")
    if config.max_drop is not None:
        parts.append(f"maxdrop{config.max_drop:g}")
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
        ["latency median ms (batch 1), torch eager", r.fp32_latency.median_ms, r.int8_latency.median_ms,
         r.int8_latency.median_ms / r.fp32_latency.median_ms],
        ["latency p90 ms, torch eager", r.fp32_latency.p90_ms, r.int8_latency.p90_ms,
         r.int8_latency.p90_ms / r.fp32_latency.p90_ms],
        *(onnx_rows(r.timing) if r.timing else []),
        ["size on disk bytes (.pth)", r.fp32_bytes, r.int8_bytes, r.int8_bytes / r.fp32_bytes],
    ]
    timed = [r.fp32_latency, r.int8_latency, *(r.timing.timed_onnx() if r.timing else [])]
    report.add("fp32 vs int8", md_table(["", "fp32", "int8", "int8 / fp32"], rows)
               + f"\n\nLatency: {describe_timing(timed)} {r.timing.describe() if r.timing else ''} "
               f"Input {tuple(detector.spec.input_size)}.")
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
    if r.search is not None:
        _add_search_sections(report, r.search)
    worst = sorted(r.layer_sqnr.items(), key=lambda kv: kv[1])[:10]
    report.add("Worst layers by SQNR (int8 vs fp32 output at that layer, dB)", md_table(["layer", "SQNR dB"], worst))
    report.add("Raw head outputs SQNR (dB)", md_table(["output", "SQNR dB"], list(zip(output_names(detector, len(r.output_sqnr)), r.output_sqnr))))
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
        "latency_runtime": "torch eager (fp32_latency, int8_latency); onnxruntime (ort_fp32_latency, ort_int8_latency)",
        "ort_fp32_latency": r.timing.onnx_json(0) if r.timing else None,
        "ort_int8_latency": r.timing.onnx_json(1) if r.timing else None,
        "fp32_bytes": r.fp32_bytes,
        "int8_bytes": r.int8_bytes,
        "size_ratio": r.int8_bytes / r.fp32_bytes,
        "layer_sqnr_db": r.layer_sqnr,
        "output_sqnr_db": r.output_sqnr,
        "parts": [{"part": p, "precision": q, "layers": n} for p, q, n in r.parts],
        "steps": r.steps,
        "fidelity": r.fidelity,
        "max_drop": r.search,
        "versions": versions(),
    })
    return report


def _add_search_sections(report: Report, s: dict[str, Any]) -> None:
    ranked = [row["layer"] for row in s["ranked"]]
    rows = []
    for t in s["trials"]:
        k = t["float_layers"]
        floated = ", ".join(ranked[:k]) if k <= 4 else f"{', '.join(ranked[:3])}, … ({k - 3} more)"
        rows.append([k, floated or "(none: all int8)", t["score"], "yes" if t["meets"] else "no"])
    final = s.get("final_score")
    report.add(
        f"Accuracy target: at most {s['points']:g} points of {s['metric']} below fp32 (--max-drop)",
        f"fp32 {s['metric']} {s['reference']:.4f} on {s['images']} images, target >= {s['target']:.4f}. "
        "Splits keep the k most sensitive layers float (the rest int8); the widest split (all but the least "
        "sensitive float) is evaluated first, then the smallest k meeting the target is searched; each split "
        "is the int8 model with float twins swapped in (no re-calibration). All int8 is evaluated before "
        "the ranking: when it meets the target there is nothing to search.\n\n"
        + md_table(["float layers k", "float", s["metric"], "meets target"], rows)
        + f"\n\nChosen: **{len(s['float_layers'])}** float layer(s)"
        + (f" ({', '.join(s['float_layers'])})" if s["float_layers"] else "")
        + f", searched in {s['search_seconds']:.0f} s. Final model (re-quantized with these as --skip islands, "
        f"same {s['images']} images as fp32): {s['metric']} "
        + (f"{final:.4f}, target {'met' if s.get('final_meets') else 'MISSED'}." if final is not None else "not evaluated."))
    if not s["ranked"]:
        return
    report.add("Sensitivity ranking (most sensitive first)", f"Ranked by {s['ranking']}.\n\n" + md_table(
        ["rank", "layer", f"measured {s['metric']} gain", "keep-float gain dB", "per-layer SQNR dB"],
        [[i + 1, row["layer"], row.get("measured_gain"), row["keep_float_gain_db"], row["sqnr_db"]]
         for i, row in enumerate(s["ranked"][:15])]))


@restores_torch_state
def recipe_table(config: QuantizeJobConfig, progress: Progress = no_progress) -> tuple[float, list[Any], Report]:
    """The data-free ladder (naive per-tensor, +CLE, +BA, +BC, data-free, per-channel, calibrated),
    each recipe evaluated on the same test images; nothing is saved but the report."""
    config = config.resolved()
    if config.max_drop is not None:
        raise QCompressError("--max-drop searches one model's float layers; --recipe-table compares recipes",
                             "use one of them")
    check_writable(config.out_dir, "--out-dir", is_dir=True)
    from qcompress._warnings import quiet_torch_ao
    from qcompress.jobs.recipes import run_recipes

    detector = load_model(config.model)
    calib_set = calibration_dataset(config.data, detector.class_names, config.calib_split)
    calib = calibration_batches(detector, calib_set, config.calib_images, config.seed)
    test_set = load_dataset(config.data, detector.class_names)
    metric = "coco" if config.data.dataset == "coco" else "voc07"

    current = ["eval"]

    def score(det: Detector) -> float:
        with quiet_torch_ao():
            result, _ = evaluate_detector(det, test_set, metric, config.data.limit, progress=progress,
                                          description=current[0])
        return result.mAP

    def on_recipe(name: str) -> None:
        current[0] = f"eval {name}"

    with quiet_torch_ao():
        fp32, rows = run_recipes(detector, calib, score, backend=config.backend, on_recipe=on_recipe)
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
