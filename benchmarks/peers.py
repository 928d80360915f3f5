"""Our int8 recipe against the int8 tools users would otherwise pick, on one float checkpoint, in one run.

Rows (``--peers`` picks a subset; every row uses the same float checkpoint and the same calibration images):

- ``torch-fp32``             torch eager float32;
- ``qcompress-int8``         our default recipe (``quantize_detector`` with default ``QuantizeOptions``: x86,
                             per-channel weights, histogram activations) in torch eager;
- ``ort-fp32``               the float model exported with ``export_onnx``, run by ONNX Runtime;
- ``ort-qcompress-int8``     our eager int8 model exported as a QDQ graph carrying our scales, in ONNX Runtime;
- ``openvino-fp32`` / ``openvino-qcompress-int8``  the same two ONNX files compiled by OpenVINO (if installed);
- ``ort-minmax`` / ``ort-entropy`` / ``ort-percentile``  ONNX Runtime's own ``quantize_static`` (QDQ,
                             per-channel QInt8 weights, QUInt8 activations) of the exported float ONNX,
                             calibrated with that method (entropy and percentile are slow);
- ``ort-minmax-rr``          the same with ``reduce_range=True`` (7-bit weights), which ONNX Runtime recommends
                             on x86 CPUs without VNNI, where its u8s8 kernels can saturate;
- ``nncf-int8``              NNCF post-training quantization of the float ONNX, run by OpenVINO (if nncf imports).

Latency: batch 1, network only (pre-processing and decoding excluded), every row timed in ONE
``interleaved_latency`` round-robin, torch threads = ONNX Runtime intra-op threads = OpenVINO threads =
``--threads``. Accuracy: VOC07 mAP on the default model's generated test split, or with ``--face`` the
fidelity AP .50:.95 and AP50 of each row against the fp32 torch model's detections on COCO val2017 person
images (no face labels needed). Size: the file each runtime loads.

    python benchmarks/peers.py --limit 100 --calib-images 64
    python benchmarks/peers.py --face --model version-RFB-320.pth --arch ultralight-rfb --limit 100

Writes ``eval_results/peers-<model>.md`` and ``.json``. Exits 1 when nothing could be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import platform
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"  # default: ../shared/assets
# ONNX Runtime's own static quantization: row -> (calibration method, reduce_range)
ORT_OWN = {"ort-minmax": ("minmax", False), "ort-minmax-rr": ("minmax", True), "ort-entropy": ("entropy", False),
           "ort-percentile": ("percentile", False)}
PEERS = ("torch-fp32", "qcompress-int8", "ort-fp32", "ort-qcompress-int8", "openvino-fp32",
         "openvino-qcompress-int8", *ORT_OWN, "nncf-int8")
LATENCY_BAR = 1.05  # our int8 in ONNX Runtime may take at most this times ONNX Runtime's own int8
EXPORT_BAR = 0.002  # exported int8 accuracy within this of eager int8


@dataclass
class Row:
    name: str
    runtime: str
    precision: str
    what: str
    detector: Any = None  # a Detector whose .model is timed and evaluated
    size_bytes: int | None = None
    engine: str | None = None  # torch quantized engine for eager int8
    latency: Any = None  # LatencyStats
    accuracy: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "runtime": self.runtime, "precision": self.precision, "what": self.what,
                "size_bytes": self.size_bytes, "latency": self.latency.as_dict() if self.latency else None,
                "accuracy": self.accuracy, "seconds": self.seconds, "notes": self.notes}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="float checkpoint (default: the embedded default; with --face: version-RFB-320.pth; a bare "
                        "file name is looked up in ASSETS/weights/ultralight_face)")
    p.add_argument("--face", action="store_true",
                   help="Ultra-Light face detector on COCO person images, accuracy = fidelity to fp32")
    p.add_argument("--arch", default=None, choices=("ultralight-rfb", "ultralight-slim"),
                   help="face architecture (default: from the file name)")
    p.add_argument("--input-size", type=int, default=None, help="face: 320 or 640 (default: from the file name)")
    p.add_argument("--assets", type=Path, default=ASSETS, help="shared assets folder (default: %(default)s)")
    p.add_argument("--data", type=Path, default=None, help="VOC folder (default: the generated dataset)")
    p.add_argument("--split", default="test", help="VOC image set for mAP")
    p.add_argument("--calib-split", default="train", help="VOC image set calibration images come from")
    p.add_argument("--limit", type=int, default=100, help="first N images for accuracy")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, choices=(1, 2),
                   help="torch threads = ONNX Runtime intra-op threads = OpenVINO threads")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", type=float, default=0.5, help="face: pseudo ground-truth score threshold")
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS, metavar="PEER",
                   help="subset of rows: " + ", ".join(PEERS))
    p.add_argument("--out-dir", type=Path, default=Path("eval_results"))
    p.add_argument("--report-name", default=None, help="default: peers-<model>")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- machine
def cpu_info() -> dict[str, Any]:
    """CPU model and the instruction sets int8 kernels depend on, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
        model = found.group(1).strip() if found else model
        found = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
        flags = set(found.group(1).split()) if found else set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"model": model, **{flag: flag in flags for flag in wanted}}


