"""int8 vs fp32 latency of torchvision detectors (random weights), measured in one run.

    python benchmarks/torchvision_int8.py [--archs A B ...] [--runs 10] [--threads 1]

No torchvision weights can be downloaded here, so the models have random weights with non-trivial
BN statistics; latency of the convolutions does not depend on the weights, but the post-processing
does (random heads produce many candidates for NMS). So two ratios are printed: the int8 parts
of the backbone alone (with FPN/extras) and of the whole model as `qcompress bench`
times it (transform, float heads, decoding and NMS included).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from qcompress._warnings import install_filters
from qcompress.bench.latency import measure_latency
from qcompress.models.registry import build_detector, list_archs
from qcompress.quant.pipeline import QuantizeOptions, quantize_detector


class _Backbone(nn.Module):
    """The model's backbone on an already normalised, batched image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.backbone(x)


def _random_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def main() -> None:
    install_filters()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=[a.name for a in list_archs() if a.compression.int8_parts])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.runs} runs, x86 backend")
    print(f"{'arch':40} {'size':>4} {'backbone fp32/int8 ms':>24} {'ratio':>6} {'whole fp32/int8 ms':>20} {'ratio':>6}")
    for arch in args.archs:
        torch.manual_seed(0)
        detector = build_detector(arch, ("BACKGROUND", "a", "b", "c"))
        _random_bn(detector.model)
        h, w = detector.spec.input_size
        g = torch.Generator().manual_seed(1)
        calib = [torch.rand(2, 3, h, w, generator=g) for _ in range(2)]
        qdet, _ = quantize_detector(detector, calib, QuantizeOptions(observer="minmax"))
        shape = (1, 3, h, w)
        parts = [measure_latency(_Backbone(m), shape, runs=args.runs, warmup=3, threads=args.threads).median_ms
                 for m in (detector.model, qdet.model)]
        whole = [measure_latency(m, shape, runs=args.runs, warmup=3, threads=args.threads).median_ms
                 for m in (detector.model, qdet.model)]
        print(f"{arch:40} {h:>4} {parts[0]:>11.1f} / {parts[1]:<10.1f} {parts[1] / parts[0]:>6.2f} "
              f"{whole[0]:>9.1f} / {whole[1]:<8.1f} {whole[1] / whole[0]:>6.2f}")


if __name__ == "__main__":
    main()
