"""Where a low-bit fine-tune starts: mAP of the embedded default right after LSQ quantizers take their first
values (no training), for several starts of the activation steps. The README's "before any training" numbers.

Each variant wraps the backbone convs with LSQ (``--bits`` weights and activations), lets every quantizer
initialise on the same calibration batch, and evaluates VOC07 mAP on the first ``--limit`` test images.
Activation step starts: ``mean`` (LSQ's 2 mean|x| / sqrt(Qp), a from-scratch start) or ``pQ`` (the Q-th
quantile of |x| / Qp; ``p0.999`` is qcompress's default).

Usage: python benchmarks/lowbit_start.py [--limit 200] [--variants mean p0.999 p0.99 p0.9999]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from qcompress._warnings import install_filters
from qcompress.core import DataConfig, ModelConfig
from qcompress.core.evaluation import evaluate_detector
from qcompress.core.loading import calibration_batches, load_dataset, load_model
from qcompress.models.registry import compression_spec
from qcompress.quant.lowbit import LowBitConv2d, LSQQuantizer, apply_lowbit, initialize_lowbit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="test images (the first N)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--calib-images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["mean", "p0.999", "p0.99", "p0.9999"])
    args = parser.parse_args(argv)
    install_filters()
    torch.set_num_threads(args.threads)
    detector = load_model(ModelConfig())
    test = load_dataset(DataConfig(limit=args.limit), detector.class_names)
    calib = calibration_batches(detector, load_dataset(DataConfig(), detector.class_names, "train"),
                                args.calib_images, 0)
    fp32 = evaluate_detector(detector, test, limit=args.limit)[0].mAP
    print(f"embedded default, LSQ w{args.bits}a{args.bits} backbone, no training, first {args.limit} test images")
    print(f"| activation step start | mAP | Δ points |\n|---|---|---|\n| fp32 | {fp32:.4f} | |")
    for variant in args.variants:
        quantized = copy.deepcopy(detector)
        record = apply_lowbit(quantized.model, "lsq", args.bits, args.bits, "backbone",
                              spec=compression_spec(detector.spec.arch))
        percentile = None if variant == "mean" else float(variant.removeprefix("p"))
        for name in record.layers:
            layer = quantized.model.get_submodule(name)
            if isinstance(layer, LowBitConv2d):
                layer.input_quantizer = LSQQuantizer(args.bits, activation=True, percentile=percentile)
        initialize_lowbit(quantized.model, calib)
        m = evaluate_detector(quantized, test, limit=args.limit)[0].mAP
        print(f"| {variant} | {m:.4f} | {(m - fp32) * 100:+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