def versions() -> dict[str, str]:
    import torch

    found = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "openvino", "nncf"):
        with contextlib.suppress(Exception):
            found[name] = __import__(name).__version__
    return found


# ----------------------------------------------------------------------------------------- inputs
def load_inputs(args: argparse.Namespace):
    """(fp32 detector, evaluation dataset, evaluation indices, calibration batches, model label)."""
    import torch

    from qcompress.core import calibration_batches, load_dataset
    from qcompress.core.checkpoints import load_detector
    from qcompress.core.loading import DataConfig
    from qcompress.data.calibration import calibration_indices
    from qcompress.defaults import default_model_path
    from qcompress.errors import QCompressError

    if not args.face:
        path = args.model or default_model_path()
        fp32 = load_detector(path)
        if (fp32.source.get("sidecar") or {}).get("quantization"):
            raise QCompressError(f"{path} is already quantized", "pass the float checkpoint")
        data = DataConfig("voc", args.data, args.split, None, args.limit)
        test_set = load_dataset(data, fp32.class_names)
        calib_set = load_dataset(data, fp32.class_names, args.calib_split)
        calib = calibration_batches(fp32, calib_set, args.calib_images, args.seed)
        indices = list(range(min(args.limit, len(test_set))))
        return fp32, test_set, indices, calib, Path(path).stem

    from qcompress.data.coco import CocoDataset

    weights, coco = args.assets / "weights" / "ultralight_face", args.assets / "coco_person_val2017"
    if not weights.is_dir() or not coco.is_dir():
        raise QCompressError(f"assets not found under {args.assets}",
                             "pass --assets DIR with weights/ultralight_face and coco_person_val2017")
    path = args.model or Path("version-RFB-320.pth")
    if not path.is_file() and (weights / path).is_file():
        path = weights / path
    arch = args.arch or ("ultralight-slim" if "slim" in path.stem.lower() else "ultralight-rfb")
    size = args.input_size or (640 if "640" in path.stem else 320)
    fp32 = load_detector(path, arch=arch, labels=weights / "face-model-labels.txt", options={"input_size": size})
    dataset = CocoDataset(coco / "images", coco / "instances_person.json", fp32.class_names)
    limit = min(args.limit, len(dataset))
    rest = len(dataset) - limit
    # Calibration images are drawn from the images not used for the fidelity measurement.
    calib_idx = [limit + i for i in calibration_indices(rest, args.calib_images, args.seed)] if rest else []
    if not calib_idx:
        raise QCompressError(f"no images left for calibration after --limit {limit}", "lower --limit")
    images = [fp32.preprocess(dataset.load_image(i)) for i in calib_idx]
    calib = [torch.stack(images[i : i + 16]) for i in range(0, len(images), 16)]
    label = f"face-{arch.removeprefix('ultralight-')}-{size}"
    return fp32, dataset, list(range(limit)), calib, label


