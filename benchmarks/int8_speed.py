"""int8 vs fp32 latency of the same detector network, measured in one run.

    python benchmarks/int8_speed.py [--model-path M] [--threads 1 2] [--runs 50]

Calibrates on generated images (histogram observer, per-channel weights) and times the raw network
forward pass at batch 1 (decoding/NMS excluded: they are float in both).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qcompress._warnings import install_filters
from qcompress.api import ModelConfig, calibration_batches, load_model
from qcompress.bench.latency import measure_latency
from qcompress.data.synthetic import RenderedSplit
from qcompress.quant.pipeline import QuantizeOptions, quantize_detector


def main() -> None:
    install_filters()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--calib-images", type=int, default=32)
    parser.add_argument("--backend", default="x86")
    args = parser.parse_args()

    detector = load_model(ModelConfig(args.model_path))
    calib = calibration_batches(detector, RenderedSplit("train", args.calib_images), args.calib_images, seed=0)
    qdet, _ = quantize_detector(detector, calib, QuantizeOptions(backend=args.backend))
    h, w = detector.spec.input_size
    print(f"model: {detector.source['path']}  input {h}x{w}  backend {args.backend}  torch {torch.__version__}")
    print(f"{'threads':>7} {'fp32 ms':>9} {'int8 ms':>9} {'int8/fp32':>9}")
    for threads in args.threads:
        fp32 = measure_latency(detector.model, (1, 3, h, w), runs=args.runs, warmup=10, threads=threads)
        int8 = measure_latency(qdet.model, (1, 3, h, w), runs=args.runs, warmup=10, threads=threads)
        print(f"{threads:>7} {fp32.median_ms:>9.2f} {int8.median_ms:>9.2f} {int8.median_ms / fp32.median_ms:>9.3f}")


if __name__ == "__main__":
    main()
