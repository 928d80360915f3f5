"""Issue 19's speed-up columns on the full-width VGG16 Faster R-CNN at 600 px (random weights: latency
does not depend on them): each cumulative binarization step of the 1-bit Faster R-CNN table, the fp32
network in torch eager against the step's network with its binary convs and Linears in the XNOR engine,
interleaved in one run, beside the BOPs estimate and the share of weight bits removed.

Usage: python benchmarks/fasterrcnn_steps_speed.py [--size 600] [--width 1] [--fc 4096] [--threads 1]
       [--binary-scale layer|spatial] [--keep-first] [--runs 10]
(--runs timed runs per model and step, interleaved, medians; --size 320 --width 0.25 --fc 512 is the embedded example's shape, and
--keep-first its steps: conv1_1 stays float, as in the trained step table; the source binarized it)
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from qcompress._warnings import install_filters
from qcompress.bench.size import conv_macs, estimate_bops, weight_compression
from qcompress.data.synthetic import SYNTH_CLASSES
from qcompress.jobs.qat_steps import _measured_speedup, parse_steps, resolve_steps
from qcompress.models.registry import build_detector
from qcompress.quant.lowbit import initialize_lowbit, wrap_convs

# The source's steps: conv1_x + conv2_x; conv3_x; conv4_x; conv5_x; fc6 (extractor indices of VGG16's convs).
STEPS = ("extractor.0,extractor.2,extractor.5,extractor.7;extractor.10,extractor.12,extractor.14;"
         "extractor.17,extractor.19,extractor.21;extractor.24,extractor.26,extractor.28;head.classifier.0")
SOURCE = {1: (1.83, 0.18), 2: (2.13, 1.22), 3: (2.37, 5.39), 4: (2.57, 10.39), 5: (2.65, 83.02)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=600)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--fc", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--binary-scale", choices=("layer", "spatial"), default="layer",
                        help="activation scale of the binary layers (as qat --binary-scale)")
    parser.add_argument("--keep-first", action="store_true",
                        help="conv1_1 stays float (the embedded example's steps); default: binarized, as the source")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model and step (medians)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    install_filters()
    torch.manual_seed(0)
    detector = build_detector("fasterrcnn_vgg16", SYNTH_CLASSES, input_size=args.size, width=args.width, fc=args.fc)
    fp32 = detector.model.eval()
    shape = (1, 3, args.size, args.size)
    macs = conv_macs(fp32, shape)
    spec = STEPS.replace("extractor.0,", "") if args.keep_first else STEPS
    steps = resolve_steps(fp32, parse_steps(spec), binary=True)
    model = copy.deepcopy(fp32)
    total = sum(p.numel() for p in fp32.parameters())
    done: list[str] = []
    print(f"fasterrcnn_vgg16 width {args.width:g}, fc {args.fc}, {args.size}x{args.size}, random weights, batch 1, {args.threads} thread(s), {args.runs} runs, binary scale {args.binary_scale}, "
          f"conv1_1 {'float' if args.keep_first else 'binarized'}")
    print("| step | layers added | measured speed-up (engine) | fp32 ms | engine ms | BOPs est. | weights binarized "
          "| weight bits removed | source: speed-up / weight compressing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, names in enumerate(steps, 1):
        wrap_convs(model, names, "binary", 1, 1, binary_scale=args.binary_scale)
        initialize_lowbit(model, [torch.rand(shape)])
        done += names
        bits = {n: (1, 1) for n in done}
        bops = estimate_bops(macs, bits)
        removed = 1 - 1 / weight_compression(fp32, bits)
        binarized = sum(fp32.get_submodule(n).weight.numel() for n in done) / total
        m = _measured_speedup(fp32, model, shape, args.threads, args.runs)
        src = SOURCE[k]
        print(f"| {k} | {', '.join(names)} | **{m['speedup']:.2f}x** | {m['fp32_ms']:.0f} | {m['engine_ms']:.0f} | "
              f"{bops.speedup:.2f}x | {100 * binarized:.2f} % | {100 * removed:.1f} % | {src[0]}x / {src[1]} % |",
              flush=True)
    print(f"CPU: {m['cpu']}; instruction sets: {', '.join(m['instruction_sets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