# ------------------------------------------------------------------------------------------ peers
def ort_quantize_static(float_onnx: Path, out: Path, calib: list, method: str, reduce_range: bool = False) -> None:
    """ONNX Runtime's own static quantization: QDQ, per-channel QInt8 weights, QUInt8 activations."""
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"images": np.ascontiguousarray(b.numpy())} for b in calib])

        def get_next(self):
            return next(self.feeds, None)

    source = float_onnx
    with contextlib.suppress(Exception):  # shape inference + graph cleanup, as ORT recommends; optional
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = out.with_name(out.stem + "-pre.onnx")
        quant_pre_process(str(float_onnx), str(pre))
        source = pre
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method], reduce_range=reduce_range)


def same_scales(first: Path, second: Path) -> bool:
    """True when two QDQ files carry the same quantization scales (ORT's ``quantize_static`` cannot pass
    ``num_bins`` to its entropy calibrator: 128 histogram bins for 128 quantized bins leave one candidate
    threshold, the full range, i.e. min/max)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def scales(path: Path) -> dict[str, Any]:
        graph = onnx.load(str(path)).graph
        return {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_scale")}

    a, b = scales(first), scales(second)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def nncf_quantize(float_onnx: Path, out_xml: Path, calib: list) -> None:
    """NNCF post-training quantization (its defaults) of the float ONNX, saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(float_onnx))
    samples = [b[i : i + 1].numpy() for b in calib for i in range(b.shape[0])]
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
    ov.save_model(quantized, str(out_xml))


