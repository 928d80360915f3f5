"""Wall-clock latency of a network's forward pass (raw outputs, no post-processing)."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from collections.abc import Iterator

import torch
from torch import nn


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

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_second": self.images_per_second}


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


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
    if runs < 1:
        raise ValueError("runs must be >= 1")
    model.eval()
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    with torch_threads(threads) as used:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000.0)
    return LatencyStats(
        batch_size=input_shape[0],
        threads=used,
        runs=runs,
        warmup=warmup,
        median_ms=statistics.median(times),
        p90_ms=percentile(times, 90),
        min_ms=min(times),
        mean_ms=statistics.fmean(times),
    )
