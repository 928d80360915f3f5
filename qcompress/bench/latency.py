"""Wall-clock latency of a network's forward pass (raw outputs, no post-processing)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from qcompress.torch_state import torch_state

# Runs whose p90 exceeds the minimum by more than half the median were disturbed (another process,
# frequency changes): ratios between such measurements are not to be trusted.
NOISY_SPREAD = 0.5


@dataclass(frozen=True)
class LatencyStats:
    batch_size: int
    threads: int
    runs: int
    warmup: int
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float

    @property
    def images_per_second(self) -> float:
        return 1000.0 * self.batch_size / self.median_ms

    @property
    def spread(self) -> float:
        """(p90 - min) / median: how much the runs disagree; above ``NOISY_SPREAD`` a ratio means little."""
        return (self.p90_ms - self.min_ms) / self.median_ms if self.median_ms else float("nan")

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_second": self.images_per_second}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, int, int, int],
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    seed: int = 0,
) -> LatencyStats:
    """Median/p90/min of ``runs`` timed forward passes after ``warmup`` untimed ones."""
    return interleaved_latency([model], input_shape, runs, warmup, threads, seed)[0]


@torch.inference_mode()
def interleaved_latency(
    models: Sequence[nn.Module],
    input_shape: tuple[int, int, int, int],
    runs: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    seed: int = 0,
    engines: Sequence[str | None] | None = None,
) -> list[LatencyStats]:
    """Latency of several networks on the same input, timed round-robin (A B C A B C ...) so that a burst
    of load on the machine lands on all of them alike: the one function every comparison uses.

    ``engines[i]``: the quantized engine model ``i`` was converted for (set before each of its calls).
    """
    if runs < 1:
        raise ValueError("runs must be >= 1")
    engines = list(engines) if engines is not None else [None] * len(models)
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    times: list[list[float]] = [[] for _ in models]
    with torch_state(threads) as used:  # restores the engine each model switched to, too
        for model, engine in zip(models, engines):
            model.eval()
            if engine:
                torch.backends.quantized.engine = engine
            for _ in range(warmup):
                model(x)
        for _ in range(runs):
            for i, (model, engine) in enumerate(zip(models, engines)):
                if engine:
                    torch.backends.quantized.engine = engine
                start = time.perf_counter()
                model(x)
                times[i].append((time.perf_counter() - start) * 1000.0)
    return [
        LatencyStats(
            batch_size=input_shape[0], threads=used, runs=runs, warmup=warmup, median_ms=statistics.median(t),
            p90_ms=percentile(t, 90), min_ms=min(t), mean_ms=statistics.fmean(t),
        )
        for t in times
    ]


def describe_timing(stats: Sequence[LatencyStats]) -> str:
    """One sentence on how latencies were measured, with a warning when their spread makes ratios unreliable."""
    first = stats[0]
    threads = f"{first.threads} thread{'s' if first.threads != 1 else ''}"
    text = (f"{first.runs} timed runs per model after {first.warmup} warm-up, models interleaved run by run, "
            f"{threads}, batch {first.batch_size}.")
    noisy = [s for s in stats if s.noisy]
    if noisy:
        text += (f" **Warning:** the runs spread by up to {max(s.spread for s in noisy):.0%} of the median "
                 "(p90 - min): the machine was busy and the ratios are unreliable; re-run on an idle machine.")
    return text
