"""AdaRound vs rounding to nearest on the Ultra-Light face detectors (issue 22), measured without face labels.

Per model: per-tensor W8A8 with nearest rounding (``qcompress quantize --per-tensor``) and with
AdaRound (``... --adaround --adaround-iters N``), each scored by fidelity to the fp32 parent on real COCO
val2017 person images (the fp32 detections with score >= 0.5 are the pseudo ground truth; COCO-style
AP over IoU .50:.95 and VOC AP50, see qcompress.metrics.fidelity). Calibration (and AdaRound's
reconstruction) uses images *not* in the fidelity set, the same ones for both roundings.

Usage: python benchmarks/adaround_faces.py [--limit 186] [--calib-images 32] [--adaround-iters 100]
                                           [--models version-RFB-320.pth:ultralight-rfb ...] [--weight-bits 8]
Needs ../shared/assets (weights/ultralight_face, coco_person_val2017).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _faces import face_setup

from qcompress._warnings import install_filters, quiet_torch_ao
from qcompress.core.inference import predict_dataset
from qcompress.metrics.fidelity import fidelity_scores
from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"  # default: ../shared/assets
MODELS = ["version-RFB-320.pth:ultralight-rfb", "version-slim-320.pth:ultralight-slim"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=ASSETS,
                        help="folder with weights/ultralight_face and coco_person_val2017 (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=MODELS, help="FILE:ARCH under weights/ultralight_face")
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--limit", type=int, default=186, help="fidelity images (the first N)")
    parser.add_argument("--calib-images", type=int, default=32, help="from the remaining images")
    parser.add_argument("--adaround-iters", type=int, default=100)
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--per-channel", action="store_true", help="per-channel weights (default: per-tensor)")
    parser.add_argument("--score", type=float, default=0.5, help="pseudo ground-truth score threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    weights, coco = args.assets / "weights" / "ultralight_face", args.assets / "coco_person_val2017"
    if not weights.is_dir() or not coco.is_dir():
        print(f"error: assets not found under {args.assets} (need weights/ultralight_face and "
              "coco_person_val2017); pass --assets DIR", file=sys.stderr)
        return 2
    if any(":" not in m for m in args.models):
        print("error: --models takes FILE:ARCH, e.g. version-slim-320.pth:ultralight-slim", file=sys.stderr)
        return 2
    install_filters()
    torch.set_num_threads(args.threads)
    scheme = "per-channel" if args.per_channel else "per-tensor"
    cli = "quantize" + ("" if args.per_channel else " --per-tensor") + \
        (f" --weight-bits {args.weight_bits}" if args.weight_bits != 8 else "")
    print(f"W{args.weight_bits}A8 {scheme}, histogram activations, x86; fidelity on the first {args.limit} COCO val2017 "
          f"person images, calibration on {args.calib_images} others; AdaRound {args.adaround_iters} iterations per "
          f"layer; torch {torch.__version__}, {args.threads} thread(s)\n")
    header = f"{'model':22s} {'rounding':9s} {'AP.5:.95':>8s} {'AP50':>6s} {'recall':>6s} {'mIoU':>6s} {'secs':>6s}  cli"
    print(header)
    print("-" * len(header))
    for spec in args.models:
        file, arch = spec.split(":", 1)
        fp32, dataset, test, calib = face_setup(weights, coco, file, arch, args.input_size, args.limit,
                                                args.calib_images, args.seed)
        ref = predict_dataset(fp32, dataset, test)
        boxes = sum(int((d.scores >= args.score).sum()) for d in ref)
        for rounding in ("nearest", "adaround"):
            options = QuantizeOptions(per_channel=args.per_channel, weight_bits=args.weight_bits, seed=args.seed,
                                      adaround=rounding == "adaround", adaround_iters=args.adaround_iters)
            started = time.perf_counter()
            with quiet_torch_ao():
                qdet, _ = quantize_detector(fp32, calib, options)
                dets = predict_dataset(qdet, dataset, test)
            seconds = time.perf_counter() - started
            f = fidelity_scores(ref, dets, fp32.class_names, args.score)
            flag = f" --adaround --adaround-iters {args.adaround_iters}" if rounding == "adaround" else ""
            print(f"{file.removesuffix('.pth'):22s} {rounding:9s} {f['AP50_95']:8.3f} {f['AP50']:6.3f} {f['recall']:6.3f} "
                  f"{f['mean_iou']:6.3f} {seconds:6.0f}  {cli}{flag}  ({boxes} reference faces)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