def saved_bytes(model) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def build_rows(args, fp32, calib, work: Path, log: Callable[[str], None]) -> tuple[list[Row], dict[str, Any]]:
    """Every selected row with a detector to time and evaluate; peers that fail get a note instead."""
    import torch

    from qcompress._warnings import quiet_torch_ao
    from qcompress.errors import QCompressError
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector
    from qcompress.runtime.onnx_export import export_onnx
    from qcompress.runtime.onnxruntime import (
        OpenVinoNetwork,
        OrtNetwork,
        load_onnx_detector,
        openvino_available,
    )

    wanted = set(args.peers)
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    exports: dict[str, Any] = {}
    sample = calib[0][:8]
    fp32_path = Path(fp32.source["path"])
    if "torch-fp32" in wanted:
        rows.append(Row("torch-fp32", "torch eager", "float32", "the float checkpoint", fp32, fp32_path.stat().st_size))

    need_ours = wanted & {"qcompress-int8", "ort-qcompress-int8", "openvino-qcompress-int8"}
    ours = record = None
    if need_ours:
        started = time.perf_counter()
        with quiet_torch_ao():
            ours, record = quantize_detector(fp32, calib, QuantizeOptions())
        log(f"qcompress int8 (default recipe) in {time.perf_counter() - started:.1f} s")
        if "qcompress-int8" in wanted:
            rows.append(Row("qcompress-int8", "torch eager", "int8", "qcompress default recipe: x86, per-channel "
                            "weights, histogram activations", ours, saved_bytes(ours.model), engine="x86"))

    float_onnx = work / "fp32.onnx"
    names: list[str] = []
    need_float_onnx = wanted & {"ort-fp32", "openvino-fp32", "nncf-int8", *ORT_OWN}
    if need_float_onnx:
        try:
            exported = export_onnx(fp32, float_onnx, sample)
            names = exported.output_names
            exports["fp32"] = exported.as_dict()
            log(f"float ONNX: {exported.size_bytes / 1e6:.2f} MB, SQNR {min(exported.sqnr_db):.1f} dB")
        except QCompressError as exc:
            for name in need_float_onnx:
                skipped[name] = f"float model not exportable: {exc}"
            need_float_onnx = set()
    int8_onnx = work / "qcompress-int8.onnx"
    ours_exported = False
    if ours is not None and wanted & {"ort-qcompress-int8", "openvino-qcompress-int8"}:
        try:
            with quiet_torch_ao():
                exported = export_onnx(ours, int8_onnx, sample, recipe=record.recipe, backend="x86")
            exports["qcompress-int8"] = exported.as_dict()
            ours_exported = True
            log(f"our int8 ONNX: {exported.size_bytes / 1e6:.2f} MB, kernels {exported.int8_kernels}, "
                f"SQNR vs eager {min(exported.sqnr_db):.1f} dB, vs recipe {min(exported.recipe_sqnr_db or [math.nan]):.1f}")
        except QCompressError as exc:
            for name in ("ort-qcompress-int8", "openvino-qcompress-int8"):
                skipped[name] = f"our int8 model not exportable: {exc}"

    threads = args.threads
    if "ort-fp32" in wanted and need_float_onnx:
        rows.append(Row("ort-fp32", "onnxruntime", "float32", "export_onnx of the float model",
                        load_onnx_detector(float_onnx, threads=threads), float_onnx.stat().st_size))
    if "ort-qcompress-int8" in wanted and ours_exported:
        rows.append(Row("ort-qcompress-int8", "onnxruntime", "int8 QDQ", "export_onnx of our eager int8 model "
                        "(our weights and scales)", load_onnx_detector(int8_onnx, threads=threads),
                        int8_onnx.stat().st_size))
    ov_rows = [n for n in ("openvino-fp32", "openvino-qcompress-int8", "nncf-int8") if n in wanted]
    if ov_rows and not openvino_available():
        skipped.update({n: "openvino is not installed" for n in ov_rows})
    elif ov_rows:
        if "openvino-fp32" in wanted and need_float_onnx:
            rows.append(Row("openvino-fp32", "openvino", "float32", "the float ONNX compiled by OpenVINO",
                            load_onnx_detector(float_onnx, threads=threads, runtime="openvino"),
                            float_onnx.stat().st_size))
        if "openvino-qcompress-int8" in wanted and ours_exported:
            rows.append(Row("openvino-qcompress-int8", "openvino", "int8 QDQ", "our int8 ONNX compiled by OpenVINO",
                            load_onnx_detector(int8_onnx, threads=threads, runtime="openvino"),
                            int8_onnx.stat().st_size))
    for name, (method, reduce_range) in ORT_OWN.items():
        if name not in wanted or not need_float_onnx:
            continue
        out = work / f"{name}.onnx"
        started = time.perf_counter()
        try:
            ort_quantize_static(float_onnx, out, calib, method, reduce_range)
        except Exception as exc:  # noqa: BLE001 - a failed peer is a row note, not the end of the benchmark
            skipped[name] = f"quantize_static failed: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        seconds = time.perf_counter() - started
        log(f"ORT quantize_static ({method}{', reduce_range' if reduce_range else ''}) in {seconds:.1f} s")
        row = Row(name, "onnxruntime", "int8 QDQ", f"ORT quantize_static, {method} calibration, per-channel QInt8 "
                  f"weights{' (reduce_range: 7 bits)' if reduce_range else ''}, QUInt8 activations",
                  fp32.with_model(OrtNetwork(out, "images", names, threads)), out.stat().st_size)
        row.seconds["quantize"] = seconds
        rows.append(row)
    minmax, entropy = work / "ort-minmax.onnx", work / "ort-entropy.onnx"
    if minmax.is_file() and entropy.is_file() and same_scales(minmax, entropy):
        note = ("same scales as ort-minmax: quantize_static gives its entropy calibrator 128 bins for 128 "
                "quantized bins, so the only candidate threshold is the full range")
        next(r for r in rows if r.name == "ort-entropy").notes.append(note)
        log(f"ort-entropy: {note}")
    if "nncf-int8" in wanted and need_float_onnx:
        try:
            import nncf  # noqa: F401
        except ImportError:
            skipped["nncf-int8"] = "nncf is not installed"
        else:
            xml = work / "nncf-int8.xml"
            started = time.perf_counter()
            try:
                nncf_quantize(float_onnx, xml, calib)
                row = Row("nncf-int8", "openvino", "int8", "NNCF quantize (defaults) of the float ONNX -> OpenVINO IR",
                          fp32.with_model(OpenVinoNetwork(xml, "images", names, threads)),
                          xml.stat().st_size + xml.with_suffix(".bin").stat().st_size)
                row.seconds["quantize"] = time.perf_counter() - started
                rows.append(row)
            except Exception as exc:  # noqa: BLE001 - see above
                skipped["nncf-int8"] = f"nncf failed: {type(exc).__name__}: {str(exc)[:200]}"
    torch.backends.quantized.engine = "x86"
    return rows, {"skipped": skipped, "exports": exports}


