"""int8 recipes on the Ultra-Light RFB-320 face detector, measured without face labels.

For each recipe: fidelity of the int8 model to its fp32 parent on real COCO val2017 images (the fp32
model's detections with score >= 0.5 are the pseudo ground truth; see qcompress.metrics.fidelity), mean IoU
of matched boxes, score drift, and the int8 / fp32 latency ratio at batch 1.

Calibration images are drawn from the images *not* used for the fidelity measurement.

Usage: python benchmarks/face_recipes.py [--limit 100] [--calib-images 64] [--threads 1] [--runs 30]
                                         [--model version-RFB-320.pth] [--input-size 320]
Needs ../shared/assets (weights/ultralight_face, coco_person_val2017).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _faces import face_setup

from qcompress._warnings import install_filters
from qcompress.bench.latency import interleaved_latency
from qcompress.core.inference import predict_dataset
from qcompress.metrics.fidelity import fidelity_scores
from qcompress.quant.pipeline import QuantizeOptions, quantize_detector

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"  # default: ../shared/assets

# name -> (QuantizeOptions, what it is). The CLI spelling is in the description.
RECIPES = {
    "per-channel histogram": (QuantizeOptions(per_channel=True), "quantize (default)"),
    "per-tensor naive": (QuantizeOptions(per_channel=False), "quantize --per-tensor"),
    "per-tensor + CLE": (QuantizeOptions(per_channel=False, equalize=True), "quantize --per-tensor --equalize"),
    "data-free per-tensor, no CLE/BC": (
        QuantizeOptions(per_channel=False, data_free=True), "BN-statistics ranges only (data-free baseline)"),
    "data-free CLE+BA+BC per-tensor": (
        QuantizeOptions(per_channel=False, equalize=True, absorb_bias=True, bias_correction="analytic", data_free=True),
        "quantize --data-free --per-tensor"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=ASSETS,
                        help="folder with weights/ultralight_face and coco_person_val2017 (default: %(default)s)")
    parser.add_argument("--model", default="version-RFB-320.pth")
    parser.add_argument("--arch", default="ultralight-rfb")
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--limit", type=int, default=100, help="fidelity images (the first N)")
    parser.add_argument("--calib-images", type=int, default=64, help="from the remaining images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the latency runs")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--score", type=float, default=0.5, help="pseudo ground-truth score threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), help="subset of: " + ", ".join(RECIPES))
    args = parser.parse_args(argv)
    weights, coco = args.assets / "weights" / "ultralight_face", args.assets / "coco_person_val2017"
    if not weights.is_dir() or not coco.is_dir():
        print(f"error: assets not found under {args.assets} (need weights/ultralight_face and "
              "coco_person_val2017); pass --assets DIR", file=sys.stderr)
        return 2
    install_filters()
    torch.manual_seed(args.seed)

    fp32, dataset, test, calib = face_setup(weights, coco, args.model, args.arch, args.input_size, args.limit,
                                            args.calib_images, args.seed)
    h, w = fp32.spec.input_size

    started = time.perf_counter()
    ref = predict_dataset(fp32, dataset, test)
    print(f"{args.model} ({args.arch}, input {w}x{h}); fidelity on {len(test)} COCO val2017 person images, "
          f"calibration on {sum(len(b) for b in calib)} others; pseudo gt = fp32 detections with score >= {args.score} "
          f"({sum(int((d.scores >= args.score).sum()) for d in ref)} boxes); fp32 inference {time.perf_counter() - started:.1f} s")
    print(f"latency: batch 1, {args.threads} thread(s), {args.runs} runs after 5 warm-up, median; "
          f"fp32 and int8 interleaved run by run per recipe; torch {torch.__version__}, backend x86\n")

    header = f"{'recipe':34s} {'AP.5:.95':>8s} {'AP50':>6s} {'recall':>6s} {'mIoU':>6s} {'|drift|':>7s} {'drift':>7s} " \
             f"{'fp32 ms':>8s} {'int8 ms':>8s} {'int8/fp32':>9s}  cli"
    print(header)
    print("-" * len(header))
    for name in args.recipes:
        options, cli = RECIPES[name]
        qdet, _ = quantize_detector(fp32, [] if options.data_free else calib, options)
        test_dets = predict_dataset(qdet, dataset, test)
        f = fidelity_scores(ref, test_dets, fp32.class_names, args.score)
        fp_lat, q_lat = interleaved_latency([fp32.model, qdet.model], (1, 3, h, w), runs=args.runs,
                                            threads=args.threads)
        print(f"{name:34s} {f['AP50_95']:8.3f} {f['AP50']:6.3f} {f['recall']:6.3f} {f['mean_iou']:6.3f} {f['score_drift_abs']:7.4f} "
              f"{f['score_drift_signed']:+7.4f} {fp_lat.median_ms:8.2f} {q_lat.median_ms:8.2f} "
              f"{q_lat.median_ms / fp_lat.median_ms:9.3f}  {cli}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
