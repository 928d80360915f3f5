"""Bitpacked binary conv and Linear vs torch fp32 and eager int8 layers of one shape, timed interleaved.

    python benchmarks/binary_conv.py [--threads 1] [--runs 30] [--kernel auto|vector|portable|...]
                                     [--clock cpu] [--layers all|conv|linear]

Per conv shape: median latency of BinaryConv2d (binarize + pack + XNOR-popcount + affine), of nn.Conv2d
(fp32) and of torch.ao.nn.quantized.Conv2d (x86/fbgemm engine, quint8 input already quantized),
called A-B-C in turn; speed-up ratios; max |engine - fake-quant layer| (absolute, and relative to
max |reference|). The issue's bars at 1 thread: 3x3 convs with >= 128 channels at >= 19x19 >= 8x
fp32 and >= 2x int8; 1x1 convs with >= 256 channels >= 4x fp32.

Per Linear shape (rows x in -> out: fc6 and fc7 of Faster R-CNN VGG16 on 300 RoIs): BinaryLinear vs
``F.linear`` in fp32, the static int8 torch.ao.nn.quantized.Linear (quint8 input already quantized) and
the dynamic one (torch.ao.nn.quantized.dynamic.Linear: float input, quantized per call), A-B-C-D in turn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from functools import partial

import numba
import torch
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn.functional as F
from torch import nn

from qcompress.quant.lowbit import (
    BinaryActivationQuantizer,
    BinaryWeightQuantizer,
    LowBitConv2d,
    LowBitLinear,
)
from qcompress.runtime.binary import KERNELS, BinaryConv2d, BinaryLinear, cpu_info, resolve_kernel
from qcompress.torch_state import torch_state

# (kernel, in, out, size)
SHAPES = [
    (3, 128, 128, 38),
    (3, 256, 256, 19),
    (3, 256, 256, 38),
    (3, 512, 512, 19),
    (1, 256, 256, 38),
    (1, 512, 512, 19),
]
# (rows, in, out): fc6 and fc7 of Faster R-CNN VGG16 on the 300 RoIs of one test image
LINEAR_SHAPES = [
    (300, 25088, 4096),
    (300, 4096, 4096),
]


def _binary_parts(layer: nn.Conv2d | nn.Linear, c: int, g: torch.Generator) -> tuple:
    """(layer with random weights, weight quantizer, input quantizer with a fixed mu and K) for a wrapper."""
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
    aq = BinaryActivationQuantizer(c, calibrate=False)
    aq.offset.copy_(torch.rand(c, generator=g))  # after ReLU-like inputs
    aq.scale.fill_(0.5)
    aq.initialized.fill_(True)
    return layer, BinaryWeightQuantizer(), aq


def binary_layer(k: int, c: int, o: int, seed: int = 0) -> LowBitConv2d:
    g = torch.Generator().manual_seed(seed)
    return LowBitConv2d(*_binary_parts(nn.Conv2d(c, o, k, 1, k // 2), c, g)).eval()


def binary_linear_layer(c: int, o: int, seed: int = 0) -> LowBitLinear:
    g = torch.Generator().manual_seed(seed)
    return LowBitLinear(*_binary_parts(nn.Linear(c, o), c, g)).eval()


def int8_linears(linear: nn.Linear) -> tuple[nnq.Linear, nnqd.Linear]:
    """(static, dynamic) int8 twins of ``linear`` with per-row qint8 weights."""
    w = linear.weight.detach()
    scales = w.abs().amax(dim=1).clamp_min(1e-8) / 127
    zero_points = torch.zeros_like(scales, dtype=torch.long)
    qweight = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
    static = nnq.Linear(linear.in_features, linear.out_features)
    static.set_weight_bias(qweight, linear.bias.detach())
    static.scale, static.zero_point = 0.05, 128
    dynamic = nnqd.Linear(linear.in_features, linear.out_features)
    dynamic.set_weight_bias(qweight, linear.bias.detach())
    return static, dynamic


def interleaved(candidates, warmup: int, runs: int, clock) -> list[float]:
    """Median ms of each candidate, called in turn run by run."""
    times: list[list[float]] = [[] for _ in candidates]
    for i in range(warmup + runs):
        for j, run in enumerate(candidates):
            start = clock()
            run()
            if i >= warmup:
                times[j].append(clock() - start)
    return [1e3 * statistics.median(t) for t in times]


def int8_conv(conv: nn.Conv2d) -> nnq.Conv2d:
    w = conv.weight.detach()
    scales = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / 127
    qweight = torch.quantize_per_channel(
        w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8
    )
    qconv = nnq.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    qconv.set_weight_bias(qweight, conv.bias.detach())
    qconv.scale, qconv.zero_point = 0.05, 128
    return qconv


def bars(k: int, c: int, size: int) -> tuple[float | None, float | None]:
    """(fp32 bar, int8 bar) of the issue for this shape."""
    if k == 3 and c >= 128 and size >= 19:
        return 8.0, 2.0
    if k == 1 and c >= 256:
        return 4.0, None
    return None, None


def verdict(ratio: float, bar: float | None) -> str:
    return "" if bar is None else ("ok" if ratio >= bar else "MISS")


def main() -> int:
    warnings.filterwarnings("ignore", category=UserWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kernel", choices=KERNELS, default="auto")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time, for a shared machine where other jobs preempt this one (1 thread)",
    )
    parser.add_argument("--layers", choices=("all", "conv", "linear"), default="all")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    info = cpu_info()
    present = [name for name, there in info.instruction_sets.items() if there]
    absent = [name for name, there in info.instruction_sets.items() if not there]
    print(f"cpu: {info.model}")
    print(f"instruction sets: {', '.join(present) or '-'}   absent: {', '.join(absent) or '-'}")
    print(
        f"torch {torch.__version__}  numba {numba.__version__}  threads {args.threads}  "
        f"kernel {resolve_kernel(args.kernel)}  runs {args.runs} (median {args.clock} time)"
    )
    header = (
        f"{'shape':<22}{'binary ms':>10}{'fp32 ms':>9}{'int8 ms':>9}{'x fp32':>8}{'':>5}"
        f"{'x int8':>8}{'':>5}{'max|diff|':>11}{'rel':>9}"
    )
    measured = 0
    qengine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    # torch_state: torch's and the binary engine's (numba's) threads, and the int8 engine, restored after
    with torch_state(args.threads, qengine), torch.inference_mode():
        print(f"int8 engine: {qengine}")
        if args.layers in ("all", "conv"):
            print(header)
        for k, c, o, size in SHAPES if args.layers in ("all", "conv") else []:
            layer = binary_layer(k, c, o)
            engine = BinaryConv2d.from_lowbit(layer, kernel=args.kernel)
            qconv = int8_conv(layer.conv)
            x = torch.rand(1, c, size, size) * 2
            xq = torch.quantize_per_tensor(x, 2 / 255, 0, torch.quint8)
            reference = layer(x)
            out = engine(x)
            diff = float((out - reference).abs().max())
            rel = diff / float(reference.abs().max())
            candidates = (partial(engine, x), partial(layer.conv, x), partial(qconv, xq))
            binary_ms, fp32_ms, int8_ms = interleaved(candidates, args.warmup, args.runs, clock)
            bar_fp32, bar_int8 = bars(k, c, size)
            shape = f"{k}x{k} {c}->{o} @{size}x{size}"
            print(
                f"{shape:<22}{binary_ms:>10.3f}{fp32_ms:>9.3f}{int8_ms:>9.3f}"
                f"{fp32_ms / binary_ms:>8.2f}{verdict(fp32_ms / binary_ms, bar_fp32):>5}"
                f"{int8_ms / binary_ms:>8.2f}{verdict(int8_ms / binary_ms, bar_int8):>5}{diff:>11.2e}{rel:>9.1e}"
            )
            measured += 1
        if args.layers in ("all", "linear"):
            print(
                f"{'linear rows x in->out':<22}{'binary ms':>10}{'fp32 ms':>9}{'int8 ms':>9}{'dyn ms':>9}"
                f"{'x fp32':>8}{'x int8':>8}{'x dyn':>8}{'max|diff|':>11}{'rel':>9}"
            )
        for rows, c, o in LINEAR_SHAPES if args.layers in ("all", "linear") else []:
            layer = binary_linear_layer(c, o)
            engine = BinaryLinear.from_lowbit(layer, kernel=args.kernel)
            static, dynamic = int8_linears(layer.linear)
            x = torch.rand(rows, c) * 2
            xq = torch.quantize_per_tensor(x, 2 / 255, 0, torch.quint8)
            reference = layer(x)
            out = engine(x)
            diff = float((out - reference).abs().max())
            rel = diff / float(reference.abs().max())
            del reference, out
            candidates = (partial(engine, x), partial(F.linear, x, layer.linear.weight, layer.linear.bias),
                          partial(static, xq), partial(dynamic, x))
            binary_ms, fp32_ms, int8_ms, dyn_ms = interleaved(candidates, args.warmup, args.runs, clock)
            shape = f"{rows} x {c}->{o}"
            print(
                f"{shape:<22}{binary_ms:>10.3f}{fp32_ms:>9.3f}{int8_ms:>9.3f}{dyn_ms:>9.3f}"
                f"{fp32_ms / binary_ms:>8.2f}{int8_ms / binary_ms:>8.2f}{dyn_ms / binary_ms:>8.2f}"
                f"{diff:>11.2e}{rel:>9.1e}",
                flush=True,
            )
            measured += 1
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
