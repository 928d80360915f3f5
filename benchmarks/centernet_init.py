"""The init checkpoint of the embedded CenterNet: ``centernet_resnet18`` built with the given options, its
ResNet-18 encoder (conv1, bn1, layer1-4: torchvision's names, as msra_resnet's) copied from a trained
``fcos_resnet18_fpn`` checkpoint's ``backbone.body`` (the dashboard's fp32 parent, trained on the same
generated images), the decoder and heads new. ``qcompress train --init`` then trains it. ``--centernet C``
copies instead every tensor of a trained CenterNet that the new options share (e.g. the same network with
``"block": "bireal"``: same keys, other wiring).

    python benchmarks/centernet_init.py --fcos FCOS.pth --out INIT.pth \\
        --options '{"input_size": 256, "width": 48, "head_conv": 32, "block": "bireal"}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fcos", type=Path, help="trained fcos_resnet18_fpn checkpoint: its encoder")
    source.add_argument("--centernet", type=Path,
                        help="trained centernet_resnet18 checkpoint: every tensor the new options share with it "
                             "(e.g. the same network rewired with another block)")
    parser.add_argument("--out", type=Path, required=True, help="init checkpoint to write")
    parser.add_argument("--options", default='{"input_size": 256, "width": 48, "head_conv": 32, "block": "bireal"}')
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from qcompress.core.checkpoints import load_detector, save_detector
    from qcompress.data.synthetic import SYNTH_CLASSES
    from qcompress.models.registry import build_detector

    torch.manual_seed(args.seed)
    options = json.loads(args.options)
    detector = build_detector("centernet_resnet18", SYNTH_CLASSES, **options)
    if args.fcos is not None:
        body = {k.removeprefix("backbone.body."): v for k, v in load_detector(args.fcos).model.state_dict().items()
                if k.startswith("backbone.body.")}
    else:
        body = dict(load_detector(args.centernet).model.state_dict())
    own = detector.model.state_dict()
    copied = {k: v for k, v in body.items() if k in own and own[k].shape == v.shape}
    encoder = [k for k in own if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")]
    missing = sorted(set(encoder) - set(copied))
    if missing:
        raise SystemExit(f"the source lacks {len(missing)} encoder tensors, e.g. {missing[:3]}")
    detector.model.load_state_dict(copied, strict=False)
    src = args.fcos or args.centernet
    save_detector(detector, args.out, command=["build centernet_resnet18", json.dumps(options), "tensors from",
                                               str(src), f"({len(copied)} of {len(own)} tensors)"])
    print(f"wrote {args.out}: {len(copied)} of {len(own)} tensors from {src}")


if __name__ == "__main__":
    main()