# ------------------------------------------------------------------------------------- measuring
def evaluate_rows(args, rows: list[Row], fp32, dataset, indices, log: Callable[[str], None]) -> str:
    """Fill each row's accuracy; returns the accuracy key the table ranks by."""
    from qcompress._warnings import quiet_torch_ao
    from qcompress.core import evaluate_detector, evaluate_fidelity
    from qcompress.core.inference import predict_dataset

    reference = None
    if args.face:
        started = time.perf_counter()
        reference = predict_dataset(fp32, dataset, indices)
        log(f"fp32 reference detections on {len(indices)} images in {time.perf_counter() - started:.1f} s "
            f"({sum(int((d.scores >= args.score).sum()) for d in reference)} boxes with score >= {args.score})")
    for row in rows:
        started = time.perf_counter()
        try:
            with quiet_torch_ao():
                if args.face:
                    _, scores = evaluate_fidelity(row.detector, fp32, dataset, len(indices), score_threshold=args.score,
                                                  reference_detections=reference)
                    row.accuracy = {"AP50_95": scores["AP50_95"], "AP50": scores["AP50"], "recall": scores["recall"],
                                    "mean_iou": scores["mean_iou"]}
                else:
                    result, _ = evaluate_detector(row.detector, dataset, "voc07", len(indices))
                    row.accuracy = {"mAP": result.mAP}
        except Exception as exc:  # noqa: BLE001 - keep the other rows
            row.notes.append(f"evaluation failed: {type(exc).__name__}: {str(exc)[:200]}")
        row.seconds["evaluate"] = time.perf_counter() - started
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.accuracy.items())
        log(f"  {row.name}: {shown or 'no accuracy'} ({row.seconds['evaluate']:.1f} s)")
    return "AP50_95" if args.face else "mAP"


def time_rows(args, rows: list[Row], fp32) -> list:
    from qcompress._warnings import quiet_torch_ao
    from qcompress.bench.latency import interleaved_latency

    h, w = fp32.spec.input_size
    with quiet_torch_ao():
        stats = interleaved_latency([r.detector.model for r in rows], (1, 3, h, w), runs=args.runs,
                                    warmup=args.warmup, threads=args.threads, seed=args.seed,
                                    engines=[r.engine for r in rows])
    for row, s in zip(rows, stats, strict=True):
        row.latency = s
    return stats


def _get(rows: list[Row], name: str) -> Row | None:
    return next((r for r in rows if r.name == name and r.latency is not None), None)


def comparisons(rows: list[Row], key: str) -> dict[str, Any]:
    """The issue's bars: our int8 in ORT vs ORT's own int8; exported vs eager int8."""
    found: dict[str, Any] = {"accuracy_key": key, "vs_ort_own": {}, "export": None}
    ours = _get(rows, "ort-qcompress-int8")
    for name in ORT_OWN:
        own = _get(rows, name)
        if ours is None or own is None:
            continue
        ratio = ours.latency.median_ms / own.latency.median_ms
        diff = ours.accuracy.get(key, math.nan) - own.accuracy.get(key, math.nan)
        entry = {"latency_ratio": ratio, "latency_bar": LATENCY_BAR, "latency_met": ratio <= LATENCY_BAR,
                 "latency_ratio_of_minimums": ours.latency.min_ms / own.latency.min_ms,
                 f"{key}_difference": diff, "accuracy_met": diff >= 0}
        if key == "AP50_95":
            entry["AP50_difference"] = ours.accuracy.get("AP50", math.nan) - own.accuracy.get("AP50", math.nan)
        found["vs_ort_own"][name] = entry
    eager = _get(rows, "qcompress-int8")
    if ours is not None and eager is not None:
        diff = ours.accuracy.get(key, math.nan) - eager.accuracy.get(key, math.nan)
        found["export"] = {f"{key}_difference": diff, "bar": EXPORT_BAR, "met": abs(diff) <= EXPORT_BAR}
        if key == "AP50_95":
            found["export"]["AP50_difference"] = ours.accuracy.get("AP50", math.nan) - eager.accuracy.get("AP50", math.nan)
        found["export"]["latency_ratio_ort_over_eager"] = ours.latency.median_ms / eager.latency.median_ms
    return found


