"""Our eager-mode int8 against ONNX Runtime static int8, calibrated on the same images.

Exports the float checkpoint to ONNX, quantizes it with ``onnxruntime.quantization.quantize_static``
(QDQ, per-channel int8 weights, uint8 activations) on the calibration images ``qcompress quantize``
would use (same split, count and seed), quantizes it our way on those same batches (or loads
``--int8-path``), and prints latency (batch 1, network only) and mAP side by side, with the
ours / ORT int8 latency ratio.

Optional dependencies: ``pip install onnx onnxruntime``. Without them the script says so and exits 0.

    python benchmarks/ort_int8.py --limit 200
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path

MISSING = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", type=Path, default=None, help="float checkpoint (default: the embedded model)")
    p.add_argument("--int8-path", type=Path, default=None, help="our int8 checkpoint (default: quantize here)")
    p.add_argument("--data", type=Path, default=None, help="VOC folder (default: the generated dataset)")
    p.add_argument("--split", default="test", help="VOC image set for mAP")
    p.add_argument("--calib-split", default="train")
    p.add_argument("--calib-images", type=int, default=200)
    p.add_argument("--limit", type=int, default=None, help="first N images for mAP")
    p.add_argument("--no-eval", action="store_true", help="latency only")
    p.add_argument("--backend", default="x86", help="our int8 backend: x86 or qnnpack")
    p.add_argument("--ort-calibration", default="minmax", choices=("minmax", "entropy", "percentile"))
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=None, help="keep the .onnx files here (default: a temp dir)")
    return p.parse_args(argv)


def export_onnx(model, input_size: tuple[int, int], path: Path) -> list[str]:
    """Float network -> ONNX with a dynamic batch axis; returns the output names."""
    import torch

    h, w = input_size
    example = torch.zeros(1, 3, h, w)
    with torch.inference_mode():
        outputs = model(example)
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    if not (isinstance(outputs, tuple) and all(isinstance(o, torch.Tensor) for o in outputs)):
        raise SystemExit("this script handles networks whose raw output is a tensor or a tuple of tensors (SSD-style)")
    names = [f"output{i}" for i in range(len(outputs))]
    axes = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but needs no onnxscript
        torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=names,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return names


def ort_quantize(float_path: Path, int8_path: Path, batches, method: str) -> None:
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
            self.feeds = iter([{"images": np.ascontiguousarray(b.numpy())} for b in batches])

        def get_next(self):
            return next(self.feeds, None)

    source = float_path
    with contextlib.suppress(Exception):  # shape inference + graph cleanup, as ORT recommends; optional
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = float_path.with_name(float_path.stem + "-pre.onnx")
        quant_pre_process(str(float_path), str(pre))
        source = pre
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    quantize_static(str(source), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method])


def ort_module(path: Path, threads: int, output_names: list[str]):
    """An ``nn.Module`` running an ONNX Runtime session, so the library's eval and latency code can use it."""
    import onnxruntime as ort
    import torch
    from torch import nn

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    class OrtNetwork(nn.Module):
        def forward(self, images: torch.Tensor):
            outputs = session.run(output_names, {"images": images.contiguous().numpy()})
            tensors = tuple(torch.from_numpy(o) for o in outputs)
            return tensors if len(tensors) > 1 else tensors[0]

    return OrtNetwork()


