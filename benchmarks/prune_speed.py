"""Parent vs channel-pruned latency at batch 1, in one run (the "20% channels -> >= 15% faster" bar).

Usage: python benchmarks/prune_speed.py [--model-path M] [--amounts 0.2 0.5] [--threads 1] [--rounds 30]
       [--round-to 8] [--include-residual]

Without --model-path the embedded default checkpoint is used, or a random-init mb2-ssd-lite when it is
missing (latency does not depend on the weights' values). Parent and pruned networks are timed in
interleaved rounds so that load on the machine hits both alike; the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from qcompress.bench.size import count_macs, count_parameters
from qcompress.prune.channels import prune_channels
from qcompress.torch_state import torch_state


def _load(model_path: Path | None):
    from qcompress.core.checkpoints import load_detector
    from qcompress.defaults import DEFAULT_MODEL

    path = model_path or (DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None)
    if path is not None:
        return load_detector(path), str(path)
    from qcompress.data.synthetic import SYNTH_CLASSES
    from qcompress.models import build_detector

    torch.manual_seed(0)
    return build_detector("mb2-ssd-lite", SYNTH_CLASSES), "random-init mb2-ssd-lite (default checkpoint missing)"


@torch.inference_mode()
def _interleaved_ms(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int, warmup: int = 5) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(x)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path)
    parser.add_argument("--amounts", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--round-to", type=int, default=16)
    parser.add_argument("--criterion", default="l1")
    parser.add_argument("--include-residual", action="store_true")
    args = parser.parse_args()

    detector, source = _load(args.model_path)
    h, w = detector.spec.input_size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    models = {"parent": detector.model.eval()}
    for amount in args.amounts:
        pruned = copy.deepcopy(detector.model)
        prune_channels(pruned, x, amount, args.criterion, round_to=args.round_to, include_residual=args.include_residual)
        models[f"channels {amount:g}"] = pruned
    with torch_state(args.threads) as threads:
        medians = _interleaved_ms(models, x, args.rounds)
    print(f"model: {source}; input 1x3x{h}x{w}; {threads} thread(s); {args.rounds} interleaved rounds; "
          f"round_to={args.round_to}; include_residual={args.include_residual}")
    base_ms = medians["parent"]
    base_macs = count_macs(models["parent"], (1, 3, h, w)).macs
    base_params = count_parameters(models["parent"])
    print(f"{'model':<16}{'median ms':>10}{'latency ratio':>15}{'MACs (M)':>10}{'MAC ratio':>11}{'params':>10}")
    for name, model in models.items():
        macs = count_macs(model, (1, 3, h, w)).macs
        params = count_parameters(model)
        print(f"{name:<16}{medians[name]:>10.2f}{medians[name] / base_ms:>15.3f}{macs / 1e6:>10.1f}"
              f"{macs / base_macs:>11.3f}{params:>10,}")
    print(f"(latency reduction at 0.2: {1 - medians.get('channels 0.2', base_ms) / base_ms:.1%}; params of parent {base_params:,})")


if __name__ == "__main__":
    main()
