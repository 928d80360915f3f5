"""Training-step time with and without ``qcompress train --freeze``, interleaved in one run (a ratio, not absolute
times): forward + backward of one batch of random images with one box each, for a fresh network of ``--arch``.

    python benchmarks/freeze_speed.py --arch centernet_resnet18 \\
        --options '{"input_size": 256, "width": 48, "head_conv": 32, "block": "basic"}' --freeze conv1,bn1,layer1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="centernet_resnet18")
    parser.add_argument("--options", default='{"input_size": 256, "width": 48, "head_conv": 32, "block": "basic"}')
    parser.add_argument("--freeze", default="conv1,bn1,layer1", help="module-name globs, as train --freeze")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from qcompress._warnings import install_filters
    from qcompress.data.synthetic import SYNTH_CLASSES
    from qcompress.models import build_detector
    from qcompress.runtime.binary import cpu_info
    from qcompress.training.loop import frozen_modules

    install_filters()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    detector = build_detector(args.arch, SYNTH_CLASSES, **json.loads(args.options))
    model = detector.model.train()
    h, w = detector.spec.input_size
    images = [torch.randn(3, h, w) for _ in range(args.batch_size)]
    targets = [{"boxes": torch.tensor([[0.1 * w, 0.15 * h, 0.5 * w, 0.6 * h]]), "labels": torch.tensor([2])}
               for _ in range(args.batch_size)]
    frozen = {id(p) for m in frozen_modules(model, [g for g in args.freeze.split(",") if g]) for p in m.parameters()}

    def step(freeze: bool) -> float:
        for p in model.parameters():
            p.requires_grad_(not (freeze and id(p) in frozen))
        start = time.perf_counter()
        losses = model(images, targets)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    step(False)
    step(True)
    for _ in range(args.runs):
        for freeze in (False, True):
            times[freeze].append(step(freeze))
    info = cpu_info()
    full, part = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.arch} {args.options}, batch {args.batch_size}, {args.threads} thread(s), {info.model} "
          f"({', '.join(k for k, v in info.instruction_sets.items() if v)})")
    print(f"train step: all trainable {full:.2f} s, --freeze {args.freeze} {part:.2f} s: {full / part:.2f}x "
          f"({len(frozen)} of {sum(1 for _ in model.parameters())} parameter tensors frozen; medians of {args.runs})")


if __name__ == "__main__":
    main()