def _saved_bytes(model) -> int:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def main(argv: list[str] | None = None) -> int:
    if MISSING:
        print(f"skipped: optional dependencies not installed: {', '.join(MISSING)} (pip install onnx onnxruntime)")
        return 0
    args = parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from qcompress import api
    from qcompress._warnings import install_filters
    from qcompress.bench.latency import measure_latency
    from qcompress.core.checkpoints import load_detector
    from qcompress.errors import QCompressError
    from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

    install_filters()
    console = Console()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fp32 = api.load_model(api.ModelConfig(args.model_path))
        if (fp32.source.get("sidecar") or {}).get("quantization"):
            raise QCompressError(f"{fp32.source['path']} is already quantized", "pass the float checkpoint")
        data = api.DataConfig("voc", args.data, args.split, None, args.limit)
        calib_set = api.load_dataset(data, fp32.class_names, args.calib_split)
        calib = api.calibration_batches(fp32, calib_set, args.calib_images, args.seed)
        if args.int8_path is not None:
            ours = load_detector(args.int8_path)
            recipe = (ours.source.get("sidecar") or {}).get("quantization") or {}
            if not recipe:
                raise QCompressError(f"{args.int8_path} is not an int8 checkpoint", "pass the output of qcompress quantize")
            backend, ours_note = recipe.get("backend", "x86"), f"loaded {args.int8_path}"
        else:
            ours, _ = quantize_detector(fp32, calib, QuantizeOptions(backend=args.backend))
            backend, ours_note = args.backend, f"quantized here on the same batches: {args.backend}, histogram, per-channel"
        torch.backends.quantized.engine = backend
    except QCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        float_onnx, int8_onnx = work / "model-fp32.onnx", work / "model-int8-ort.onnx"
        console.print(f"exporting ONNX to {float_onnx} ...")
        names = export_onnx(fp32.model, fp32.spec.input_size, float_onnx)
        console.print(f"ONNX Runtime static quantization on {sum(b.shape[0] for b in calib)} calibration images ...")
        ort_quantize(float_onnx, int8_onnx, calib, args.ort_calibration)
        candidates = {
            "torch fp32": (fp32, Path(fp32.source["path"]).stat().st_size),
            "qcompress int8 (eager)": (ours, _saved_bytes(ours.model)),
            "ORT fp32": (fp32.with_model(ort_module(float_onnx, threads, names)), float_onnx.stat().st_size),
            "ORT int8 (QDQ static)": (fp32.with_model(ort_module(int8_onnx, threads, names)), int8_onnx.stat().st_size),
        }
        h, w = fp32.spec.input_size
        rows = {}
        test_set = None if args.no_eval else api.load_dataset(data, fp32.class_names)
        for name, (detector, size) in candidates.items():
            latency = measure_latency(detector.model, (1, 3, h, w), args.runs, args.warmup, threads, args.seed)
            mAP = None
            if test_set is not None:
                result, _ = api.evaluate_detector(detector, test_set, "voc07", args.limit)
                mAP = result.mAP
            rows[name] = (latency, mAP, size)
            console.print(f"  {name}: {latency.median_ms:.2f} ms" + (f", mAP {mAP:.4f}" if mAP is not None else ""))

    table = Table(title=f"int8: qcompress eager vs ONNX Runtime — {Path(fp32.source['path']).name}, {threads} threads")
    for col in ("runtime", "median ms", "p90 ms", "images/s", "mAP (voc07)", "file MB"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for name, (latency, mAP, size) in rows.items():
        table.add_row(name, f"{latency.median_ms:.2f}", f"{latency.p90_ms:.2f}", f"{latency.images_per_second:.1f}",
                      "–" if mAP is None else f"{mAP:.4f}", "–" if size is None else f"{size / 1e6:.2f}")
    console.print(table)
    ours_lat, ours_map, _ = rows["qcompress int8 (eager)"]
    ort_lat, ort_map, _ = rows["ORT int8 (QDQ static)"]
    console.print(f"ours / ORT int8 latency ratio (median, batch 1): {ours_lat.median_ms / ort_lat.median_ms:.3f}")
    if ours_map is not None:
        console.print(f"mAP side by side: qcompress int8 {ours_map:.4f} | ORT int8 {ort_map:.4f} "
                      f"| fp32 {rows['torch fp32'][1]:.4f}")
    console.print(f"[dim]our int8: {ours_note}; ORT: QDQ, per-channel QInt8 weights, QUInt8 activations, "
                  f"{args.ort_calibration} calibration; {args.runs} timed runs after {args.warmup} warm-up.[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