# ---------------------------------------------------------------------------------------- report
def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table_rows(rows: list[Row], key: str) -> tuple[list[str], list[list[Any]]]:
    measured = [r for r in rows if r.latency is not None]
    fastest = min(r.latency.median_ms for r in measured)
    scored = [r.accuracy[key] for r in measured if key in r.accuracy and not math.isnan(r.accuracy[key])]
    best = max(scored) if scored else math.nan
    acc_cols = ["fidelity AP .50:.95", "fidelity AP50"] if key == "AP50_95" else ["mAP (voc07)"]
    headers = ["row", "runtime", "precision", "median ms", "p90 ms", "latency / fastest", *acc_cols,
               "accuracy / best", "size MB"]
    body = []
    for r in measured:
        acc = [r.accuracy.get("AP50_95"), r.accuracy.get("AP50")] if key == "AP50_95" else [r.accuracy.get("mAP")]
        value = r.accuracy.get(key, math.nan)
        body.append([r.name, r.runtime, r.precision, _f(r.latency.median_ms, 2), _f(r.latency.p90_ms, 2),
                     _f(r.latency.median_ms / fastest, 3), *[_f(a) for a in acc],
                     _f(value / best if best else math.nan, 4), _f((r.size_bytes or 0) / 1e6, 2)])
    return headers, body


def comparison_lines(found: dict[str, Any]) -> list[str]:
    key = found["accuracy_key"]
    label = "fidelity AP .50:.95" if key == "AP50_95" else "mAP"
    lines = []
    for name, c in found["vs_ort_own"].items():
        extra = f", AP50 {c['AP50_difference']:+.4f}" if "AP50_difference" in c else ""
        lines.append(f"our int8 in ORT vs {name}: latency {c['latency_ratio']:.3f}x of medians "
                     f"(bar <= {LATENCY_BAR}: {'met' if c['latency_met'] else 'NOT met'}; of minimums "
                     f"{c['latency_ratio_of_minimums']:.3f}x), {label} "
                     f"{c[f'{key}_difference']:+.4f}{extra} (bar >= 0: {'met' if c['accuracy_met'] else 'NOT met'})")
    e = found["export"]
    if e is not None:
        extra = f", AP50 {e['AP50_difference']:+.4f}" if "AP50_difference" in e else ""
        lines.append(f"exported int8 (ORT) minus eager int8: {label} {e[f'{key}_difference']:+.4f}{extra} "
                     f"(bar |diff| <= {EXPORT_BAR}: {'met' if e['met'] else 'NOT met'}); latency ORT / eager "
                     f"{e['latency_ratio_ort_over_eager']:.3f}x")
    return lines


