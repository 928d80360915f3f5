"""How far a low-bit network's features drift from its float parent's before any training: the cosine
similarity between the parent's and the low-bit model's outputs of each listed module, on the same images.

Each method wraps the convs of ``--scope`` as ``qcompress qat`` does, its quantizers take their first values
on the first calibration batch, then one batch of training images runs through both networks; the cosine is
over the whole batch's output of the module. ``--mode train`` uses batch statistics in BatchNorm (what
fine-tuning sees), ``eval`` the parent's running statistics (what evaluation sees before any training).

Usage: python benchmarks/lowbit_drift.py [--methods binary lsq] [--scope backbone] [--modules "base_net.*"]
       [--binary-scale layer|learned|spatial]
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import sys

import torch
import torch.nn.functional as F

from qcompress._warnings import install_filters
from qcompress.core import DataConfig, ModelConfig
from qcompress.core.loading import calibration_batches, load_dataset, load_model
from qcompress.models.registry import compression_spec
from qcompress.quant.lowbit import apply_lowbit, initialize_lowbit


def outputs(model: torch.nn.Module, names: list[str], batch: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """``{name: output}`` of the named modules for ``batch`` (one forward, no grad)."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, o.detach()))
               for n in names]
    model.train(mode == "train")
    with torch.no_grad():
        model(batch)
    model.eval()
    for handle in handles:
        handle.remove()
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--methods", nargs="+", default=["binary", "lsq"])
    parser.add_argument("--bits", type=int, default=4, help="weights and activations for methods other than binary")
    parser.add_argument("--scope", default="backbone")
    parser.add_argument("--modules", default="base_net.*", help="glob over module names, one level deep")
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--binary-scale", choices=("layer", "learned", "spatial"), default="layer",
                        help="the binary method's scales (as qat --binary-scale)")
    args = parser.parse_args(argv)
    install_filters()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parent = load_model(ModelConfig(model_path=args.model_path))
    depth = args.modules.count(".")
    names = [n for n, _ in parent.model.named_modules() if n.count(".") == depth and fnmatch.fnmatchcase(n, args.modules)]
    if not names:
        print(f"--modules {args.modules!r} matches no module", file=sys.stderr)
        return 2
    batch = calibration_batches(parent, load_dataset(DataConfig(), parent.class_names, "train"), args.images, 0,
                                batch_size=args.images)[0]
    # a copy: a train-mode forward moves BatchNorm's running statistics, which the students must start from untouched
    reference = outputs(copy.deepcopy(parent.model), names, batch, args.mode)
    names = [n for n in names if n in reference]  # modules the forward does not call have no output
    columns = []
    for method in args.methods:
        student = copy.deepcopy(parent.model)
        bits = 1 if method == "binary" else args.bits
        record = apply_lowbit(student, method, bits, bits, args.scope, spec=compression_spec(parent.spec.arch),
                              binary_scale=args.binary_scale)
        initialize_lowbit(student, [batch])
        seen = outputs(student, names, batch, args.mode)
        cosines = [float(F.cosine_similarity(reference[n].flatten().float(), seen[n].flatten().float(), dim=0))
                   for n in names]
        scale = f", {args.binary_scale} K" if method == "binary" else ""
        columns.append((f"{method} w{bits}a{bits}{scale} ({len(record.layers)} layers)", cosines))
    print(f"cosine similarity with the float parent's outputs, {args.images} training images, BatchNorm in "
          f"{args.mode} mode, --scope {args.scope}, no training")
    print("| module | " + " | ".join(c[0] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for i, name in enumerate(names):
        print(f"| {name} | " + " | ".join(f"{c[1][i]:.3f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
