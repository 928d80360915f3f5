"""VOC07 mAP of checkpoints on images a benchmark did not look at: images ``--start`` .. ``--start + --count``
of the generated ``--split`` (``benchmarks/teacher.py`` scores the first ``--limit`` test images; a weight picked
by looking at those is checked here on the next ones, or on the val split, which no fine-tune trains or
selects on). ``--data-seed S`` scores on a fresh draw of the generated dataset instead (same generator, seed S,
``--data-images`` images in all, cached like the default): images that no run, the parent included, trained on
or was selected on. Every checkpoint is scored on the same images in one run.

Usage: python benchmarks/heldout_eval.py [--split test --start 200 | --split val --start 0] [--count 500]
       [--data-seed 1 --data-images 1000] [--model-path fp32.pth] CKPT [CKPT ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--model-path", default=None, help="the fp32 parent (default: the embedded default)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"), help="train: only with --data-seed")
    parser.add_argument("--start", type=int, default=200)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-seed", type=int, default=None, help="a fresh generated dataset (seed != 0)")
    parser.add_argument("--data-images", type=int, default=1000, help="images of the fresh dataset, all splits")
    args = parser.parse_args(argv)

    import torch

    from qcompress._warnings import install_filters
    from qcompress.core import DataConfig, ModelConfig
    from qcompress.core.checkpoints import load_detector
    from qcompress.core.evaluation import evaluate_detector
    from qcompress.core.loading import Subset, load_dataset, load_model

    install_filters()
    torch.set_num_threads(args.threads)
    parent = load_model(ModelConfig(args.model_path))
    if args.split == "train" and args.data_seed is None:
        raise SystemExit("--split train holds the parent's training images: add --data-seed for a fresh draw")
    data = DataConfig()
    if args.data_seed is not None:
        from qcompress.data.synthetic import ensure_default_dataset

        data = DataConfig(data=ensure_default_dataset(args.data_images, args.data_seed))
    test = load_dataset(data, parent.class_names, args.split)
    stop = min(len(test), args.start + args.count)
    if args.start < 0 or args.start >= stop:
        raise SystemExit(f"--start {args.start} is outside the {len(test)} {args.split} images")
    images = Subset(test, list(range(args.start, stop)))
    fp32 = evaluate_detector(parent, images)[0].mAP
    where = "" if args.data_seed is None else f" of a fresh generated dataset (seed {args.data_seed}, {args.data_images})"
    print(f"{args.split} images {args.start}..{stop - 1} ({stop - args.start}){where}, VOC07 mAP")
    print(f"| checkpoint | mAP | Δ points vs fp32 |\n|---|---|---|\n| fp32 parent | {fp32:.4f} | |")
    for path in args.checkpoints:
        m = evaluate_detector(load_detector(path), images)[0].mAP
        print(f"| {path} | {m:.4f} | {(m - fp32) * 100:+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