def md_table(headers: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in body])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [name for name in ("onnx", "onnxruntime") if importlib_missing(name)]
    import torch

    from qcompress._warnings import install_filters
    from qcompress.bench.latency import describe_timing
    from qcompress.errors import QCompressError
    from qcompress.reports import Report, write_report

    install_filters()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    def log(text: str) -> None:
        print(text, flush=True)

    cpu = cpu_info()
    isa = ", ".join(f"{flag} {'yes' if cpu[flag] else 'no'}" for flag in ("avx2", "avx512f", "avx512_vnni", "avx_vnni"))
    log(f"CPU: {cpu['model']}; {isa}; threads {args.threads}; {', '.join(f'{k} {v}' for k, v in versions().items())}")
    if missing:
        log(f"note: {', '.join(missing)} not installed: only the torch rows can run (pip install onnx onnxruntime)")
        args.peers = [p for p in args.peers if p in ("torch-fp32", "qcompress-int8")]
    try:
        fp32, dataset, indices, calib, label = load_inputs(args)
    except QCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_calib = sum(b.shape[0] for b in calib)
    h, w = fp32.spec.input_size
    log(f"model {fp32.source['path']} ({fp32.spec.arch}, input {w}x{h}); accuracy on {len(indices)} images; "
        f"{n_calib} calibration images shared by every int8 row")
    with tempfile.TemporaryDirectory(prefix="qcompress-peers-") as tmp:
        try:
            rows, info = build_rows(args, fp32, calib, Path(tmp), log)
        except QCompressError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Exception:  # noqa: BLE001 - print it and fail: nothing measured
            traceback.print_exc()
            return 1
        for name, why in info["skipped"].items():
            log(f"skipped {name}: {why}")
        if not rows:
            print("error: no row could be built; nothing measured", file=sys.stderr)
            return 1
        key = evaluate_rows(args, rows, fp32, dataset, indices, log)
        log(f"timing {len(rows)} rows interleaved, {args.runs} runs each ...")
        stats = time_rows(args, rows, fp32)
    measured = [r for r in rows if r.latency is not None]
    if not measured:
        print("error: nothing measured", file=sys.stderr)
        return 1
    headers, body = table_rows(rows, key)
    found = comparisons(rows, key)
    timing = describe_timing(stats)
    notes = [(f"Machine: {cpu['model']}; {isa}. Latency: {timing} Torch threads = ONNX Runtime intra-op threads = "
             f"OpenVINO threads = {args.threads}; network only (pre-processing and decoding excluded).")]
    if args.threads > 1:
        notes.append("With more than one thread ONNX Runtime's pool spins after each run and can slow the next "
                     "model in the round-robin; compare 1-thread runs first.")
    accuracy = (f"fidelity to the fp32 torch model's detections (score >= {args.score}) on the first {len(indices)} "
                "COCO val2017 person images (no face labels)" if args.face else
                f"VOC07 mAP on the first {len(indices)} images of split {args.split!r}")
    notes.append(f"Accuracy: {accuracy}. Calibration: {n_calib} images, the same for every int8 row. "
                 "latency / fastest and accuracy / best: each row against the best row of the table.")
    skipped = [f"{n}: {why}" for n, why in info["skipped"].items()]

    log("")
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body, strict=True)]
    for line in (headers, *body):
        log("  ".join(str(v).rjust(wd) if i > 2 else str(v).ljust(wd) for i, (v, wd) in enumerate(zip(line, widths))))
    log("")
    for line in comparison_lines(found):
        log(line)
    for line in skipped:
        log(f"skipped {line}")

    name = args.report_name or f"peers-{label}"
    report = Report(name, f"int8 peers on {Path(fp32.source['path']).name} ({args.threads} thread(s))")
    report.add("Rows", md_table(headers, body) + "\n\n" + "\n\n".join(notes))
    report.add("Our int8 against ONNX Runtime's own, and exported against eager",
               "\n".join(f"- {line}" for line in comparison_lines(found)) or "- not measured")
    report.add("What each row is", md_table(["row", "what", "notes"],
                                            [[r.name, r.what, "; ".join(r.notes) or "–"] for r in rows]))
    if skipped:
        report.add("Skipped", "\n".join(f"- {line}" for line in skipped))
    report.data.update({
        "command": "benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {"path": fp32.source["path"], "sha256": fp32.source.get("sha256"), "arch": fp32.spec.arch,
                  "input_size": [h, w]},
        "machine": cpu, "versions": versions(), "threads": args.threads, "runs": args.runs,
        "accuracy": {"key": key, "images": len(indices), "description": accuracy},
        "calibration_images": n_calib, "seed": args.seed,
        "rows": [r.as_dict() for r in rows], "comparisons": found, "skipped": info["skipped"],
        "exports": info["exports"],
    })
    json_path, md_path = write_report(report, args.out_dir)
    log(f"report {md_path} and {json_path}")
    return 0


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    sys.exit(main())
